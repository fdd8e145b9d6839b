"""Many HTTP clients at once (issue 18): the API (api.Api) in front of the batcher (batching.BatchService,
its run() task driving SoloBatch of test_batching's hash engine), all in one trio loop on loopback. 2, 4
and 8 concurrent completions of different lengths, whole and streamed, each the text of its solo run;
a 9th request with max_batch 8 and no queue gets 429 with Retry-After; a client that hangs up mid-stream
frees its sequence; usage reports the prompt tokens a shared prefix saved."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio

from dllp2p import api
from dllp2p.engine import SoloBatch
from dllp2p.session.batcher import BatchConfig
from dllp2p.session.batching import BatchService
from test_batching import _engine, _prompt, model, solo_text  # noqa: F401 - model: the module's fixture

CTX = 96


class Served:
    """api.Api over a BatchService on a loopback port, in a trio loop of its own thread. `gate`: while
    cleared, every engine step waits (requests pile up as running)."""

    def __init__(self, model, cfg: BatchConfig):  # noqa: F811
        m, tok = model
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0  # seconds each engine row takes

        async def make(ctx: int) -> SoloBatch:
            def engine():
                e = _engine(m.config, tok, ctx)
                forward = e.forward
                e.forward = lambda tokens, pos: (self.gate.wait(30), time.sleep(self.delay), forward(tokens, pos))[2]
                return e

            return SoloBatch(engine, cfg.max_batch)

        self.svc = BatchService(cfg, "root-test")
        self.svc.attach(make, tok, CTX, 64)
        self.seqs = []  # every sequence submitted
        submit = self.svc.core.submit
        self.svc.core.submit = lambda seq: (self.seqs.append(seq), submit(seq))[1]
        self._port: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _submit(self, sink, g) -> None:
        await self.svc.generate(sink, g, list(g.tokens))

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.svc.run)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, api.Api(self._submit, "test", api.Limits(ctx=CTX)).connection,
                               listeners)
            self._port.put(listeners[0].socket.getsockname()[1])
            await trio.to_thread.run_sync(self._stop.wait)
            nursery.cancel_scope.cancel()

    def __enter__(self) -> int:
        self._thread.start()
        return self._port.get(timeout=10)

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self._stop.set()
        self._thread.join(10)


def complete(port: int, ids, max_tokens: int, stream: bool = False, delay: float = 0.0) -> tuple[int, dict, dict | str]:
    """POST /v1/completions with token ids -> (status, headers, the JSON answer or the streamed text)."""
    time.sleep(delay)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = {"prompt": list(ids), "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read().decode()
        headers = {k.lower(): v for k, v in r.getheaders()}
        if r.status != 200 or not stream:
            return r.status, headers, json.loads(data)
        events = [line[6:] for line in data.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]
        return r.status, headers, "".join(json.loads(e)["choices"][0]["text"] for e in events)
    finally:
        conn.close()


@pytest.mark.parametrize("n", [2, 4, 8])
def test_concurrent_api_requests_get_their_solo_text(model, n):  # noqa: F811
    system = _prompt(5, 10)
    reqs = [(_prompt(10 + i, 2 + 4 * i, system if i % 3 == 0 else ()), 3 + 4 * i, i % 2 == 1) for i in range(n)]
    with Served(model, BatchConfig(max_batch=8, chunk=16)) as port:
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda a: complete(port, a[1][0], a[1][1], a[1][2], 0.02 * a[0]), enumerate(reqs)))
        follow_up = _prompt(99, 3, system)  # after them: a finished one's slot holds the system prompt
        status, _, later = complete(port, follow_up, 4)
    assert status == 200 and later["choices"][0]["text"] == solo_text(model, follow_up, 4, CTX)[0]
    assert later["usage"]["prompt_tokens_details"]["cached_tokens"] >= 10
    for (ids, steps, stream), (status, _, got) in zip(reqs, answers):
        assert status == 200, got
        text = got if stream else got["choices"][0]["text"]
        assert text == solo_text(model, ids, steps, CTX)[0]
        if not stream:
            assert got["usage"]["prompt_tokens"] == len(ids)


def test_a_ninth_request_gets_429_and_a_hung_up_stream_is_freed(model):  # noqa: F811
    served = Served(model, BatchConfig(max_batch=8, queue=0))
    with served as port:
        served.gate.clear()  # the engine holds every step: the first 8 stay running
        served.delay = 0.002
        with ThreadPoolExecutor(8) as pool:
            first = [pool.submit(complete, port, _prompt(i, 4), 8) for i in range(7)]
            hangs_up = socket.create_connection(("127.0.0.1", port))
            body = json.dumps({"prompt": list(_prompt(7, 4)), "max_tokens": 50, "stream": True}).encode()
            hangs_up.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 20
            while served.svc.serving().running < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.svc.serving().running == 8
            status, headers, err = complete(port, _prompt(8, 4), 8)
            assert status == 429 and headers["retry-after"] == "5" and err["error"]["code"] == "rate_limit_exceeded"
            served.gate.set()
            hangs_up.recv(1)  # its stream has begun
            hangs_up.close()
            assert all(f.result()[0] == 200 for f in first)
            deadline = time.monotonic() + 20
            while served.svc.serving().running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.svc.serving().running == 0
            gone = next(q for q in served.seqs if q.prompt == _prompt(7, 4))
            assert gone.state == "gone" and gone.generated < 50  # its 50 tokens were not all made
        status, _, ok = complete(port, _prompt(8, 4), 8)  # room again
        assert status == 200 and ok["choices"][0]["text"] == solo_text(model, _prompt(8, 4), 8, CTX)[0]
