"""Issue 17, the root's half: a request survives its root. The daemon that forwarded it keeps the ids it
relayed and resubmits it (Generate.already) to the next root when the root is killed or stops (SIGTERM:
goodbye, drain, handover); the client's stream continues with the same tokens as one node's.

Pure parts first (the sampler's skip, the generation loop resumed, the election's Left, forward's
answer), then real `dllp2p daemon` processes on loopback (tests/test_serve.py's Daemons: own ports,
cluster name, state dirs, static peers) with the random 8-KV-head model, greedy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import trio

import fake_tp
from dllp2p import election
from dllp2p import wire as P
from dllp2p.config import Timeouts
from dllp2p.error_codes import ErrorCode
from dllp2p.formats.synthetic import write_random_llama
from dllp2p.generate import generate
from dllp2p.sampler import Sampler, SamplerConfig
from dllp2p.session import forwarding
from test_serve import CLI, KEY_FILE, ROOT_DIR, SPEC_8KV, Daemons, status, wait_members

# --- the generation loop resumed --------------------------------------------------------------------


class HistoryEngine:
    """A stand-in engine whose logits at a position are a function of every id up to it (as a KV cache
    makes them): a wrong position, a token missing from the prefill or one computed twice changes them."""

    ctx = 256
    vocab = 40

    def __init__(self):
        self.kv: list[int] = []

    def forward(self, tokens, start_pos):
        assert start_pos <= len(self.kv), "a hole in the KV cache"
        self.kv[start_pos:] = list(tokens)
        seed = hash(tuple(self.kv)) & 0xFFFFFFFF
        return np.random.default_rng(seed).standard_normal(self.vocab).astype(np.float32)


@pytest.mark.parametrize("cfg", [SamplerConfig(temperature=0.0),
                                 SamplerConfig(temperature=0.9, top_k=10, seed=7),
                                 SamplerConfig(temperature=1.2, top_k=0, top_p=0.9, repeat_penalty=1.3, seed=3)])
def test_a_resumed_generation_continues_the_uninterrupted_one(cfg):
    prompt = [1, 2, 3, 4, 5]
    whole = list(generate(HistoryEngine(), prompt, Sampler(cfg), 60))
    assert len(whole) == 60
    for k in (1, 17, 59):
        sampler = Sampler(cfg)
        sampler.advance(k)  # a fresh root's sampler, moved past the draws of the k tokens streamed already
        rest = list(generate(HistoryEngine(), prompt, sampler, 60, already=whole[:k]))
        assert rest == whole[k:], k


def test_the_sampler_advances_past_exactly_the_draws_of_the_tokens_it_did_not_sample():
    cfg = SamplerConfig(temperature=1.0, top_k=5, seed=11)
    logits = [np.random.default_rng(i).standard_normal(30).astype(np.float32) for i in range(20)]
    a = Sampler(cfg)
    drawn = [a(x) for x in logits]
    b = Sampler(cfg)
    b.advance(8)
    assert [b(x) for x in logits[8:]] == drawn[8:]


# --- membership: Left -------------------------------------------------------------------------------


def _m(node_id: str, started_at: float, port: int = 1) -> election.Member:
    return election.Member(node_id, f"127.0.0.1:{port}", started_at, 3, "c")


@pytest.mark.parametrize("left_at,kept", [(5.0, False), (6.0, False), (4.0, True)])
def test_left_removes_that_incarnation_whoever_vouches_for_it(left_at, kept):
    t = election.apply({}, election.Seen(_m("a", 1.0), "self", 0))
    t = election.apply(t, election.Seen(_m("b", 5.0, 2), "static", 0))
    t = election.apply(t, election.Seen(_m("b", 5.0, 2), "mdns", 0))
    t = election.apply(t, election.Left("b", left_at))
    assert ("b" in t) is kept  # an older incarnation's goodbye leaves a restarted node in
    assert "a" in election.apply(t, election.Left("a", 9.0))  # never this node itself


def test_a_goodbye_counts_only_from_the_host_its_member_is_at():
    from dllp2p.daemon.membership import Membership
    from dllp2p.discovery import StaticOptions

    m = Membership("me", "c", 1.0, StaticOptions())
    m.members = election.apply({}, election.Seen(_m("b", 5.0, 2), "static", 0))
    bye = P.Goodbye("b", 5.0, "SIGTERM")
    trio.run(m.heard_goodbye, bye, "10.0.0.9:5555")  # another member speaking for b
    assert not m._gone
    trio.run(m.heard_goodbye, bye, "127.0.0.1:40000")
    assert m._gone == {("b", 5.0)}


def test_the_drain_time_comes_from_file_env_and_flag(tmp_path):
    from dllp2p.cli import build_parser, daemon_config

    path = tmp_path / "config.toml"
    path.write_text("[daemon]\ndrain_s = 5\n")

    def cfg(argv, env):
        return daemon_config(build_parser().parse_args(["daemon", *argv]), {"DLLP2P_CONFIG": str(path), **env})

    assert cfg([], {}).drain_s == 5.0
    assert cfg([], {"DLLP2P_DRAIN_S": "7"}).drain_s == 7.0
    assert cfg(["--drain-s", "0"], {"DLLP2P_DRAIN_S": "7"}).drain_s == 0.0
    path.write_text("")
    assert cfg([], {}).drain_s == 30.0
    with pytest.raises(ValueError):
        cfg(["--drain-s", "-1"], {})


# --- forward's answer -------------------------------------------------------------------------------


async def _fake_root(answers, task_status=trio.TASK_STATUS_IGNORED):
    """A root on loopback (no key) that answers one Generate with `answers` (a number: sleep that long),
    then closes the connection."""
    from dllp2p.wire.link import TrioLink, receive_one_frame

    async def one(stream):
        await receive_one_frame(stream, "t", 5.0)
        link = TrioLink(stream, "t")
        for msg in answers:
            await (trio.sleep(msg) if isinstance(msg, float) else link.send(msg))
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    await trio.serve_listeners(one, listeners)


class Sink:
    peer = "client"

    def __init__(self):
        self.sent = []

    async def send(self, msg):
        self.sent.append(msg)


def _forward(answers, g):
    sink = Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            address = await nursery.start(_fake_root, answers)
            lost = await forwarding.forward(sink, g, address, "me", Timeouts(hello=5.0, build=5.0, progress=5.0))
            nursery.cancel_scope.cancel()
        return lost

    return trio.run(main), sink.sent


def test_forward_keeps_what_resuming_needs():
    g = P.Generate("", (1, 2), False, None, 50, 64, 0.0, 40, 1.0, 0.0, 1.0, None, already=(9,))
    chunks = [P.TokenChunk("a", (4,)), P.TokenChunk("bc", (5, 6))]
    lost, sent = _forward(chunks, g)  # the root's link closes mid-stream
    assert sent == chunks and lost.already == (9, 4, 5, 6) and not lost.left
    lost, sent = _forward([chunks[0], P.Error(ErrorCode.DRAINING, "stopping")], g)
    assert sent == chunks[:1] and lost.already == (9, 4) and lost.left  # the root stops: not relayed
    done = P.Done(2, 2, 0.0, 0.0, 1, "r", ())
    lost, sent = _forward([*chunks, done], g)
    assert lost is None and sent == [*chunks, done]
    lost, sent = _forward([P.TokenChunk("x")], g)  # a root that sends no ids: cannot be resumed, so it fails
    assert lost is None and sent[0] == P.TokenChunk("x") and isinstance(sent[1], P.Error)


# --- real daemons: the root killed or stopped mid-generation ----------------------------------------

STEPS = 400
PROMPT = "hello there"


class Client:
    """`dllp2p run --daemon ADDRESS` in a process, its stdout read as it comes (with the time of each read)."""

    def __init__(self, address: str, prompt: str = PROMPT, steps: int = STEPS):
        cmd = [*CLI, "run", "--temperature", "0", "--steps", str(steps), "--threads", "1", "--key-file", KEY_FILE,
               "--prompt", prompt, "--daemon", address, "--stats"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT_DIR)
        self.reads: list[tuple[float, bytes]] = []
        self.err = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: setattr(self, "err", self.p.stderr.read()), daemon=True).start()

    def _read(self) -> None:
        while data := os.read(self.p.stdout.fileno(), 4096):
            self.reads.append((time.monotonic(), data))

    def wait_output(self, chars: int, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while sum(len(d) for _, d in self.reads) < chars:
            assert self.p.poll() is None, self.p.stderr.read() if self.p.stderr else ""
            assert time.monotonic() < deadline, "no output"
            time.sleep(0.005)

    def finish(self) -> tuple[int, bytes, str]:
        rc = self.p.wait(120)
        time.sleep(0.1)
        return rc, b"".join(d for _, d in self.reads), self.err.decode()

    def pause_after(self, t: float) -> float:
        """The longest wait for text after time t (the pause a person sees)."""
        times = [t] + [at for at, _ in self.reads if at > t]
        return max(b - a for a, b in zip(times, times[1:]))


@pytest.fixture(scope="module")
def kv8(tmp_path_factory):
    path = write_random_llama(tmp_path_factory.mktemp("handover") / "kv8.gguf", SPEC_8KV)
    return path, _run("--local", "--model", str(path))


def _run(*args: str) -> bytes:
    """`dllp2p run`'s stdout as bytes (text mode would fold a generated \r into \n)."""
    p = subprocess.run([*CLI, "run", "--temperature", "0", "--steps", str(STEPS), "--threads", "1", "--key-file",
                        KEY_FILE, "--prompt", PROMPT, *args], capture_output=True, timeout=240, cwd=ROOT_DIR)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _three(tmp_path, model, *root_flags) -> Daemons:
    d = Daemons(tmp_path, 3, model=model)
    d.start(0, *root_flags)
    time.sleep(0.05)  # started first: the root
    d.start(1)
    d.start(2)
    for i in range(3):
        wait_members(d.address(i), 3)
    return d


