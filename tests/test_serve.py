"""Prompts through the daemons: `dllp2p run` -> its daemon -> the root -> tokens back; the root re-plans
between requests as daemons join and leave. Real `dllp2p daemon` processes on loopback, static --peer
lists (no mDNS), the real engines. The daemons and the commands hold the tests' cluster key (KEY_FILE).
"""

from __future__ import annotations

import atexit
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio

import fake_tp
from ports import free_port
from dllp2p import wire as P
from dllp2p.cli import build_parser, run_config
from dllp2p.config import LOCAL_DAEMON
from dllp2p.wire.client import ask_status
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama

ROOT_DIR = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "dllp2p.cli"]
_KEY_DIR = tempfile.mkdtemp(prefix="dllp2p-test-key-")
atexit.register(shutil.rmtree, _KEY_DIR, True)  # the key file this module's daemons share, gone at exit
KEY_FILE = str(fake_tp.write_key(Path(_KEY_DIR)))
SPEC_8KV = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=512, vocab_size=300, seed=5)


class Daemons:
    """`dllp2p daemon` processes on 127.0.0.1, each polling all the others' ports (--peer). Hermetic: each on
    free ports of its own (control and HTTP API), all in a cluster of their own name, no mDNS."""

    def __init__(self, tmp_path: Path, count: int, model: Path | None = None):
        self.tmp_path = tmp_path
        self.model = model
        self.cluster = f"test-{secrets.token_hex(4)}"
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.logs: list[list[str]] = [[] for _ in range(count)]

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def start(self, i: int, *extra: str) -> str:
        peers = [self.address(k) for k in range(len(self.ports)) if k != i]
        cmd = [*CLI, "daemon", "--host", "127.0.0.1", "--port", str(self.ports[i]), "--threads", "1",
               "--state-dir", str(self.tmp_path / f"d{i}"), "--no-discovery", *(["--peer", *peers] if peers else []),
               "--cluster", self.cluster, *([] if "--api" in extra else ["--api", f"127.0.0.1:{free_port()}"]),
               "--key-file", KEY_FILE, "--plan", "pow2", *extra]  # the node counts these tests expect
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
        line = p.stderr.readline()
        if "listening on" not in line:
            p.kill()
            pytest.fail(f"daemon {i} did not start: {line}{p.stderr.read()}")
        self.logs[i].append(line)
        threading.Thread(target=lambda: self.logs[i].extend(p.stderr), daemon=True).start()
        self.procs[i] = p
        return self.address(i)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    def stop_all(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def status(address: str) -> P.StatusReply:
    return trio.run(ask_status, address, 5.0, 0, fake_tp.TEST_KEY)


def wait_members(address: str, count: int, limit: float = 20.0) -> P.StatusReply:
    """Until the daemon at address counts `count` compatible members."""
    deadline = time.monotonic() + limit
    while True:
        reply = status(address)
        if len(reply.nodes) == count:
            return reply
        assert time.monotonic() < deadline, f"{address} sees {len(reply.nodes)} members, not {count}"
        time.sleep(0.3)


def dllp2p_run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, "run", "--temperature", "0", "--steps", "16", "--threads", "1", "--key-file", KEY_FILE, *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT_DIR)
    assert p.returncode == 0, p.stderr
    return p


# --- fast ---


def test_run_goes_to_a_daemon_unless_told_otherwise():
    parse = build_parser().parse_args
    default = run_config(parse(["run", "--prompt", "x"]))
    assert default.daemon == LOCAL_DAEMON and default.fallback  # none there: it runs here
    named = run_config(parse(["run", "--prompt", "x", "--daemon", "10.0.0.2:7"]))
    assert named.daemon == "10.0.0.2:7" and not named.fallback  # it must answer
    for own in (["--local"], ["--workers", "10.0.0.2:7"], ["--engine", "reference"], ["--model", "m.gguf"]):
        assert run_config(parse(["run", "--prompt", "x", *own])).daemon is None, own
    with pytest.raises(ValueError, match="exclude"):
        run_config(parse(["run", "--prompt", "x", "--local", "--daemon", "10.0.0.2:7"]))


