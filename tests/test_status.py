"""Status: the Status/StatusReply messages, a daemon's membership over loopback (static --peer polling, no
multicast), roles, session plan and last step in its reply, `dllp2p status --json`, and the live view in a
real terminal (tmux capture-pane; skipped without tmux).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import trio

import fake_tp
from dllp2p import wire as P
from dllp2p.commands import status
from dllp2p.config import Timeouts
from dllp2p.daemon import Daemon, DaemonConfig
from dllp2p.wire.client import ask_status
from dllp2p.discovery import StaticOptions
from dllp2p.election import Member
from dllp2p.wire.link import open_link

T = Timeouts(hello=2, idle=5, transfer=5, mesh=3, build=5, socket=3, slot=1)
FAST = StaticOptions(interval=0.05, timeout=1, misses=2)
ROOT_DIR = Path(__file__).parent.parent
M = Member("pi-1", "10.0.0.1:7340", 100.0, P.PROTOCOL_VERSION, "home", 4, 8 << 30, ("asimd",))


# --- messages ---


def reply(**change) -> P.StatusReply:
    nodes = (P.NodeStatus(M, "root", ("self",), 123.5),
             P.NodeStatus(Member("pi-2", "10.0.0.2:7340", 200.0, P.PROTOCOL_VERSION, "home"), "worker", ("mdns",), 1.0))
    fields = dict(seq=3, node_id="pi-1", nodes=nodes, plan=None, last_step=P.StepStatus(1, 12.5, 2.0, 99.0), sessions=2)
    fields.update(change)
    return P.StatusReply(**fields)


def test_status_messages_round_trip():
    from test_daemon import session_for

    plan = session_for("pi-2")[0].plan
    full = reply(resources=P.Resources(1 << 26, 8 << 30, 1 << 30, 0.5, 4), links=(P.LinkRtt("pi-2", 0.3, 98.0),),
                 push=P.PushStatus(plan.epoch, 10, 20, 97.0, False), recoveries=2,
                 last_recovery=P.RecoveryStatus("worker 10.0.0.2:7340 (node pi-2) lost", 0.8, 120, 3, 2, 96.0))
    for msg in (P.Status(0), reply(), reply(plan=plan, last_step=None), full):
        [back] = P.FrameDecoder().feed(P.encode(msg))
        assert back == msg
    assert reply().last_step.tokens_per_s == pytest.approx(80.0)


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b["nodes"][1].update(role="root"), "more than one root"),
    (lambda b: b["nodes"][1].update(role="boss"), "role 'boss'"),
    (lambda b: b["nodes"][1]["member"].update(node_id="bad id!"), "node id"),
    (lambda b: b["nodes"][1]["member"].update(started_at=float("nan")), "start time"),
    (lambda b: b["nodes"][1]["member"].update(cluster=""), "cluster name"),
    (lambda b: b["nodes"][1].update(sources=[]), "known from nowhere"),
    (lambda b: b.update(nodes=[b["nodes"][0], b["nodes"][0]]), "listed twice"),
    (lambda b: b["last_step"].update(step_ms=-1.0), "finite and >= 0"),
    (lambda b: b["nodes"][0]["member"].pop("ram"), "missing field 'ram'"),
])
def test_bad_status_replies_are_malformed(mutate, match):
    body = msgpack.unpackb(P.encode(reply())[P.HEADER_SIZE:], raw=False)
    mutate(body)
    with pytest.raises(P.MalformedFrame, match=match):
        P.decode_body(P.MsgType.STATUS_REPLY, msgpack.packb(body, use_bin_type=True))


# --- daemons over loopback, in-process ---


async def wait_for(predicate, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.02)


def test_static_peers_membership_and_roles(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def body(daemons, addresses):
        a, b, lab = daemons
        await wait_for(lambda: len(b.membership.members) == 3 and "does not join" in caplog.text)
        await wait_for(lambda: a.node_id in b.membership.link_rtt)
        r = await ask_status(addresses[1], 2, seq=7)
        assert r.seq == 7 and r.node_id == b.node_id
        # b's polls of a are timed; of the other cluster's daemon too, but only members are listed
        assert [link.node_id for link in r.links] == [a.node_id] and 0 < r.links[0].rtt_ms < 1000
        assert r.links[0].at <= time.time() and lab.node_id in b.membership.link_rtt
        assert r.resources.rss > 0 and r.resources.cores >= 1 and r.resources.load1 >= 0 and r.push is None
        assert [(n.member.node_id, n.role) for n in r.nodes] == [(a.node_id, "root"), (b.node_id, "worker")]
        assert r.nodes[0].sources == ("static",) and r.nodes[1].sources == ("self",)
        assert r.nodes[0].member.address == addresses[0]  # as it was reached
        assert r.plan is None and r.last_step is None
        # the daemon of another cluster is polled, never joins, and is named once in the log
        assert lab.node_id in b.membership.members and lab.node_id not in {n.member.node_id for n in r.nodes}
        assert caplog.text.count(f"node {lab.node_id} at {addresses[2]} does not join: cluster 'lab'") == 1
        # several Status on one connection
        link = await open_link(addresses[0], 2)
        for seq in range(3):
            await link.send(P.Status(seq))
            got = await link.receive(2)
            assert got.seq == seq and [n.member.node_id for n in got.nodes] == [a.node_id]
        await link.aclose()
        # the root goes away: after the static poll misses, the next oldest is root
        daemons_cancel[0].cancel()
        await wait_for(lambda: a.node_id not in b.membership.members)
        r = await ask_status(addresses[1], 2)
        assert [(n.member.node_id, n.role) for n in r.nodes] == [(b.node_id, "root")]
        assert f"root is now {b.node_id}" in caplog.text

    daemons_cancel: list[trio.CancelScope] = []

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()
                daemons_cancel.append(scope)
                a = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "a", timeouts=T, cluster=fake_tp.TEST_CLUSTER),
                           tp=fake_tp)
                address_a = await nursery.start(_cancellable, scope, a.serve)
                lab = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "lab", timeouts=T, cluster="lab"), tp=fake_tp)
                address_lab = await nursery.start(lab.serve)
                b = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "b", timeouts=T, static=FAST, cluster=fake_tp.TEST_CLUSTER,
                                        peers=(address_a, address_lab)), tp=fake_tp)
                address_b = await nursery.start(b.serve)
                await body([a, b, lab], [address_a, address_b, address_lab])
                nursery.cancel_scope.cancel()

    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "node_id").write_text("lab-peer\n")
    trio.run(main)


async def _cancellable(scope: trio.CancelScope, serve, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await serve(task_status=task_status)


def test_status_shows_the_session_plan_and_last_step(tmp_path):
    """A root (test_cluster's ClusterEngine) runs a session on a daemon: its Status has the plan and a step."""
    from test_cluster import DaemonThread, connect, generate

    d = DaemonThread(tmp_path / "w")
    try:
        e = connect([d.address])
        generate(e, fake_tp.model(), steps=3)
        r = status.ask(d.address, 2, key=fake_tp.TEST_KEY)
        assert r.plan == e.plan and r.last_step is not None and r.last_step.tokens == 1
        # the worker's weight push of this session: every needed byte arrived
        assert r.push.epoch == e.plan.epoch and r.push.finished and r.push.done == r.push.total > 0
        j = status.to_json(status.survey(d.address, 2, key=fake_tp.TEST_KEY))
        me = j["nodes"][0]
        assert me["slice"]["index"] == e.plan.node(d.daemon.node_id).index
        assert me["last_step"]["tokens_per_s"] > 0 and j["plan"]["nodes"] == e.plan.n_nodes
        assert j["plan"]["exchange"] == e.plan.exchange == "exact"
        assert me["push"] == {"epoch": e.plan.epoch, "done": r.push.total, "total": r.push.total, "fraction": 1.0,
                              "finished": True, "started_at": r.push.started_at}
        assert j["push"] == {"epoch": e.plan.epoch, "done": r.push.total, "total": r.push.total, "fraction": 1.0,
                             "nodes": 1}
        assert isinstance(me["status_rtt_ms"], float) and me["status_rtt_ms"] > 0 and me["rss"] > 0
        assert "sent" in status._weights({**j["push"], "sent": True}) and "done" in status._weights(me["push"])
        e.close()
    finally:
        d.stop()


def test_push_progress_during_a_session(tmp_path):
    """A worker between two slices of its weight push reports the bytes so far; then all of them."""
    from test_daemon import control, push, session_for
    from test_daemon import serve as serve_daemon

    async def body(d, address):
        link, _ = await control(address)
        s, tensors = session_for(d.node_id, address)
        await link.send(s)
        need = await link.receive(2)
        assert isinstance(need, P.Need) and len(need.sha256s) >= 2
        by_hash = {t.sha256: t for t in tensors.values()}
        total = sum(si.nbytes for si in s.slices if si.sha256 in need.sha256s and si.tensor == by_hash[si.sha256].name)
        r = await ask_status(address, 2)
        assert r.push == P.PushStatus(s.epoch, 0, total, r.push.started_at, False)
        first = by_hash[need.sha256s[0]]
        await push(link, s.epoch, first)
        await wait_for(lambda: d.worker.push.done == first.data.nbytes)  # chunks are taken one at a time
        r = await ask_status(address, 2)
        assert (r.push.done, r.push.total, r.push.finished) == (first.data.nbytes, total, False)
        assert 0 < r.push.fraction < 1
        j = status.to_json(status.Survey(address, r))
        assert j["nodes"][0]["push"]["done"] == first.data.nbytes and j["plan"]["epoch"] == s.epoch
        assert (j["push"]["done"], j["push"]["total"], j["push"]["nodes"]) == (first.data.nbytes, total, 1)
        assert "%)" in status._weights(j["nodes"][0]["push"])
        for h in need.sha256s[1:]:
            await push(link, s.epoch, by_hash[h])
        assert isinstance(await link.receive(5), P.WeightsReady)
        r = await ask_status(address, 2)
        assert r.push.finished and r.push.done == r.push.total == total
        await link.send(P.Stop(s.epoch, "test"))
        await link.aclose()

    serve_daemon(tmp_path / "w", body)


def test_status_of_no_daemon_is_one_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(status.StatusError, match=f"no dllp2p daemon answers at 127.0.0.1:{port}"):
        status.ask(f"127.0.0.1:{port}", 1)
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "status", "--port", str(port), "--json"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT_DIR)
    assert r.returncode == 1 and r.stderr.startswith("dllp2p: error: no dllp2p daemon answers"), r.stderr