@pytest.fixture(scope="module")
def smollm2(model_path):
    return model_path, _run("--local", "--model", str(model_path))


@pytest.mark.parametrize("model_fixture,how", [("kv8", "kill"), ("kv8", "sigterm"),
                                               pytest.param("smollm2", "kill", marks=pytest.mark.slow),
                                               pytest.param("smollm2", "sigterm", marks=pytest.mark.slow)])
def test_the_root_lost_mid_generation_costs_a_pause_not_the_answer(tmp_path, request, model_fixture, how):
    """The client talks to daemon 1; the root (daemon 0) is killed (-9) or stopped (SIGTERM, drain 0 s:
    the request is handed over at once) after some of the text: the complete output equals one node's,
    `run` exits 0; after the kill, a second request right away through daemon 2 (which may still count the dead
    root: then its forward fails, it drops the root and forwards to the new one) too. Sent / completed / failed
    counted."""
    model, want = request.getfixturevalue(model_fixture)  # the random 8-KV model, or SmolLM2
    d = _three(tmp_path, model, "--drain-s", "0")
    sent = completed = failed = 0
    try:
        client = Client(d.address(1))
        sent += 1
        client.wait_output(40)
        t_kill = time.monotonic()
        if how == "kill":
            d.kill(0)
        else:
            d.procs[0].send_signal(signal.SIGTERM)
        rc, out, err = client.finish()
        completed, failed = completed + (rc == 0 and out == want), failed + (rc != 0)
        assert rc == 0, err
        assert out == want
        assert "resumed after" in err, err
        print(f"{how}: the longest wait for text after the root's {how}: {client.pause_after(t_kill):.3f} s")
        if how == "sigterm":
            assert d.procs[0].wait(20) == 0
            assert any("says goodbye" in line for line in d.logs[1]), d.logs[1]
        if how == "kill":  # a prompt right after the death, through a daemon that did not see it happen
            sent += 1
            got = _run("--daemon", d.address(2))
            completed += got == want
            assert got == want
        assert status(d.address(2)).nodes[0].member.address == d.address(1)  # the new root
        seen = status(d.address(1))  # the handover, counted where it happened: the daemon the client talks to
        assert seen.recoveries == 1 and seen.last_recovery.cause.startswith("root "), seen.last_recovery
        assert seen.last_recovery.replayed > 0 and seen.last_recovery.pause_s > 0
    finally:
        d.stop_all()
    assert (sent, completed, failed) == ((2, 2, 0) if how == "kill" else (1, 1, 0))


