"""Issue 16's findings about what peers send, replayed against a live daemon, and a fuzzer of valid-shaped
but hostile Sessions, Plans and Steps (hypothesis) and of random bytes.

The daemon is a subprocess (a crash or an OOM kill is seen as its exit, its RSS is its own) serving
SmolLM2 on loopback with its own port, cluster name, state, JIT cache and cluster key (the attacker holds
the key: a member's bugs are still worth defending against). After each batch: it is alive, its answer to a
legitimate prompt equals a local engine's greedy text, and its peak RSS (/proc/PID/status VmHWM) is within
RSS_SLACK of its peak after its first prompt. Bounded: small example counts, seconds-long timeouts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_tp
from dllp2p.engine import MAX_TOP
from dllp2p.formats import ModelConfig
from dllp2p.formats.quant import QType
from dllp2p.scheduler import Peer, PlanError, plan
from dllp2p.session.checks import expected_shape
from dllp2p.wire import codec, limits
from dllp2p.wire.client import GenerateCall, ask_status
from dllp2p.wire.link import LinkClosed, LinkTimeout, TrioLink, open_link
from dllp2p.wire.messages import (PROTOCOL_VERSION, Done, Error, Generate, Hello, Need, Session, SliceInfo, Step,
                                  Stop, TokenChunk)

KEY = fake_tp.TEST_KEY
CTX = 64
PROMPT = "The capital of France is"
STEPS = 6
RSS_SLACK = 128 << 20  # bytes the daemon's peak RSS may grow past its peak of the first prompt, whatever it is sent
ROOT_DIR = Path(__file__).parent.parent

LAUNCH = """
import logging, sys
from pathlib import Path
import trio
from dllp2p import clusterkey
from dllp2p.config import Timeouts
from dllp2p.daemon import Daemon, DaemonConfig
state, model, key_file, cluster = sys.argv[1:5]
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
t = Timeouts(hello=3, idle=20, transfer=5, mesh=3, build=120, socket=5, slot=2, send=2)
cfg = DaemonConfig("127.0.0.1", 0, 1, Path(state), timeouts=t, cluster=cluster, model=Path(model),
                   key=clusterkey.load(Path(key_file)), cache_dir=Path(state) / "cache")
try:
    trio.run(Daemon(cfg).serve)
except KeyboardInterrupt:
    pass
"""


class Live:
    def __init__(self, tmp: Path, model: Path):
        self.cache = tmp / "state" / "cache"
        key_file = fake_tp.write_key(tmp)
        env = {**os.environ, "DLLP2P_CACHE_DIR": str(self.cache), "HOME": str(tmp)}
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp / "state"), str(model), str(key_file),
                                      "fuzz-" + secrets.token_hex(4)], stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT_DIR, env=env)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 60
        while not (m := next((re.search(r"listening on (\S+:\d+)", x) for x in self.log
                              if "listening on" in x), None)):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.05)
        self.address = m.group(1)
        self.node_id = trio.run(ask_status, self.address, 5.0, 0, KEY).node_id
        self.expected = ""
        self.rss_bound = 0

    def rss(self, field: str = "VmRSS") -> int:
        """Bytes resident now (VmRSS), or at the most so far (VmHWM)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def legit(**kw) -> Generate:
    fields = dict(prompt=PROMPT, tokens=(), chat=False, system=None, steps=STEPS, ctx=CTX, temperature=0.0,
                  top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=None)
    return Generate(**{**fields, **kw})


async def ask(address: str, g: Generate, timeout: float = 120) -> tuple[str, Done | Error]:
    call = await GenerateCall.open(address, g, 10, KEY)
    text = []
    try:
        while True:
            msg = await call.receive(timeout)
            if isinstance(msg, TokenChunk):
                text.append(msg.text)
            else:
                return "".join(text), msg
    finally:
        await call.aclose()


