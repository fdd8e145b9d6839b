"""The root side over loopback: plans over real worker daemons, weight push and cache, the mesh, steps,
and a worker lost mid-generation. Fast tests use tests/fake_tp.py as the compute module (daemons in
threads, or as processes to kill); the slow one runs SmolLM2 on 2 nodes with `dllp2p daemon`.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import trio

import fake_tp
from dllp2p import wire as P
from dllp2p.cli import build_parser, run_config
from dllp2p.session.progress import Note, Progress, ignore
from dllp2p.session.root import ClusterEngine, ClusterError, ClusterOptions
from dllp2p.config import Timeouts
from dllp2p.daemon import Daemon, DaemonConfig
from dllp2p.scheduler import PlanError

T = Timeouts(hello=3, idle=10, transfer=5, mesh=3, build=10, socket=3, slot=2)
TESTS = Path(__file__).parent
ROOT_DIR = TESTS.parent


class DaemonThread:
    """A worker daemon on its own trio loop in a thread (the root's set-up runs trio.run itself)."""

    def __init__(self, state_dir: Path):
        self.daemon = Daemon(DaemonConfig("127.0.0.1", 0, 1, state_dir, timeouts=T, cluster=fake_tp.TEST_CLUSTER,
                                          key=fake_tp.TEST_KEY), tp=fake_tp)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "daemon did not start"

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.address = await nursery.start(self.daemon.serve)
            self._scope, self._token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
            self._ready.set()

    def stop(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def daemons(tmp_path):
    started: list[DaemonThread] = []

    def start(n: int, name: str = "w") -> list[DaemonThread]:
        new = [DaemonThread(tmp_path / f"{name}{len(started) + i}") for i in range(n)]
        started.extend(new)
        return new

    yield start
    for d in started:
        if d._thread.is_alive():
            d.stop()


def connect(addresses, model=None, policy="pow2", events=None, key=fake_tp.TEST_KEY) -> ClusterEngine:
    options = ClusterOptions(tuple(addresses), policy, T, key=key)
    return ClusterEngine.connect(model or fake_tp.model(), options, 32, 1, tp=fake_tp,
                                 events=events if events is not None else ignore)


def generate(engine: ClusterEngine, model, steps: int = 6) -> list[int]:
    """Greedy, checking every step's token against what the fake computes from all nodes' weights."""
    tokens, pos = [5, 7, 11], 0
    out = []
    for _ in range(steps):
        logits = engine.forward(tokens, pos)
        want = fake_tp.expected_token(model, engine.plan, tokens, pos)
        assert int(np.argmax(logits)) == want
        pos += len(tokens)
        tokens = [want]
        out.append(want)
    return out


def wait_idle(d: DaemonThread, sessions: int, limit: float = 5.0) -> None:
    """Until the daemon has ended `sessions` sessions and holds none."""
    import time

    deadline = time.monotonic() + limit
    while d.daemon.worker.sessions < sessions or d.daemon.worker.active is not None:
        assert time.monotonic() < deadline, "the worker did not return to idle"
        time.sleep(0.02)


# --- in-process daemons ---


def test_pow2_and_weighted_plans_over_two_workers(daemons):
    a, b = daemons(2)
    events = []
    e = connect([a.address, b.address], events=events.append)  # 4 KV heads, 3 peers: pow2 takes 2 nodes
    notes = [x.text for x in events if isinstance(x, Note)]
    assert e.plan.n_nodes == 2 and any("is not needed by the pow2 plan of 2 nodes" in n for n in notes), notes
    # progress as events: the one worker's push from 0 to all of its bytes, both nodes' builds started and ended
    pushes = [x for x in events if isinstance(x, Progress) and x.task == "push"]
    assert pushes[0].done == 0 and pushes[-1].finished and len({x.subject for x in pushes}) == 1
    assert [x.done for x in pushes] == sorted(x.done for x in pushes)
    builds = {(x.subject, x.done) for x in events if isinstance(x, Progress) and x.task == "build"}
    assert len(builds) == 4 and {("root", 0), ("root", 1)} <= builds
    generate(e, fake_tp.model())
    e.close()
    e.close()
    e = connect([a.address, b.address], policy="weighted")
    assert e.plan.n_nodes == 3 and {n.address for n in e.plan.nodes[1:]} == {a.address, b.address}
    generate(e, fake_tp.model(), steps=10)
    e.close()
    assert e.stats.nodes == 3 and len(e.stats.steps) == 10
    lines = e.stats_summary()
    assert lines[0].startswith("cluster of 3 nodes (weighted plan, exact exchange)")
    assert re.search(r"decode per token \(9 tokens\): [\d.]+ ms, inference [\d.]+ ms, sync [\d.]+ ms; "
                     r"sent 0\.1 kB, received 0\.1 kB", lines[2]), lines
    with pytest.raises(ClusterError, match="closed"):
        e.forward([1], 0)


def test_a_session_serves_a_second_request_from_position_zero(daemons):
    """What a root daemon's kept session does: after fresh_request() the same engine generates again
    from position 0, the same tokens, with statistics of the new request only."""
    a, b = daemons(2)
    e = connect([a.address, b.address])
    model = fake_tp.model()
    first = generate(e, model)
    e.fresh_request()
    assert e.stats.steps == [] and e.stats.kept
    assert generate(e, model) == first
    assert len(e.stats.steps) == 6
    assert e.stats_summary()[0].endswith("session kept from the last request (weights pushed 0.0 MB, set-up 0.00 s)")
    e.close()


def test_restarted_worker_with_a_warm_cache_receives_no_weight_bytes(daemons, tmp_path):
    model = fake_tp.model(big=True)  # one slice over a 4 MiB chunk
    [a] = daemons(1)
    e = connect([a.address], model)
    first = e.stats.pushed_bytes
    sizes = sum(t.data.nbytes for t in fake_tp.node_tensors(model, e.plan, 1).values())
    assert first == sizes > 4 << 20 and e.stats.cached_slices == 0
    generate(e, model, steps=2)
    e.close()
    a.stop()
    again = DaemonThread(a.daemon.config.state_dir)  # same state dir, another port
    try:
        assert again.daemon.node_id == a.daemon.node_id and again.address != a.address
        e = connect([again.address], model)
        assert e.stats.pushed_bytes == 0 and e.stats.cached_slices == 4
        generate(e, model, steps=2)
        e.close()
    finally:
        again.stop()


def test_workers_return_to_idle_for_the_next_plan(daemons):
    a, b = daemons(2)
    for n in range(1, 4):
        e = connect([a.address, b.address], policy="weighted")
        generate(e, fake_tp.model(), steps=2)
        e.close()
        wait_idle(a, n)
        wait_idle(b, n)


def test_the_same_worker_twice_is_a_plan_error(daemons):
    [a] = daemons(1)
    with pytest.raises(PlanError, match="duplicate node ids"):
        connect([a.address, a.address])
    wait_idle(a, 0)
    e = connect([a.address])  # nothing was left half set up
    e.close()


def test_unreachable_worker_is_named():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError, match=f"worker 127.0.0.1:{port}: cannot connect to 127.0.0.1:{port}"):
        connect([f"127.0.0.1:{port}"])


def test_worker_of_another_protocol_version_is_named():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION + 1, P.MsgType.HELLO, 0))
            conn.recv(1 << 16)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(ClusterError, match=f"worker 127.0.0.1:{port}: peer speaks dllp2p protocol version "
                                               f"{P.PROTOCOL_VERSION + 1}, this node speaks version {P.PROTOCOL_VERSION}"):
            connect([f"127.0.0.1:{port}"], key=None)  # plain frames: a daemon without a key, on this machine
    finally:
        t.join(5)
        server.close()