def test_a_client_whose_daemon_goes_away_mid_stream_asks_again_with_the_ids_it_has():
    """wire.client.ask against a daemon stand-in: the first Generate is answered with two chunks and then
    the connection drops (a root killed; the client talked to it directly); the client asks again (after
    a refused connection: the daemon restarting) with Generate.already = the ids it got, and the text
    goes on. A stand-in that sends text without ids is not asked again."""
    import socket

    from dllp2p.wire.client import DaemonError, ask_blocking

    def serve(server, script, asked):
        for answers in script:
            conn, _ = server.accept()
            with conn:
                data = conn.recv(1 << 16)
                msg = P.decode_body(*_split(data))
                asked.append(msg)
                for a in answers:
                    conn.sendall(P.encode(a))

    g = P.Generate("hi", (), False, None, 10, 64, 0.0, 40, 1.0, 0.0, 1.0, None)
    status = P.StatusReply(0, "x", (), None, None, 0)
    done = P.Done(1, 4, 0.0, 0.0, 1, "x", ())
    for ids, want_text, resumed in [((True, True), "abcd", True), ((False, True), "ab", False)]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            asked: list = []
            first = [P.TokenChunk("a", (1,) if ids[0] else ()), P.TokenChunk("b", (2,) if ids[1] else ())]
            script = [[status], first, [P.TokenChunk("cd", (3, 4)), done]]
            t = threading.Thread(target=serve, args=(server, script, asked), daemon=True)
            t.start()
            texts: list[str] = []
            address = f"127.0.0.1:{server.getsockname()[1]}"
            if resumed:
                assert ask_blocking(address, g, texts.append) == done
                assert asked[2].already == (1, 2) and asked[1].already == ()
            else:
                with pytest.raises(DaemonError):
                    ask_blocking(address, g, texts.append)
            assert "".join(texts) == want_text
            t.join(1)


