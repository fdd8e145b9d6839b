"""Issue 5's acceptance test: daemons in network namespaces on one bridge find each other by mDNS, agree
on the first started as root, serve a prompt sent to a non-root node with the single node's text, fold
in a 4th daemon started later, and hand over to the next oldest when the root is killed (SIGKILL: no
mDNS goodbye, so the others' liveness probes must notice).

Needs Linux, root and iproute2 (else skipped). The namespaces, the bridge and its addresses
(10.213.9.0/24) are made by the test and removed afterwards; nothing outside them is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fake_tp
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama

ROOT_DIR = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "dllp2p.cli"]
SPEC_8KV = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=512, vocab_size=300, seed=9)
NODES = 4
PORT = 7340


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


@pytest.fixture
def lan():
    """NODES namespaces, node i at 10.213.9.(i+1)/24, each joined by a veth pair to one bridge in a hub
    namespace (multicast passes: no snooping). -> the namespace names."""
    from test_discovery import _netns_unavailable

    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    hub, names = f"dlph{tag}", [f"dln{i}{tag}" for i in range(NODES)]
    try:
        for ns in (hub, *names):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            _ip("link", "add", f"e{i}{tag}", "netns", ns, "type", "veth", "peer", "name", f"p{i}{tag}", "netns", hub)
            _ip("-n", hub, "link", "set", f"p{i}{tag}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address(i, with_port=False)}/24", "dev", f"e{i}{tag}")
            _ip("-n", ns, "link", "set", f"e{i}{tag}", "up", "multicast", "on")
        yield names
    finally:
        for ns in (*names, hub):
            _ip("netns", "del", ns, check=False)


def address(i: int, with_port: bool = True) -> str:
    return f"10.213.9.{i + 1}" + (f":{PORT}" if with_port else "")


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Lan:
    def __init__(self, names: list[str], tmp_path: Path, model: Path):
        self.names, self.tmp_path, self.model = names, tmp_path, model
        self.key_file = str(fake_tp.write_key(tmp_path))  # the cluster key every daemon and command holds
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, list[str]] = {}

    def start(self, i: int) -> None:
        cmd = [*CLI, "daemon", "--host", address(i, False), "--port", str(PORT), "--threads", "1", "--cluster",
               "lan-test", "--state-dir", str(self.tmp_path / f"d{i}"), "--model", str(self.model),
               "--key-file", self.key_file, "--plan", "pow2"]
        p = subprocess.Popen(in_ns(self.names[i], *cmd), stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
        self.logs[i] = []
        threading.Thread(target=lambda: self.logs[i].extend(p.stderr), daemon=True).start()
        self.procs[i] = p

    def status(self, i: int) -> dict | None:
        r = subprocess.run(in_ns(self.names[i], *CLI, "status", "--json", "--host", address(i, False), "--port",
                                 str(PORT), "--key-file", self.key_file), capture_output=True, text=True, timeout=30, cwd=ROOT_DIR)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_agreement(self, nodes: list[int], root: int, limit: float = 40.0) -> None:
        """Until every one of `nodes` lists exactly those nodes and names `root` as root."""
        want = {address(i) for i in nodes}
        deadline = time.monotonic() + limit
        seen: dict = {}
        while True:
            seen = {i: self.status(i) for i in nodes}
            if all(s is not None and {n["address"] for n in s["nodes"]} == want
                   and [n["address"] for n in s["nodes"] if n["role"] == "root"] == [address(root)]
                   for s in seen.values()):
                return
            assert time.monotonic() < deadline, f"no agreement on {want} with root {address(root)}: {seen}\n" \
                                                f"{self.dump()}"
            time.sleep(0.5)

    def prompt(self, via: int) -> subprocess.CompletedProcess:
        r = subprocess.run(in_ns(self.names[via], *CLI, "run", *PROMPT, "--daemon", address(via), "--key-file",
                                 self.key_file),
                           capture_output=True, text=True, timeout=120, cwd=ROOT_DIR)
        assert r.returncode == 0, f"{r.stderr}\n{self.dump()}"
        return r

    def stop(self, i: int) -> None:
        p = self.procs[i]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def dump(self) -> str:
        return "\n".join(f"--- daemon {i}:\n{''.join(log[-30:])}" for i, log in self.logs.items())


PROMPT = ["--prompt", "hello there", "--temperature", "0", "--steps", "16", "--threads", "1"]


@pytest.mark.slow
def test_daemons_on_a_bridge_discover_elect_serve_join_and_hand_over(lan, tmp_path):
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    single = subprocess.run([*CLI, "run", *PROMPT, "--local", "--model", str(model)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT_DIR)
    assert single.returncode == 0, single.stderr
    net = Lan(lan, tmp_path, model)
    try:
        for i in range(3):  # staggered: daemon 0 is the oldest
            net.start(i)
            time.sleep(1.0)
        net.wait_agreement([0, 1, 2], root=0)
        r = net.prompt(1)
        assert r.stdout == single.stdout and ", 2 nodes)" in r.stderr, r.stderr  # 3 members, 2^n: 2 used

        net.start(3)
        net.wait_agreement([0, 1, 2, 3], root=0)
        r = net.prompt(3)
        assert r.stdout == single.stdout and ", 4 nodes)" in r.stderr, r.stderr
        assert net.status(0)["plan"]["nodes"] == 4

        net.procs[0].kill()  # the root dies without an mDNS goodbye: the others' probes drop it
        net.procs[0].wait(5)
        net.wait_agreement([1, 2, 3], root=1)
        assert any("mdns peer" in line and "stopped answering" in line for line in net.logs[1]), net.dump()
        r = net.prompt(2)
        assert r.stdout == single.stdout and ", 2 nodes)" in r.stderr, r.stderr
    finally:
        for i in net.procs:
            net.stop(i)
