"""Discovery (dllp2p/discovery.py): TXT records encoded and parsed strictly (pure), static peers polled
(trio, a fake fetch), and a real mDNS round trip between two network namespaces joined by a veth pair
(root and `ip` needed, else skipped). The namespaces are made by the test and hold the only addresses used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from dllp2p.discovery import (
    SERVICE_TYPE,
    Rejected,
    StaticOptions,
    cpu_features,
    encode_txt,
    instance_name,
    parse_txt,
    poll_static,
)
from dllp2p.clusterkey import ClusterKey
from dllp2p.election import Gone, Member, Seen

V, C = 1, "home"
ME = Member("pi-4b-1a2b3c4d", "10.0.0.7:7340", 1700000000.125, V, C, 4, 8 << 30, ("asimd", "asimddp"))


def txt(**change) -> dict[bytes, bytes | None]:
    props = {k.encode(): v.encode() for k, v in encode_txt(ME).items()}
    for k, v in change.items():
        if v is None:
            props.pop(k.encode(), None)
        else:
            props[k.encode()] = v if isinstance(v, bytes) else v.encode()
    return props


def test_txt_round_trip():
    assert parse_txt(txt(), "10.0.0.7:7340", version=V, cluster=C) == ME
    assert parse_txt(encode_txt(ME), "10.0.0.7:7340", version=V, cluster=C) == ME  # str keys too


def test_txt_fits_dns_sd_limits():
    many = Member("a", "h:1", 1.0, V, C, features=tuple(f"feature{i}" for i in range(100)))
    props = encode_txt(many)
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in props.items())
    assert props["f"].split(",") == [f"feature{i}" for i in range(len(props["f"].split(",")))]
    assert instance_name("a.b.c") == f"a-b-c.{SERVICE_TYPE}"
    assert len(instance_name("x" * 64).split(".")[0]) == 63


@pytest.mark.parametrize("change, reason", [
    ({"v": "2"}, "protocol version 2, this node speaks 1"),
    ({"v": None}, "no protocol version"),
    ({"v": "one"}, "no protocol version"),
    ({"v": "2", "t": "garbage"}, "protocol version 2"),  # a foreign version is named before its garbage
    ({"cl": "lab"}, "cluster 'lab'"),
    ({"id": None}, "id=None"),
    ({"id": "bad id!"}, "id="),
    ({"t": "soon"}, "t='soon'"),
    ({"t": "nan"}, "t='nan'"),
    ({"t": "-5"}, "t='-5'"),
    ({"c": "0"}, "c='0'"),
    ({"ram": "-1"}, "ram='-1'"),
    ({"cl": ""}, "cl=''"),
    ({"id": b"\xff\xfe"}, "not text"),
])
def test_bad_records_are_rejected_with_a_reason(change, reason):
    with pytest.raises(Rejected, match=reason.replace("(", r"\(").replace("?", r"\?")) as e:
        parse_txt(txt(**change), "10.0.0.7:7340", version=V, cluster=C)
    assert "10.0.0.7:7340" in str(e.value)


def test_cpu_features():
    x86 = "processor: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
    arm = "processor: 0\nFeatures\t: fp asimd evtstrm asimddp\n"
    assert cpu_features(x86) == ("avx2", "fma", "avx512f", "avx512_vnni")
    assert cpu_features(arm) == ("asimd", "asimddp")
    assert cpu_features("") == ()


# --- static peers (trio, fake fetch) ---


def test_static_peer_seen_then_gone():
    answers = [ME, OSError("refused"), ME, TimeoutError("slow"), OSError("refused"), OSError("refused")]

    async def fetch(address: str) -> Member:
        a = answers.pop(0) if answers else OSError("gone")
        if isinstance(a, Exception):
            raise a
        return a

    async def main() -> list:
        send, recv = trio.open_memory_channel(10)
        got = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_static, "10.0.0.7:7340", fetch, send, StaticOptions(0.001, 1, 3))
                async for ev in recv:
                    got.append(ev)
                    if isinstance(ev, Gone):
                        nursery.cancel_scope.cancel()
        return got

    got = trio.run(main)
    assert [type(e) for e in got] == [Seen, Seen, Gone]  # one miss is forgiven, three in a row are not
    assert got[0].member == ME and got[0].source == "static" and got[-1] == Gone(ME.node_id, "static", "10.0.0.7:7340")


def test_liveness_probe_of_an_mdns_member_ends_at_its_gone():
    answers = [ME, OSError("refused"), OSError("refused")]

    async def fetch(address: str) -> Member:
        a = answers.pop(0) if answers else ME  # it would answer again: the probe has ended by then
        if isinstance(a, Exception):
            raise a
        return a

    async def main() -> list:
        send, recv = trio.open_memory_channel(10)
        with trio.fail_after(5):
            async with send:
                await poll_static("10.0.0.7:7340", fetch, send, StaticOptions(0.001, 1, 2), source="mdns",
                                  until_gone=True)
            return [ev async for ev in recv]

    assert trio.run(main) == [Seen(ME, "mdns", pytest.approx(time.time(), abs=5)), Gone(ME.node_id, "mdns", "10.0.0.7:7340")]


def test_static_peer_that_hangs_times_out():
    async def fetch(address: str) -> Member:
        await trio.sleep_forever()

    async def main() -> None:
        send, recv = trio.open_memory_channel(10)
        with trio.move_on_after(0.5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_static, "10.0.0.7:7340", fetch, send, StaticOptions(0.01, 0.05, 2))
        with pytest.raises(trio.WouldBlock):  # nothing: it was never seen, so it is never Gone either
            recv.receive_nowait()

    trio.run(main)


# --- a real mDNS round trip between two network namespaces ---


def _netns_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs Linux, root and iproute2 to make network namespaces"
    probe = f"dllp2p-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def two_namespaces():
    """Namespaces a (10.213.7.1/24) and b (10.213.7.2/24) joined by a veth pair; removed afterwards."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    names = [f"dlpa{tag}", f"dlpb{tag}"]
    ip = lambda *args, check=True: subprocess.run(["ip", *args], check=check, capture_output=True, text=True)  # noqa: E731
    try:
        for ns in names:
            ip("netns", "add", ns)
        ip("link", "add", f"va{tag}", "netns", names[0], "type", "veth", "peer", "name", f"vb{tag}", "netns", names[1])
        for ns, dev, addr in ((names[0], f"va{tag}", "10.213.7.1/24"), (names[1], f"vb{tag}", "10.213.7.2/24")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
        yield names
    finally:
        for ns in names:
            ip("netns", "del", ns, check=False)


def _node(ns: str, node_id: str, ip: str, started_at: float, cluster: str, seconds: float, out: Path,
          key: str = "none") -> subprocess.Popen:
    """key: "none" (records without a MAC, none checked), or a name of KEYS (records MACed and checked)."""
    args = [sys.executable, __file__, node_id, ip, str(started_at), cluster, str(seconds), key]
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out.open("w"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parent.parent)


def _report(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return (lines[-1] if lines else {}), text


def test_mdns_round_trip_between_namespaces(two_namespaces, tmp_path):
    a, b = two_namespaces
    procs = [
        _node(a, "node-a", "10.213.7.1", 100.0, C, 15, tmp_path / "a.log"),
        _node(b, "node-b", "10.213.7.2", 200.0, C, 15, tmp_path / "b.log"),
        _node(b, "node-lab", "10.213.7.2", 50.0, "lab", 2, tmp_path / "lab.log"),
    ]
    try:
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    (ra, log_a), (rb, log_b) = _report(tmp_path / "a.log"), _report(tmp_path / "b.log")
    assert ra.get("seen") == {"node-b": "10.213.7.2:7340"}, log_a
    assert rb.get("seen") == {"node-a": "10.213.7.1:7340"}, log_b
    assert ra["root"] == rb["root"] == "node-a"  # both elect the first started (node-lab is in another cluster)
    assert "ignored node node-lab" in log_a and "cluster 'lab'" in log_a, log_a


def test_mdns_under_a_key_ignores_an_older_rogue_between_namespaces(two_namespaces, tmp_path):
    """Two daemons of a keyed cluster and, beside one of them, a rogue of the same cluster name claiming
    the earliest start: one announcing with another key, one with none. Neither is seen nor elected."""
    a, b = two_namespaces
    procs = [
        _node(a, "node-a", "10.213.7.1", 100.0, C, 6, tmp_path / "a.log", "k1"),
        _node(b, "node-b", "10.213.7.2", 200.0, C, 6, tmp_path / "b.log", "k1"),
        _node(b, "rogue-k2", "10.213.7.2", 0.0, C, 3, tmp_path / "r2.log", "k2"),
        _node(b, "rogue-none", "10.213.7.2", 0.0, C, 3, tmp_path / "r0.log", "none"),
    ]
    try:
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    (ra, log_a), (rb, log_b) = _report(tmp_path / "a.log"), _report(tmp_path / "b.log")
    assert ra.get("seen") == {"node-b": "10.213.7.2:7340"}, log_a
    assert rb.get("seen") == {"node-a": "10.213.7.1:7340"}, log_b
    assert ra["root"] == rb["root"] == "node-a"
    assert "no valid MAC" in log_a, log_a


KEYS = {"k1": b"dllp2p discovery test key 1", "k2": b"dllp2p discovery test key 2"}


def _mdns_node(node_id: str, ip: str, started_at: float, cluster: str, seconds: float, key: str = "none") -> None:
    """Run inside a namespace: advertise and browse until one other node of the cluster is seen (at most
    `seconds`), print {"seen": {id: address}, "root": id} then, and go on advertising 3 s for the others."""
    from dllp2p.discovery import MdnsOptions, run_mdns
    from dllp2p.election import apply, elect, members

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    me = Member(node_id, f"{ip}:7340", started_at, V, cluster, 1, 1 << 30)

    async def main() -> dict:
        table = apply({}, Seen(me, "self", time.time()))
        send, recv = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            mac_key = None if key == "none" else ClusterKey(hashlib.sha256(KEYS[key]).digest()).mdns_key
            await nursery.start(run_mdns, me, ip, 7340, send, MdnsOptions((ip,), mac_key=mac_key))
            with trio.move_on_after(seconds):
                async for ev in recv:
                    table = apply(table, ev)
                    if len(table) > 1 and key == "none":  # keyed: all `seconds`, every rogue record judged
                        break
            seen = {e.member.node_id: e.member.address for e in table.values() if "mdns" in e.sources}
            root = elect(members(table), version=V, cluster=cluster).root.node_id
            print(json.dumps({"seen": seen, "root": root}), flush=True)
            await trio.sleep(3)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    _mdns_node(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), *sys.argv[6:7])