# --- worker processes ---


# `dllp2p daemon` as a test worker: hermetic (no mDNS, no HTTP API, the tests' own cluster name)
DAEMON = [sys.executable, "-m", "dllp2p.cli", "daemon", "--no-discovery", "--api", "off", "--cluster", fake_tp.TEST_CLUSTER,
          "--plan", "pow2"]  # no figures to measure (`--plan auto`, the default, measures this machine once)


def start_worker(state_dir: Path, *command: str) -> tuple[subprocess.Popen, str]:
    """A worker daemon process; -> (process, its "host:port") read from its log's first line."""
    cmd = list(command) or [sys.executable, str(TESTS / "fake_tp.py")]
    p = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir)],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
    line = p.stderr.readline()
    m = re.search(r"node (\S+) listening on (\S+)", line)
    if not m:
        p.kill()
        pytest.fail(f"worker did not start: {line}{p.stderr.read()}")
    threading.Thread(target=p.stderr.read, daemon=True).start()  # keep draining its log
    return p, m.group(2)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_killed_worker_is_named_and_the_survivor_returns_to_idle(tmp_path):
    (p1, a1), (p2, a2) = start_worker(tmp_path / "w1"), start_worker(tmp_path / "w2")
    try:
        model = fake_tp.model()
        e = connect([a1, a2], model, policy="weighted")
        victim = next(n for n in e.plan.nodes if n.address == a2)
        generate(e, model, steps=3)
        p2.kill()
        p2.wait(5)
        with pytest.raises(ClusterError) as info:
            generate(e, model, steps=3)
        assert f"worker {a2} (node {victim.node_id}) was lost" in str(info.value)
        e = connect([a1], model)  # the survivor is idle again, ready for a new plan
        generate(e, model, steps=2)
        e.close()
    finally:
        stop(p1)
        stop(p2)