def test_a_roots_set_up_progress_is_in_its_status(tmp_path):
    """The progress events of the root's latest set-up (session.progress) travel in StatusReply.progress,
    `status --json` lists them and the live view's caption names what is still going on."""
    from dllp2p.session.progress import Progress
    from test_daemon import serve as serve_daemon

    async def body(d, address):
        assert (await ask_status(address, 2)).progress == ()
        worker = "worker 10.0.0.9:7340 (node w)"
        for event in (Progress("build", "root", 0, 1), Progress("push", worker, 0, 4000),
                      Progress("push", worker, 1000, 4000), Progress("build", "root", 1, 1)):
            d.root_service.progress(event)
        r = await ask_status(address, 2)
        assert set(r.progress) == {P.ProgressStatus("build", "root", 1, 1), P.ProgressStatus("push", worker, 1000, 4000)}
        survey = status.Survey(address, r)
        assert sorted(status.to_json(survey)["progress"], key=lambda p: p["task"]) == [
            {"task": "build", "subject": "root", "done": 1, "total": 1},
            {"task": "push", "subject": worker, "done": 1000, "total": 4000}]
        caption = status.table(survey).caption
        assert f"set-up: weights → {worker} 25%" in caption and "building" not in caption, caption

    serve_daemon(tmp_path / "r", body)


