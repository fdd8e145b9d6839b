"""A node id that is not unique, end to end on loopback (real `dllp2p daemon` processes with SmolLM2, static
--peer lists, the tests' cluster key):

- two daemons sharing a copied state dir (two Pis booted from one cloned SD image): the later one takes a
  new id within one poll round, both then count each other, and a prompt through it equals a local run;
- an impostor with the key announcing the root's id and start time: the root keeps its id and its own
  entry, and once the impostor leaves, a prompt through a third daemon is served within one round."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import trio

import fake_tp
from dllp2p.daemon import Daemon, DaemonConfig
from dllp2p.discovery import StaticOptions
from dllp2p.election import Member
from test_serve import Daemons, dllp2p_run, status, wait_members

ROUND = StaticOptions().interval  # the daemons' poll interval: one membership round
PROMPT = ["--prompt", "The capital of France is"]


def _node_id(d: Daemons, i: int) -> str:
    return (d.tmp_path / f"d{i}" / "node_id").read_text().strip()


def test_copied_state_dir_the_later_daemon_takes_a_new_id(tmp_path):
    d = Daemons(tmp_path, 2)
    try:
        first = d.start(0)
        shared = _node_id(d, 0)
        (tmp_path / "d1").mkdir()
        shutil.copy(tmp_path / "d0" / "node_id", tmp_path / "d1" / "node_id")  # the cloned image
        time.sleep(0.05)
        started = time.monotonic()
        second = d.start(1)
        reply = wait_members(first, 2, limit=30)
        took = time.monotonic() - started
        assert _node_id(d, 0) == shared and _node_id(d, 1) != shared  # the copy changed, stored
        assert {n.member.node_id for n in reply.nodes} == {shared, _node_id(d, 1)}
        assert status(second).node_id == _node_id(d, 1)
        # its first poll of the other finds the conflict; the other sees the new id at its next poll
        assert took < 3 * ROUND + 5, f"resolved after {took:.1f} s"
        assert any("also held by the daemon at" in line for line in d.logs[1]), d.logs[1]
        local = dllp2p_run(*PROMPT, "--local")
        remote = dllp2p_run(*PROMPT, "--daemon", second)
        assert remote.stdout == local.stdout and ", 2 nodes)" in remote.stderr, remote.stderr
    finally:
        d.stop_all()


class _Impostor:
    """An in-process daemon (fake compute) with a copy of the victim's state dir and its start time."""

    def __init__(self, state_dir, port: int, started_at: float, cluster: str):
        self.daemon = Daemon(DaemonConfig("127.0.0.1", port, 1, state_dir, cluster=cluster, key=fake_tp.TEST_KEY),
                             tp=fake_tp)
        self.daemon.started_at = self.daemon.membership.started_at = started_at
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the impostor did not start"

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.daemon.serve)
            self._scope, self._token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
            self._ready.set()

    def stop(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


def test_an_impostor_neither_takes_the_id_nor_leaves_the_cluster_failing(tmp_path):
    d = Daemons(tmp_path, 3)  # the third port is the impostor's, which both daemons poll
    impostor = None
    try:
        root, other = d.start(0), d.start(1)
        wait_members(root, 2)
        me = next(n.member for n in status(root).nodes if n.member.address == root)
        shutil.copytree(tmp_path / "d0", tmp_path / "imp")
        impostor = _Impostor(tmp_path / "imp", d.ports[2], me.started_at, d.cluster)
        time.sleep(3 * ROUND)  # polled by both, several rounds
        assert impostor.daemon.node_id == me.node_id  # it does not give up the id: same start time
        mine = next(n.member for n in status(root).nodes if n.member.node_id == me.node_id)
        assert mine.address == root and mine.started_at == me.started_at  # the root knows itself
        assert any("also claimed by the daemon at" in line for line in d.logs[0]), d.logs[0]
        assert any(f"node {me.node_id} answers at both" in line for line in d.logs[1]), d.logs[1]  # the third
        impostor.stop()
        impostor = None
        gone = time.monotonic()
        deadline = gone + ROUND + 5
        while True:  # the third daemon's view of the id is the root's again within one round
            held = {n.member.node_id: n.member.address for n in status(other).nodes}
            if held.get(me.node_id) == root:
                break
            assert time.monotonic() < deadline, held
            time.sleep(0.2)
        local = dllp2p_run(*PROMPT, "--local")
        remote = dllp2p_run(*PROMPT, "--daemon", other)
        assert remote.stdout == local.stdout and ", 2 nodes)" in remote.stderr, remote.stderr
    finally:
        if impostor is not None:
            impostor.stop()
        d.stop_all()


def test_an_mdns_name_already_taken_makes_this_node_take_a_new_id(monkeypatch, caplog):
    """Zeroconf refuses to register a service name (the node id) another device already announces: the
    clone takes a new id and registers under it."""
    from zeroconf import NonUniqueNameException

    from dllp2p.daemon import membership as membership_module
    from dllp2p.daemon.membership import Membership

    registered: list[str] = []

    async def fake_run_mdns(me, host, port, events, options, *, task_status=trio.TASK_STATUS_IGNORED):  # noqa: ANN001
        if me.node_id == "pi-cloned":
            raise NonUniqueNameException(me.node_id)
        registered.append(me.node_id)
        task_status.started()
        await trio.sleep_forever()

    monkeypatch.setattr(membership_module, "run_mdns", fake_run_mdns)
    fresh = iter(["pi-new", "pi-newer"])

    async def main() -> None:
        m = Membership("pi-cloned", "home", 100.0, StaticOptions(), renew=lambda: next(fresh))
        async with trio.open_nursery() as nursery:
            await m.start(nursery, "127.0.0.1", 7340, discovery=True, interfaces=(), peers=())
            assert m.node_id == "pi-new" and registered == ["pi-new"]
            assert set(m.members) == {"pi-new"} and m.members["pi-new"].member.address == "127.0.0.1:7340"
            # then a poll finds pi-new at another address, started earlier: again the copy, and mDNS follows
            await m._claim(Member("pi-new", "10.0.0.9:7340", 50.0, m.me.version, "home"))
            assert m.node_id == "pi-newer" and registered == ["pi-new", "pi-newer"] and set(m.members) == {"pi-newer"}
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.WARNING)
    trio.run(main)
    assert "already announces node id pi-cloned" in caplog.text and "pi-cloned -> pi-new" in caplog.text