def test_generate_messages_round_trip_and_are_checked():
    g = P.Generate("hi", (), True, None, 16, 64, 0.0, 40, 0.95, 0.05, 1.0, 7, 1)
    for msg in (g, P.TokenChunk(" Paris"), P.Done(6, 16, 100.0, 50.0, 2, "a-1", ("line",))):
        assert P.FrameDecoder().feed(P.encode(msg)) == [msg]
    for bad in (dict(steps=0), dict(prompt=""), dict(hops=P.MAX_HOPS + 1), dict(tokens=(-1,))):
        fields = {**g.__dict__, **bad}
        with pytest.raises(ValueError):
            P.Generate(**fields)


@pytest.mark.parametrize("name,content,fragment", [("missing.gguf", None, "cannot open"),
                                                   ("notes.gguf", b"not a model", "GGUF")])
def test_a_daemon_whose_model_cannot_be_read_fails_at_start(tmp_path, name, content, fragment):
    """One line and exit status 1 before listening, instead of answering every prompt with an error later."""
    model = tmp_path / name
    if content is not None:
        model.write_bytes(content)
    p = subprocess.run([*CLI, "daemon", "--host", "127.0.0.1", "--port", "0", "--no-discovery", "--api", "off",
                        "--cluster", "test-model", "--state-dir", str(tmp_path / "s"), "--model", str(model)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT_DIR)
    assert p.returncode == 1 and p.stderr.startswith(f"dllp2p: error: {model}"), p.stderr
    assert fragment in p.stderr and len(p.stderr.splitlines()) == 1 and "listening" not in p.stderr, p.stderr


def test_run_to_something_that_is_not_a_daemon_fails_within_seconds():
    """A plain HTTP server at --daemon: a clear line within seconds (the Status probe), not a 900 s wait."""
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    server = HTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        t0 = time.monotonic()
        p = subprocess.run([*CLI, "run", "--prompt", "x", "--daemon", address], capture_output=True, text=True,
                           timeout=60, cwd=ROOT_DIR)
        took = time.monotonic() - t0
    finally:
        server.shutdown()
    assert p.returncode == 1 and f"dllp2p: error: {address} is not a dllp2p daemon" in p.stderr, p.stderr
    assert took < 20 and "Traceback" not in p.stderr


def test_a_named_daemon_that_does_not_answer_is_an_error_not_a_local_run():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    p = subprocess.run([*CLI, "run", "--prompt", "x", "--daemon", address], capture_output=True, text=True,
                       timeout=60, cwd=ROOT_DIR)
    assert p.returncode == 1 and p.stderr.startswith(f"dllp2p: error: no dllp2p daemon answers at {address}"), \
        p.stderr
    assert p.stdout == ""  # nothing generated here


def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([*CLI, "daemon", "--host", "127.0.0.1", "--port", str(port), "--no-discovery", "--api",
                            "off", "--cluster", "test-busy", "--state-dir", str(tmp_path / "s")],
                           capture_output=True, text=True, timeout=60, cwd=ROOT_DIR)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use"), p.stderr


# --- real engines ---


@pytest.mark.slow
def test_prompt_through_a_non_root_daemon_matches_local(tmp_path):
    """Two daemons (the first started is root and has SmolLM2); `dllp2p run` against the other one."""
    d = Daemons(tmp_path, 2)
    try:
        root = d.start(0)
        time.sleep(0.05)
        other = d.start(1)
        wait_members(root, 2)
        reply = wait_members(other, 2)
        assert reply.nodes[0].member.address == root and reply.nodes[0].role == "root"
        prompt = ["--prompt", "The capital of France is"]
        local = dllp2p_run(*prompt, "--local")
        remote = dllp2p_run(*prompt, "--daemon", other)
        assert remote.stdout == local.stdout and remote.stdout.startswith(" Paris.")
        assert re.search(r"generated 16 tokens; .*\(root \S+, 2 nodes\)", remote.stderr), remote.stderr
        assert status(root).plan.n_nodes == 2
    finally:
        d.stop_all()


@pytest.mark.slow
def test_root_replans_as_daemons_join_and_leave(tmp_path):
    """An 8-KV-head random model: 2 daemons -> a plan of 2; a 3rd (pow2: still 2), a 4th -> a plan of 4;
    the 4th killed -> 2 again, even before the root notices the death (the session kept from the last
    prompt fails, a fresh plan leaves the dead daemon out). A repeated prompt reuses the kept session.
    Every answer equals the single-node engine's."""
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 4, model=model)
    prompt = ["--prompt", "hello there"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0)
        time.sleep(0.05)
        d.start(1)
        wait_members(root, 2)

        def ask(via: str, nodes: int) -> None:
            got = dllp2p_run(*prompt, "--daemon", via)
            assert got.stdout == want
            assert f", {nodes} nodes)" in got.stderr, got.stderr
            plan = status(root).plan
            assert plan is not None and plan.n_nodes == nodes

        ask(d.address(1), 2)
        again = dllp2p_run(*prompt, "--daemon", d.address(1), "--stats")
        assert again.stdout == want and "weights pushed 0.0 MB" in again.stderr, again.stderr  # cached
        assert "session kept from the last request (weights pushed 0.0 MB, set-up 0.00 s)" in again.stderr
        # the same prompt again: all but its last token were in the kept session's KV cache, not computed
        m = re.search(r"dllp2p: (\d+) of the (\d+) prompt tokens were in the kept session's KV cache", again.stderr)
        assert m and int(m[1]) == int(m[2]) - 1, again.stderr
        epoch = status(root).plan.epoch
        d.start(2)
        wait_members(root, 3)
        ask(d.address(2), 2)
        d.start(3)
        wait_members(root, 4)
        ask(d.address(3), 4)
        assert status(root).plan.epoch > epoch
        assert {n.address for n in status(root).plan.nodes[1:]} == {d.address(i) for i in (1, 2, 3)}
        d.kill(3)
        # at once, while the root still counts the dead daemon (polled every 2 s, dropped after 3
        # misses): its Hello fails, and the root plans without it instead of failing the prompt
        assert len(status(root).nodes) == 4
        ask(d.address(1), 2)
        assert d.address(3) not in {n.address for n in status(root).plan.nodes}
        assert any("planning without it" in line for line in d.logs[0]), d.logs[0]
        # the 4-node session kept from the last prompt failed at its first step and was replaced
        assert any("kept session failed before its first token" in line for line in d.logs[0]), d.logs[0]
        wait_members(root, 3)
        ask(d.address(1), 2)
    finally:
        d.stop_all()