def local_greedy(model_path: Path, cache: Path) -> str:
    from dllp2p.formats import load_model
    from dllp2p.generate import generate
    from dllp2p.jit.engine import JITEngine
    from dllp2p.sampler import Sampler, SamplerConfig
    from dllp2p.tokenizer import StreamDecoder, Tokenizer

    model = load_model(model_path)
    tok = Tokenizer.from_metadata(model.metadata)
    engine = JITEngine(model, CTX, 1, cache_dir=cache)  # the daemon's cache: compiled once
    try:
        dec = StreamDecoder(tok)
        ids = tok.encode(PROMPT)
        text = "".join(dec.push(t) for t in generate(engine, ids, Sampler(SamplerConfig(temperature=0)), STEPS,
                                                     tok.eos_ids))
        return text + dec.flush()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_path):
    d = Live(tmp_path_factory.mktemp("fuzz"), model_path)
    try:
        text, done = trio.run(ask, d.address, legit())
        assert isinstance(done, Done), (done, "".join(d.log))
        d.expected = local_greedy(model_path, d.cache)
        assert text == d.expected
        d.rss_bound = d.rss("VmHWM") + RSS_SLACK
        yield d
        served = list(d.log)  # what it logged while serving (not its interrupted shutdown)
    finally:
        d.stop()
    assert not any("Traceback" in line for line in served), "".join(served)


def healthy(d: Live) -> None:
    """Alive, answering a legitimate prompt with the local engine's text, RSS within its bound."""
    assert d.proc.poll() is None, f"the daemon exited ({d.proc.returncode}):\n{''.join(d.log[-30:])}"
    text, done = trio.run(ask, d.address, legit())
    assert isinstance(done, Done) and text == d.expected, (text, done)
    assert d.rss("VmHWM") <= d.rss_bound, f"peak RSS {d.rss('VmHWM') >> 20} MiB over the bound {d.rss_bound >> 20} MiB"


# --- a session's messages ------------------------------------------------------------------------


TINY = ModelConfig("llama", 64, 1, 2, 2, 32, 128, 4_194_304, 64, 10000.0, 32, 1e-5, True)
FAKE_SHA = "ab" * 32


def session(d: Live, config: ModelConfig, ctx: int, slices=None, epoch: int = 1, others=()) -> Session:
    peers = [Peer("fuzz-root", "", 1, 1.0), Peer(d.node_id, d.address, 1, 9.0), *others]
    p = plan(config, peers, epoch, "pow2")
    if slices is None:
        node = p.nodes[1]
        slices = tuple(SliceInfo(name, name, int(QType.Q8_0 if len(shape) > 1 else QType.F32), shape, f"{i:064x}")
                       for i, name in enumerate(("token_embd.weight", "output_norm.weight"))
                       if (shape := expected_shape(name, config, node, p.exchange)))
    return Session(p, config, ctx, slices)


async def as_root(address: str, *msgs, answers: int = 1, timeout: float = 10) -> list:
    """Hello as a root, then msgs; -> what came back (Errors, Need, ...) until `answers` or the connection ends."""
    link = await open_link(address, 5, KEY)
    got = []
    try:
        await link.send(Hello(PROTOCOL_VERSION, "fuzz-root", "root", 1, 1.0))
        assert isinstance(await link.receive(5), Hello)
        for m in msgs:
            await link.send(m)
        while len(got) < answers:
            got.append(await link.receive(timeout))
            if isinstance(got[-1], Need):
                await link.send(Stop(got[-1].epoch, "fuzz"))
    except (LinkClosed, LinkTimeout):
        pass
    finally:
        await link.aclose()
    return got


def test_a_vocabulary_claim_the_slices_do_not_hold_is_refused_and_its_step_never_runs(live):
    """The remote crash: a 4,194,304-token vocabulary with 512-row embedding slices, then token 4194303."""
    s = session(live, TINY, 16, (SliceInfo("token_embd.weight", "x", int(QType.Q8_0), (512, 64), FAKE_SHA),))
    got = trio.run(lambda: as_root(live.address, s, Step(1, 0, (4_194_303,), 0), answers=2))
    assert isinstance(got[0], Error) and got[0].code == "plan" and "token_embd.weight" in got[0].message, got
    assert all(isinstance(g, Error) for g in got), got  # the Step: no session is running
    healthy(live)


def test_a_context_beyond_the_local_maximum_and_memory_is_refused_before_allocating(live):
    big = ModelConfig("llama", 64, 1, 2, 2, 32, 128, 1024, 1 << 24, 10000.0, 32, 1e-5, True)
    before = live.rss()
    got = trio.run(lambda: as_root(live.address, session(live, big, 1 << 24)))
    assert isinstance(got[0], Error) and got[0].code == "plan" and "ctx 16777216" in got[0].message, got
    many_layers = ModelConfig("llama", 4096, 1000, 32, 32, 128, 14336, 1024, 1 << 20, 10000.0, 128, 1e-5, True)
    got = trio.run(lambda: as_root(live.address, session(live, many_layers, 1 << 20)))  # 2^20 ctx, 250 GB of KV
    assert isinstance(got[0], Error) and "available" in got[0].message, got
    assert live.rss() < before + (64 << 20)
    healthy(live)


