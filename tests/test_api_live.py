"""The HTTP API of a real `dllp2p daemon` (its own ports, cluster name, state, cache and config) serving
SmolLM2: the official `openai` client's chat and completions, streamed and whole, give token for token
the local engine's greedy text; the table of malformed requests (test_api.malformed_requests) gets its
4xx with nothing like a traceback in the daemon's log; the root's own refusals (a token id outside the
vocabulary, a prompt over the API's context) are 400s."""

from __future__ import annotations

import http.client
import json
import re
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dllp2p import api
from test_api import check_error, exchange, malformed_requests

ROOT_DIR = Path(__file__).parent.parent
API_CTX = 256


class LiveDaemon:
    """One `dllp2p daemon` on 127.0.0.1 port 0 with its API on port 0, everything of its own."""

    def __init__(self, tmp: Path, model: Path | None, *extra: str):
        (tmp / "config.toml").write_text("")
        self.cluster = "api-test-" + secrets.token_hex(4)
        cmd = [sys.executable, "-m", "dllp2p.cli", "daemon", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
               "--state-dir", str(tmp / "state"), "--no-discovery", "--cluster", self.cluster,
               "--config", str(tmp / "config.toml"), "--plan", "pow2", *extra]
        if model is not None:
            cmd += ["--model", str(model)]
        env = {"PATH": "/usr/bin:/bin", "DLLP2P_CACHE_DIR": str(tmp / "cache"), "HOME": str(tmp), "DLLP2P_KEY_FILE": "off",
               **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR, env=env)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        self.address = self._wait(r"listening on (\S+:\d+)")

    def _wait(self, pattern: str, limit: float = 60) -> str:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for line in list(self.log):
                if m := re.search(pattern, line):
                    return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"the daemon did not log {pattern!r}:\n{''.join(self.log)}")

    def api_port(self) -> int:
        return int(self._wait(r"OpenAI-compatible API on http://127\.0\.0\.1:(\d+)/v1"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_path):
    d = LiveDaemon(tmp_path_factory.mktemp("api"), model_path, "--api", "127.0.0.1:0", "--api-ctx", str(API_CTX))
    try:
        yield d.api_port(), d
    finally:
        d.stop()
    assert not any("Traceback" in line for line in d.log), "".join(d.log)


def local_greedy(model_path, messages: list[tuple[str, str]] | None, prompt: str | None, steps: int) -> tuple[str, int]:
    """What one local engine generates greedily: (text, prompt tokens)."""
    from dllp2p.chat import Message
    from dllp2p.formats import load_model
    from dllp2p.generate import generate
    from dllp2p.jit.engine import JITEngine
    from dllp2p.prompt import chat_tokens
    from dllp2p.sampler import Sampler, SamplerConfig
    from dllp2p.tokenizer import StreamDecoder, Tokenizer

    model = load_model(model_path)
    tok = Tokenizer.from_metadata(model.metadata)
    ids = chat_tokens(tok, model, [Message(r, c) for r, c in messages]) if messages else tok.encode(prompt)
    engine = JITEngine(model, API_CTX, threads=1)
    try:
        dec = StreamDecoder(tok)
        text = "".join(dec.push(t) for t in generate(engine, ids, Sampler(SamplerConfig(temperature=0)), steps, tok.eos_ids))
        return text + dec.flush(), len(ids)
    finally:
        engine.close()


def request(port: int, method: str, path: str, body=None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_the_openai_client_gets_the_local_engines_greedy_text(live, model_path):
    openai = pytest.importorskip("openai")
    port, _ = live
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    model = "SmolLM2-135M-Instruct.Q4_1"
    assert [m.id for m in client.models.list()] == [model] and client.models.retrieve(model).id == model

    msgs = [("system", "You are terse."), ("user", "Name a colour.")]
    want, n_prompt = local_greedy(model_path, msgs, None, 12)
    assert want.strip()
    messages = [{"role": r, "content": c} for r, c in msgs]
    a = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    assert a.object == "chat.completion" and a.model == model
    assert a.choices[0].message.role == "assistant" and a.choices[0].message.content == want
    assert a.usage.prompt_tokens == n_prompt and 1 <= a.usage.completion_tokens <= 12
    assert a.choices[0].finish_reason == ("length" if a.usage.completion_tokens == 12 else "stop")
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [a.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == n_prompt and chunks[-1].usage.completion_tokens == a.usage.completion_tokens

    prompt = "The capital of France is"
    want, n_prompt = local_greedy(model_path, None, prompt, 10)
    c = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=10)
    assert c.object == "text_completion" and c.choices[0].text == want and c.usage.prompt_tokens == n_prompt
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model=model, prompt=prompt, temperature=0, max_tokens=10, stream=True) if p.choices)
    assert streamed == want

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert e.value.code == "unsupported_parameter" and e.value.param == "tools"