# --- the commands, as processes ---


def start_daemon(state_dir: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """`dllp2p daemon` on 127.0.0.1 with no mDNS, no HTTP API, in this module's cluster (flags may change
    those); -> (process, address, its log file)."""
    log_path = state_dir.with_suffix(".log")
    p = subprocess.Popen([sys.executable, "-m", "dllp2p.cli", "daemon", "--host", "127.0.0.1", "--port", "0",
                          "--threads", "1", "--state-dir", str(state_dir), "--no-discovery", "--api", "off",
                          "--cluster", fake_tp.TEST_CLUSTER, *flags],
                         stderr=log_path.open("w"), cwd=ROOT_DIR, env={**os.environ, "DLLP2P_CONFIG": ""})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+)", log_path.read_text())
        if m:
            return p, m.group(1), log_path
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    pytest.fail(f"daemon did not start: {log_path.read_text()}")


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            assert p.wait(10) == 0
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            raise


@pytest.fixture
def two_daemons(tmp_path):
    """Daemon a, then daemon b polling a (--peer): b sees both; a was first, so it is root."""
    pa, a, _ = start_daemon(tmp_path / "a")
    time.sleep(0.05)
    pb, b, log_b = start_daemon(tmp_path / "b", "--peer", a, "--cluster", fake_tp.TEST_CLUSTER)
    try:
        deadline = time.monotonic() + 15
        while "static peer " + a + " is node" not in log_b.read_text():
            assert time.monotonic() < deadline, log_b.read_text()
            time.sleep(0.05)
        yield a, b
    finally:
        stop_all([pa, pb])