@pytest.mark.slow
def test_a_root_daemon_with_the_weighted_plan_uses_three_nodes(tmp_path):
    """`dllp2p daemon --plan weighted` as root: 3 daemons -> a plan of 3 (pow2 would take 2), the output
    equal to one node's."""
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 3, model=model)
    prompt = ["--prompt", "hello there"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0, "--plan", "weighted")
        time.sleep(0.05)
        d.start(1)
        d.start(2)
        wait_members(root, 3)
        got = dllp2p_run(*prompt, "--daemon", d.address(2))
        assert got.stdout == want and ", 3 nodes)" in got.stderr, got.stderr
        plan = status(root).plan
        assert plan.policy == "weighted" and plan.n_nodes == 3
    finally:
        d.stop_all()


@pytest.mark.slow
def test_a_client_that_goes_away_stops_its_request_and_the_root_serves_on(tmp_path):
    from dllp2p.wire.client import GenerateCall

    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 1, model=model)
    try:
        address = d.start(0)
        g = P.Generate("", (1, 5, 9), False, None, 2000, 2048, 0.0, 40, 0.95, 0.05, 1.0, None)

        async def one_chunk() -> None:
            call = await GenerateCall.open(address, g, 10, fake_tp.TEST_KEY)
            assert isinstance(await call.receive(60), P.TokenChunk)
            await call.aclose()  # mid-generation

        trio.run(one_chunk)
        got = dllp2p_run("--prompt", "hello there", "--daemon", address)
        assert ", 1 node)" in got.stderr and got.stdout == dllp2p_run("--prompt", "hello there", "--model",
                                                                        str(model)).stdout
    finally:
        d.stop_all()