@pytest.mark.slow
def test_malformed_requests_to_a_live_daemon(live):
    port, d = live
    for bad in malformed_requests(api.Limits(ctx=API_CTX)):  # the daemon's limits
        status, headers, body, closed = exchange(port, bad.raw, closes=bad.closes)
        check_error(status, body, bad.status, bad.code)
        if bad.closes:
            assert closed, bad.name
        assert request(port, "GET", "/v1/models")[0] == 200, bad.name  # the next request, on a fresh connection
    status, data = request(port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] >= 1
    assert not any("Traceback" in line for line in d.log), "".join(d.log)


@pytest.mark.slow
def test_the_roots_refusals_are_400s(live):
    port, d = live
    for body, code in [({"prompt": [1, 49152]}, "invalid_token"),  # SmolLM2's vocabulary: 0..49151
                       ({"prompt": [1] * (API_CTX + 5), "max_tokens": 1}, "context_length_exceeded"),
                       ({"prompt": "word " * (API_CTX + 5), "max_tokens": 1, "stream": True}, "context_length_exceeded")]:
        status, data = request(port, "POST", "/v1/completions", body)
        check_error(status, data, 400, code)
    chat = {"messages": [{"role": "user", "content": "hello " * API_CTX}], "max_tokens": 1}
    check_error(*request(port, "POST", "/v1/chat/completions", chat), 400, "context_length_exceeded")
    status, data = request(port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200
    assert not any("Traceback" in line for line in d.log), "".join(d.log)


@pytest.mark.slow
def test_completion_stops_at_a_stop_string(live, model_path):
    port, _ = live
    full, _ = local_greedy(model_path, None, "The capital of France is", 24)
    assert full.startswith(" Paris") and len(full.split()) > 3
    stop = full.split()[2]  # a word a few tokens in: the text ends just before it
    status, data = request(port, "POST", "/v1/completions", {"prompt": "The capital of France is",
                           "temperature": 0, "max_tokens": 24, "stop": [stop, "zzzz"]})
    assert status == 200, data
    a = json.loads(data)
    assert a["choices"][0]["text"] == full[: full.index(stop)]
    assert a["choices"][0]["finish_reason"] == "stop" and a["usage"]["completion_tokens"] < 24


@pytest.mark.slow
def test_a_conversation_reuses_the_kv_cache_of_its_last_turn(live, model_path):
    """Turn 2 repeats turn 1 and its reply: the kept session's KV cache already holds most of that, and
    the answer is still the local engine's for the whole conversation."""
    port, d = live
    turn1 = [("user", "Name a fruit.")]
    reply, _ = local_greedy(model_path, turn1, None, 16)
    turn2 = turn1 + [("assistant", reply), ("user", "And a vegetable?")]
    want, n_prompt = local_greedy(model_path, turn2, None, 16)
    def reused() -> list[int]:
        return [int(m) for line in list(d.log) for m in re.findall(r"(\d+) of them already in its KV cache", line)]

    for turn, answer in ((turn1, reply), (turn2, want)):
        before = len(reused())
        status, data = request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": r, "content": c} for r, c in turn], "temperature": 0, "max_tokens": 16})
        assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == answer
    deadline = time.monotonic() + 5  # turn 2's log line may still be on its way through the pipe
    while len(reused()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(reused()) > before and n_prompt // 2 < reused()[-1] < n_prompt, d.log[-3:]


def test_a_taken_api_port_leaves_the_daemon_serving(tmp_path):
    import trio

    from dllp2p.wire.client import ask_status

    with socket.create_server(("127.0.0.1", 0)) as taken:
        d = LiveDaemon(tmp_path, None, "--api", f"127.0.0.1:{taken.getsockname()[1]}")
        try:
            assert trio.run(ask_status, d.address, 10.0).node_id
            d._wait(r"(HTTP API is off)")
        finally:
            d.stop()