def test_status_json(two_daemons):
    a, b = two_daemons
    host, port = b.rsplit(":", 1)
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "status", "--host", host, "--port", port, "--json"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT_DIR)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    nodes = out["nodes"]
    assert [n["address"] for n in nodes] == [a, b] and [n["role"] for n in nodes] == ["root", "worker"]
    assert out["node"] == nodes[1]["id"]
    for n in nodes:  # the documented fields and their types
        assert isinstance(n["id"], str) and n["id"]
        assert n["role"] in ("root", "worker")
        assert isinstance(n["version"], int) and n["version"] == P.PROTOCOL_VERSION
        assert isinstance(n["started_at"], float) and abs(n["started_at"] - time.time()) < 300
        assert n["cluster"] == fake_tp.TEST_CLUSTER and n["cores"] >= 1 and n["ram"] >= 0
        assert n["reachable"] is True and n["slice"] is None and n["last_step"] is None
        # memory, load, round-trips, weight push
        assert isinstance(n["rss"], int) and 0 < n["rss"] < n["ram"]
        assert isinstance(n["ram_available"], int) and 0 <= n["ram_available"] <= n["ram"]
        assert isinstance(n["load"], float) and n["load"] >= 0
        assert n["load_per_core"] == pytest.approx(n["load"] / n["cores"])
        assert isinstance(n["status_rtt_ms"], float) and 0 < n["status_rtt_ms"] < 30000
        assert n["push"] is None
    assert out["plan"] is None and out["push"] is None
    assert nodes[0]["started_at"] < nodes[1]["started_at"]
    # b polls a (--peer): b's round-trip to a, measured by b; a polls nobody
    assert nodes[1]["rtt_ms"] is None and isinstance(nodes[0]["rtt_ms"], float) and 0 < nodes[0]["rtt_ms"] < 30000
    assert list(nodes[1]["links"]) == [nodes[0]["id"]] and nodes[0]["links"] == {}


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("key", ["q", "C-c"])
def test_status_live_view_in_a_terminal(two_daemons, tmp_path, key):
    a, b = two_daemons
    host, port = b.rsplit(":", 1)
    session = f"dllp2p-status-{os.getpid()}"
    cmd = f"cd {ROOT_DIR} && env -u COLUMNS -u LINES {sys.executable} -m dllp2p.cli status --host {host} --port {port} --interval 0.2"
    tmux = ["tmux", "-L", session]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "20", cmd], check=True, timeout=10)
    try:
        screen = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                    timeout=10).stdout
            if a in screen and b in screen:
                break
            time.sleep(0.2)
        assert "dllp2p cluster" in screen, screen
        rows = {addr: line for line in screen.splitlines() for addr in (a, b) if addr in line and line.startswith("│")}
        assert set(rows) == {a, b}, screen
        assert "root" in rows[a] and "worker" in rows[b], screen
        assert re.search(r"\d+ / \d+\.\d GiB", rows[a]), screen
        assert re.search(r"\d+ MiB", rows[a]) and re.search(r"\d\.\d\d \(\d+%\)", rows[a]), screen  # rss, load
        assert re.search(r"\d+\.\d ms, you \d+\.\d ms", rows[a]) and "you " in rows[b], screen  # rtt
        assert "(q: quit)" in screen, screen  # it says how to leave
        # q (or Ctrl-C) ends it cleanly
        subprocess.run([*tmux, "send-keys", "-t", session, key], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while subprocess.run([*tmux, "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, f"dllp2p status did not end on {key}"
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