def test_dllp2p_daemon_command_survives_an_engine_failure_and_stops_on_ctrl_c(tmp_path):
    p, address = start_worker(tmp_path / "d", *DAEMON, "--threads", "1", "--key-file", str(fake_tp.write_key(tmp_path)))
    try:
        node_id = (tmp_path / "d" / "node_id").read_text().strip()
        # the root's fake slices are not a model the real engine can build: the worker says so, stays up
        with pytest.raises(ClusterError, match=f"worker {address} \\(node {node_id}\\): node {node_id}: KeyError"):
            connect([address])
        with pytest.raises(ClusterError, match="KeyError"):
            connect([address])
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 130


def test_cli_run_options():
    ns = build_parser().parse_args(["run", "--prompt", "x", "--workers", "10.0.0.2:7340", "[::1]:7", "--plan",
                                    "weighted", "--stats"])
    cfg = run_config(ns)
    assert (cfg.workers, cfg.plan, cfg.stats, cfg.exchange) == (("10.0.0.2:7340", "[::1]:7"), "weighted", True, "exact")
    ns = build_parser().parse_args(["run", "--prompt", "x", "--workers", "h:1", "--exchange", "q8"])
    assert run_config(ns).exchange == "q8"
    with pytest.raises(ValueError, match="--exchange applies to a cluster given by --workers"):
        run_config(build_parser().parse_args(["run", "--prompt", "x", "--exchange", "q8"]))
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        run_config(build_parser().parse_args(["run", "--prompt", "x", "--workers", "10.0.0.2"]))
    ns = build_parser().parse_args(["daemon", "--port", "0", "--threads", "2", "--state-dir", "/tmp/x"])
    assert (ns.host, ns.port, ns.threads, ns.state_dir) == ("0.0.0.0", 0, 2, "/tmp/x")


# --- the real model ---


@pytest.mark.slow
def test_smollm2_on_two_daemons_matches_the_single_node_engine(tmp_path, real_model, model_path):
    """`dllp2p daemon` + ClusterEngine: the greedy tokens of the JIT engine; then `dllp2p run --workers`;
    then the daemon is killed mid-session and the root names it."""
    from dllp2p.jit.engine import JITEngine

    prompt = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is"-like ids

    def greedy(engine, n=20):
        out, logits, pos = [], engine.forward(prompt, 0), len(prompt)
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = engine.forward([out[-1]], pos)
            pos += 1
        return out, logits

    single = JITEngine(real_model, 64, 1)
    try:
        want, want_logits = greedy(single)
    finally:
        single.close()
    cli = [sys.executable, "-m", "dllp2p.cli"]
    key_file = str(fake_tp.write_key(tmp_path))
    p, address = start_worker(tmp_path / "w", *DAEMON, "--threads", "1", "--key-file", key_file)
    try:
        e = ClusterEngine.connect(real_model, ClusterOptions((address,), key=fake_tp.TEST_KEY), 64, 1)
        got, got_logits = greedy(e)
        assert got == want
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-4)
        e.close()

        run = ["run", "--prompt", "The capital of France is", "--temperature", "0", "--steps", "16", "--threads", "1"]
        local = subprocess.run([*cli, *run, "--local"], capture_output=True, text=True, timeout=300)
        remote = subprocess.run([*cli, *run, "--workers", address, "--stats", "--key-file", key_file],
                                capture_output=True, text=True,
                                timeout=300)
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout and remote.stdout.startswith(" Paris.")
        assert "weights pushed 0.0 MB" in remote.stderr  # the daemon's cache is warm from the first session
        assert re.search(r"decode per token \(15 tokens\): .* sent [\d.]+ kB, received [\d.]+ kB", remote.stderr)
        q8 = subprocess.run([*cli, *run, "--workers", address, "--stats", "--exchange", "q8", "--key-file", key_file],
                            capture_output=True,
                            text=True, timeout=300)
        assert q8.returncode == 0, q8.stderr
        assert q8.stdout.startswith(" Paris.") and "(pow2 plan, q8 exchange)" in q8.stderr
        # two all-reduces per layer of one Q8_0 row of 576 values (612 bytes), 30 layers: 36 720 bytes, + the
        # token's embedding row (576 f32: 2304), + with the key a 16-byte tag on each of the 61 messages (976):
        # 40.0 kB per token
        assert re.search(r"decode per token \(15 tokens\): .* sent 40\.0 kB", q8.stderr), q8.stderr

        e = ClusterEngine.connect(real_model, ClusterOptions((address,), key=fake_tp.TEST_KEY), 64, 1)
        e.forward(prompt, 0)
        node_id = e.plan.nodes[1].node_id
        p.kill()
        p.wait(5)
        with pytest.raises(ClusterError, match=re.escape(f"worker {address} (node {node_id}) was lost")):
            for pos in range(len(prompt), len(prompt) + 3):
                e.forward([1], pos)
    finally:
        stop(p)