def _split(data: bytes):
    """A plain frame -> (type, body) for P.decode_body."""
    from dllp2p.wire.codec import HEADER, HEADER_SIZE

    _, _, msg_type, n = HEADER.unpack(data[:HEADER_SIZE])
    return msg_type, data[HEADER_SIZE:HEADER_SIZE + n]


@pytest.mark.parametrize("limit,answered", [(5.0, "done"), (0.0, "draining")])
def test_draining_lets_a_request_finish_within_the_limit_and_hands_back_the_rest(limit, answered):
    """PromptSlot.drain with a stand-in root service whose request takes 0.3 s: within the limit it ends
    with its own answer; past it (0 s) with DRAINING, which a forwarding daemon resumes elsewhere. A
    request arriving meanwhile is refused with DRAINING at once."""
    from types import SimpleNamespace

    from dllp2p.daemon.prompts import PromptSlot

    me = _m("me", 1.0)

    class Root:
        handed_over = print

        async def prompt_ids(self, link, g):
            return [1, 2]

        async def serve_batched(self, link, g, workers, ids):
            return False  # served in the prompt slot, as a root with workers serves

        async def serve(self, link, g, workers, ids, already=()):
            await trio.sleep(0.3)
            await link.send("done")

    membership = SimpleNamespace(election=lambda: election.elect([me], version=3, cluster="c"))
    g = P.Generate("hi", (), False, None, 4, 64, 0.0, 40, 1.0, 0.0, 1.0, None)
    first, second = Sink(), Sink()

    async def main():
        slot = PromptSlot("me", membership, Root(), trio.Lock(), Timeouts())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slot.generate, first, g)
            await trio.sleep(0.05)
            nursery.start_soon(slot.drain, limit)
            await trio.sleep(0.01)
            await slot.generate(second, g)

    trio.run(main)
    got = first.sent[0] if answered == "done" else first.sent[0].kind
    assert got == (answered if answered == "done" else ErrorCode.DRAINING) and len(first.sent) == 1
    assert [m.kind for m in second.sent] == [ErrorCode.DRAINING]


def test_draining_ends_a_request_it_forwards_too():
    """A daemon stopping while it relays a request to the root: past the drain time the client gets the
    text so far and DRAINING (`dllp2p run` asks again; the HTTP API answers 503), not a cut stream."""
    from types import SimpleNamespace

    from dllp2p.daemon.prompts import PromptSlot

    g = P.Generate("hi", (), False, None, 4, 64, 0.0, 40, 1.0, 0.0, 1.0, None)
    sink = Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            address = await nursery.start(_fake_root, [P.TokenChunk("a", (1,)), 30.0])
            root = election.Member("root", address, 0.5, 3, "c")
            membership = SimpleNamespace(election=lambda: election.elect([root, _m("me", 1.0)], version=3, cluster="c"))
            slot = PromptSlot("me", membership, SimpleNamespace(handed_over=print), trio.Lock(), Timeouts())
            nursery.start_soon(slot.generate, sink, g)
            await trio.sleep(0.3)
            with trio.fail_after(10):
                await slot.drain(0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sink.sent[0] == P.TokenChunk("a", (1,)) and sink.sent[1].kind is ErrorCode.DRAINING and len(sink.sent) == 2