def test_a_plan_cannot_make_the_worker_dial_hosts_outside_the_cluster(live):
    """The port scanner: a plan whose later nodes are at addresses the worker does not know."""
    config = ModelConfig("llama", 128, 1, 4, 4, 32, 256, 1024, 64, 10000.0, 32, 1e-5, True)
    others = (Peer("scan-a", "192.0.2.1:22", 1, 2.0), Peer("scan-b", "192.0.2.1:80", 1, 1.0))
    s = session(live, config, 16, others=others)
    assert s.plan.n_nodes == 4 and s.plan.node(live.node_id).index == 1
    got = trio.run(lambda: as_root(live.address, s))
    assert isinstance(got[0], Error) and got[0].code == "plan" and "192.0.2.1" in got[0].message, got
    healthy(live)


async def raw_frames(address: str, *frames: bytes, read: bool = True) -> list:
    """After the handshake, these bytes as they are (sealed); -> the answers until the daemon closes."""
    link = await open_link(address, 5, KEY)
    got = []

    async def send():
        try:
            for f in frames:
                await link.send_frame(f)
        except LinkClosed:
            pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                while read:
                    got.append(await link.receive(10))
            except (LinkClosed, LinkTimeout, codec.ProtocolError) as e:
                got.append(e)
    finally:
        await link.aclose()
    return got


def frame(msg_type: int, body: bytes, length: int | None = None) -> bytes:
    return codec.HEADER.pack(codec.MAGIC, PROTOCOL_VERSION, msg_type, len(body) if length is None else length) + body


def test_oversized_claims_and_empty_maps_are_refused_within_the_rss_bound(live):
    empty_maps = lambda n: b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n  # an array of n empty maps
    hello = codec.encode(Hello(PROTOCOL_VERSION, "fuzz-root", "root", 1, 1.0))
    cases = [
        frame(codec.MsgType.SESSION, empty_maps(8 << 20)),  # 8 MiB: over a Session's limit, refused at the header
        frame(codec.MsgType.STATUS, b"", length=64 << 20),  # a 64 MiB claim, no body
        frame(codec.MsgType.GENERATE, empty_maps((1 << 20) - 5)),  # at a first frame's limit: counted, refused
        frame(200, b"\x00" * 1000, length=60 << 20),  # an unknown type's 60 MiB claim
    ]
    for case in [(c,) for c in cases] + [(hello, frame(codec.MsgType.WEIGHT_CHUNK, empty_maps(4 << 20)))]:
        logged = len(live.log)
        got = trio.run(raw_frames, live.address, *case)
        # the Error frame, or a reset: the daemon closed the connection while the rest was still being sent
        assert isinstance(got[-1], LinkClosed), got
        assert all(isinstance(g, Error) and g.code in ("too_large", "malformed_frame") for g in got[:-1]
                   if not isinstance(g, Hello)), got
        time.sleep(0.2)
        assert any(re.search(r"(over the|not valid msgpack).*closing the connection", x) for x in live.log[logged:]), \
            live.log[logged:]
    healthy(live)


def test_partial_large_frames_are_bounded_by_the_budget(live):
    """Connections that announce weight chunks, send most of them and stop: the budget refuses the rest."""
    hello = codec.encode(Hello(PROTOCOL_VERSION, "fuzz-root", "root", 1, 1.0))
    n = limits.BUFFERED.total // limits.MAX_BODY[codec.MESSAGE_TYPES[codec.MsgType.WEIGHT_CHUNK]] + 4

    async def main():
        links = []
        refused = 0
        for _ in range(n):
            link = await open_link(live.address, 5, KEY)
            links.append(link)
            await link.send_frame(hello)
            await link.receive(5)
            part = frame(codec.MsgType.WEIGHT_CHUNK, b"\x00" * (4 << 20), length=(4 << 20) + 100)
            try:
                await link.send_frame(part)
            except LinkClosed:  # refused at the header: closed while the rest was being sent
                refused += 1
        await trio.sleep(0.5)
        assert sum("budget of partial large frames is spent" in x for x in live.log) >= refused
        rss = live.rss()
        await trio.to_thread.run_sync(healthy, live)  # while they are held
        for link in links:
            await link.aclose()
        return refused, rss

    refused, rss = trio.run(main)
    assert refused >= 3, refused
    assert rss <= live.rss_bound
    healthy(live)


def test_many_idle_connections_are_capped_and_prompts_still_run(live):
    from dllp2p.daemon import node

    async def main():
        links, answered = [], 0
        for _ in range(node.MAX_PER_HOST + 40):
            try:
                link = await open_link(live.address, 5, KEY)
            except (LinkClosed, LinkTimeout, OSError):
                continue
            links.append(link)
            try:
                await link.send(codec.MESSAGE_TYPES[codec.MsgType.STATUS](0))
                await link.receive(5)
                answered += 1
            except (LinkClosed, LinkTimeout):
                pass
        fds = live.fds()
        for link in links:
            await link.aclose()
        return answered, fds

    answered, fds = trio.run(main)
    assert answered <= node.MAX_PER_HOST, answered
    assert fds < node.MAX_PER_HOST + 40, fds
    healthy(live)


def test_a_client_that_stops_reading_does_not_hold_the_prompt_slot(live):
    """The replay: a client with a tiny receive buffer sends a Generate and never reads. At this context
    its whole answer fits the sockets' buffers, so this shows the next prompt is served meanwhile; the send
    timeout that drops a reader whose buffers are full is test_limits' (a socketpair)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = live.address.rsplit(":", 1)
    sock.connect((host, int(port)))

    async def main():
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        from dllp2p.wire.link import secure_dial
        channel = await secure_dial(stream, KEY, live.address, 5)
        await TrioLink(stream, live.address, channel=channel).send(legit(steps=CTX - 8, prompt=PROMPT * 2))
        t0 = time.monotonic()
        await trio.to_thread.run_sync(healthy, live)  # the slot is not held for 10 minutes
        return time.monotonic() - t0

    assert trio.run(main) < 60
    sock.close()


def test_a_prompt_is_tokenized_and_refused_outside_the_prompt_slot(live):
    """While a worker session holds the slot (waiting for its weights, up to the 5 s transfer timeout), a
    prompt of ~5,000 tokens for a 1,024-token context is tokenized and refused at once, not after the slot."""
    config = ModelConfig("llama", 64, 1, 2, 2, 32, 128, 1024, 64, 10000.0, 32, 1e-5, True)

    async def main():
        link = await open_link(live.address, 5, KEY)
        try:
            await link.send(Hello(PROTOCOL_VERSION, "fuzz-root", "root", 1, 1.0))
            await link.receive(5)
            await link.send(session(live, config, 16))
            need = await link.receive(5)
            assert isinstance(need, Need), need  # the session holds the slot now
            t0 = time.monotonic()
            text, answer = await ask(live.address, legit(ctx=1024, prompt="hello " * 5000))
            elapsed = time.monotonic() - t0
            await link.send(Stop(need.epoch, "fuzz"))
        finally:
            await link.aclose()
        return answer, elapsed

    answer, elapsed = trio.run(main)
    assert isinstance(answer, Error) and answer.code == "context_length_exceeded", answer
    assert elapsed < 4, elapsed
    healthy(live)


def test_huge_token_ids_and_long_prompts_get_a_clear_error(live):
    for tokens in ((2**63,), (2**64 - 1,), ((1 << 31) - 1,), (49151, 49152), (0,) * (CTX + 1)):
        g = {f.name: getattr(legit(), f.name) for f in dataclasses.fields(Generate)}
        g["tokens"], g["prompt"] = list(tokens), ""  # as a peer may send it: not through Generate's own checks
        body = msgpack.packb({k: list(v) if isinstance(v, tuple) else v for k, v in g.items()})
        got = trio.run(raw_frames, live.address, frame(codec.MsgType.GENERATE, body))
        assert isinstance(got[0], Error), got
        assert got[0].code in ("invalid_token", "context_length_exceeded", "malformed_frame"), got
        assert "token id" in got[0].message or "context" in got[0].message, got
    for ctx in (1 << 24, 8193):  # over SmolLM2's 8192 positions: refused before allocating a KV cache
        text, answer = trio.run(ask, live.address, legit(ctx=ctx))
        assert isinstance(answer, Error) and answer.code == "context_length_exceeded" and "ctx" in answer.message
    t0 = time.monotonic()
    text, answer = trio.run(ask, live.address, legit(prompt="x" * ((1 << 20) - 200)))
    assert isinstance(answer, Error) and answer.code == "context_length_exceeded", answer
    assert time.monotonic() - t0 < 5  # refused before tokenizing
    healthy(live)


# --- hypothesis: valid-shaped, hostile ----------------------------------------------------------------

sizes = st.one_of(st.integers(1, 8), st.sampled_from([32, 64, 128, 512, 4096, 1 << 16, 1 << 22, 1 << 30, 2**62]))


@st.composite
def hostile_sessions(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8, 1 << 12]))
    kv = draw(st.sampled_from([1, heads]))
    head_dim = draw(st.sampled_from([32, 64, 2048]))
    config = ModelConfig("llama", draw(st.sampled_from([32, 64, 96, 4096, 1 << 20])), draw(sizes), heads, kv,
                         head_dim, draw(st.sampled_from([64, 128, 1 << 24])), draw(sizes),
                         draw(st.sampled_from([64, 4096, 1 << 24, 2**40])), 10000.0, 32, 1e-5, draw(st.booleans()))
    ctx = draw(st.integers(1, config.context_length))
    shape = draw(st.tuples(st.sampled_from([1, 32, 512, 1 << 20]), st.sampled_from([32, 64, 1 << 16])))
    names = draw(st.lists(st.sampled_from(["token_embd.weight", "output.weight", "output_norm.weight",
                                           "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.999999.attn_k.weight"]),
                          min_size=1, max_size=3, unique=True))
    qtype = draw(st.sampled_from([QType.Q8_0, QType.Q4_0, QType.F32]))
    slices = tuple(SliceInfo(n, n, int(qtype), shape, FAKE_SHA) for n in names)
    mutation = draw(st.one_of(st.none(), st.tuples(st.sampled_from(["vocab_rows", "ffn_rows", "dim_rows", "kv_heads",
                                                                    "q_heads"]),
                                                   st.tuples(st.integers(0, 1 << 22), st.integers(0, 1 << 22)))))
    step = Step(1, draw(st.integers(0, 3)), tuple(draw(st.lists(st.integers(0, (1 << 31) - 1), min_size=1, max_size=4))),
                draw(st.integers(0, 2**62)), draw(st.integers(0, MAX_TOP)))
    return config, ctx, slices, step, mutation


SENT: list[Session] = []  # the hostile sessions that were sent (had a plan)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(example=hostile_sessions())
def test_hostile_sessions_plans_and_steps(live, example):
    config, ctx, slices, step, mutation = example
    try:
        s = session(live, config, ctx, slices)
    except (PlanError, ValueError):
        return  # no plan for it: nothing a root could send
    SENT.append(s)
    if mutation is not None and s.plan.n_nodes > 1:  # a worker range changed, as raw msgpack past Plan's checks
        wire = codec._to_wire(s, Session, "Session")
        wire["plan"]["nodes"][1][mutation[0]] = list(mutation[1])
        hello = codec.encode(Hello(PROTOCOL_VERSION, "fuzz-root", "root", 1, 1.0))
        got = trio.run(raw_frames, live.address, hello, frame(codec.MsgType.SESSION, msgpack.packb(wire)))
        assert isinstance(got[0], Hello) and all(isinstance(g, (Error, Need, LinkClosed)) for g in got[1:]), got
        assert any(isinstance(g, Error) for g in got[1:]), got
    got = trio.run(lambda: as_root(live.address, s, step, answers=2, timeout=5))
    assert live.proc.poll() is None, "".join(live.log[-30:])
    assert got and all(isinstance(g, (Error, Need)) for g in got), got


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.binary(max_size=512), msg_type=st.integers(0, 255), sealed=st.booleans())
def test_random_bytes(live, body, msg_type, sealed):
    if sealed:
        trio.run(lambda: raw_frames(live.address, frame(msg_type, body), read=False))
    else:
        host, port = live.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(frame(msg_type, body))
    assert live.proc.poll() is None, "".join(live.log[-30:])


def test_after_the_fuzzers_the_daemon_still_answers_correctly(live):
    assert len(SENT) >= 10, f"only {len(SENT)} hostile sessions had a plan"  # the fuzzer reached the worker
    healthy(live)
    print(f"after the first prompt: peak RSS {(live.rss_bound - RSS_SLACK) >> 20} MiB; after the fuzzers: "
          f"RSS {live.rss() >> 20} MiB, peak {live.rss('VmHWM') >> 20} MiB (bound {live.rss_bound >> 20} MiB), "
          f"{live.fds()} fds")
