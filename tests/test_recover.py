"""Never lose a request to a lost worker (issue 17, the worker half): real `dllp2p daemon` processes on
loopback (tests/test_serve.py's Daemons: own ports, cluster name, state dirs, the tests' key), three of
them, the root planning over all three (--plan weighted). A worker killed (-9) or stopped (SIGTERM) at a
random token of a long greedy generation costs a pause: the client's whole text equals the root's own
single-node answer (asked before the workers joined), Done comes, no Error; the root counts the recovery
in Status and reports it in Done's lines (`run --stats`). A node killed and restarted during a stream of
back-to-back requests fails none of them. Every test counts requests sent, completed and failed.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import struct
import time

import pytest
import trio

import fake_tp
from dllp2p import wire as P
from dllp2p.commands import status as status_command
from dllp2p.daemon.membership import Membership
from dllp2p.discovery import StaticOptions
from dllp2p.election import Member, Seen
from dllp2p.formats.synthetic import write_random_llama
from dllp2p.session.handshake import Worker
from dllp2p.session.recovery import StepClock
from dllp2p.session.root import ClusterEngine
from dllp2p.wire.link import LinkClosed
from dllp2p.wire.client import GenerateCall
from test_serve import SPEC_8KV, Daemons, status, wait_members

STEPS = 200


# --- pure parts ---


def test_the_step_timeout_follows_the_measured_step_times():
    clock = StepClock(30.0)
    assert clock.timeout(1) == 30.0  # nothing measured yet: the configured socket timeout
    clock.measured(1, 0.004)
    assert clock.timeout(1) == 1.0  # 10 x 4 ms is under the floor
    clock.measured(8, 0.4)  # 50 ms a token
    assert clock.timeout(1) == 1.0  # 10 x 50 ms: still the floor
    assert clock.timeout(4) == pytest.approx(2.0) and clock.timeout(1000) == 30.0  # up to the ceiling
    a, b = socket.socketpair()
    with a, b:
        clock.arm([None, a], 4)
        sec, usec = struct.unpack("ll", a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        assert sec + usec / 1e6 == pytest.approx(2.0)
        a.settimeout(None)
        t0 = time.monotonic()
        clock.arm([a], 1)  # 1 s: a silent peer fails the receive within it
        with pytest.raises(OSError):
            a.recv(1)
        assert 0.9 < time.monotonic() - t0 < 3.0


def test_a_worker_the_root_lost_leaves_the_membership_at_once_and_a_restart_rejoins():
    """mark_dead (the root lost the worker mid-request): out of the table now; a poll of the same
    incarnation that was answered before the death does not bring it back; the daemon restarted (a later
    start time) is a member again at once."""
    me = Member("root-a", "127.0.0.1:1", 1.0, P.PROTOCOL_VERSION, "c")
    b = Member("node-b", "127.0.0.1:2", 2.0, P.PROTOCOL_VERSION, "c")
    m = Membership(me.node_id, "c", 1.0, StaticOptions())
    m.me = me

    async def feed(*events: Seen) -> None:
        send, recv = trio.open_memory_channel(8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m._apply, recv)
            async with send:
                for e in (Seen(me, "self", 1.0), *events):
                    await send.send(e)

    trio.run(feed, Seen(b, "static", 3.0))
    assert {x.node_id for x in m.election().succession} == {"root-a", "node-b"}
    m.mark_dead(b.address, "lost during generation")
    assert [x.node_id for x in m.election().succession] == ["root-a"]
    trio.run(feed, Seen(b, "static", 4.0))  # a late record of the dead incarnation
    assert [x.node_id for x in m.election().succession] == ["root-a"]
    restarted = Member("node-b", "127.0.0.1:2", 5.0, P.PROTOCOL_VERSION, "c")
    trio.run(feed, Seen(restarted, "static", 6.0))
    assert {x.node_id for x in m.election().succession} == {"root-a", "node-b"}


class _Link:
    """A worker's control link after a failed step: poll() gives `msg` once `after` seconds have passed
    (None before), or raises LinkClosed (`closed`: the process died)."""

    def __init__(self, msg: P.Error | None = None, after: float = 0.0, closed: bool = False):
        self.msg, self.closed, self.at = msg, closed, time.monotonic() + after

    def poll(self, timeout: float):  # noqa: ANN201
        if self.closed:
            raise LinkClosed("closed the connection")
        wait = self.at - time.monotonic()
        if self.msg is None or wait > timeout:
            time.sleep(timeout)
            return None
        time.sleep(max(0.0, wait))
        msg, self.msg = self.msg, None
        return msg

    def close(self) -> None:
        pass


def _engine_losing(*links: _Link, first_step: bool = False) -> tuple[ClusterEngine, list[Worker]]:
    workers = [Worker(f"127.0.0.1:{9000 + i}", P.Hello(P.PROTOCOL_VERSION, f"w{i}", "worker", 1, 1.0), link, index=i)
               for i, link in enumerate(links, start=1)]
    engine = ClusterEngine.__new__(ClusterEngine)
    engine._workers, engine._peers, engine._node, engine._closed = workers, [], None, False
    engine._clock = StepClock(30.0)
    if not first_step:
        engine._clock.measured(1, 0.01)
    engine._clock.arm([], 1)  # 1 s, as after a few fast steps; the first step: the 30 s socket timeout
    return engine, workers


def _peer_lost(node: int) -> P.Error:
    return P.Error("peer_lost", f"node w? lost node {node}: timed out", node)


def test_a_worker_that_reports_a_frozen_peer_is_not_blamed_for_it():
    """3 nodes, worker 2 frozen: worker 1, waiting on it, dropped out of the step first, so the root's
    suspect is worker 1; worker 1 says (now, or later within the step timeout) that it lost node 2: worker 2
    is named, not the survivor. Without a report the suspect stays the culprit."""
    for after in (0.0, 0.6):
        engine, (w1, w2) = _engine_losing(_Link(_peer_lost(2), after), _Link())
        e = engine._lost(w1, "timed out")
        assert e.lost and e.address == w2.address and "lost node 2" in str(e), (after, e)
    engine, (w1, w2) = _engine_losing(_Link(), _Link(_peer_lost(2), 0.1))  # the root timed out on the frozen one
    assert engine._lost(w2, "timed out").address == w2.address
    t0 = time.monotonic()
    engine, (w1, w2) = _engine_losing(_Link(), _Link())
    assert engine._lost(w1, "timed out").address == w1.address  # nobody says otherwise: the suspect
    assert time.monotonic() - t0 < 2.5  # waited at most about the step timeout (1 s) for a word
    t0 = time.monotonic()
    engine, (w1, w2) = _engine_losing(_Link(), _Link(), first_step=True)
    assert engine._lost(w1, "timed out").address == w1.address
    assert 2.5 < time.monotonic() - t0 < 4.5  # the first step's 30 s timeout: at most 3 s more


def test_a_dead_or_lone_suspect_is_named_without_waiting():
    t0 = time.monotonic()
    engine, (w1, w2) = _engine_losing(_Link(closed=True), _Link())
    assert engine._lost(w1, "reset").address == w1.address
    engine, (w1,) = _engine_losing(_Link())
    assert engine._lost(w1, "timed out").address == w1.address
    assert time.monotonic() - t0 < 1.0  # 0.2 s a silent worker, no more
    engine, (w1, w2) = _engine_losing(_Link(P.Error("leaving", "node w2 is leaving the cluster (SIGTERM)")),
                                      _Link(_peer_lost(1)))
    assert engine._lost(w2, "reset").address == w1.address  # leaving says it all


# --- daemons ---


def _generate(tokens: tuple[int, ...], steps: int = STEPS, seed: int | None = None) -> P.Generate:
    """Greedy, or with a seed sampled (temperature 0.8, top-k 40)."""
    return P.Generate("", tokens, False, None, steps, 512, 0.0 if seed is None else 0.8, 40, 0.95, 0.05, 1.0, seed)


class Tally:
    def __init__(self) -> None:
        self.sent = self.completed = self.failed = 0

    def ask(self, address: str, g: P.Generate, at_chunk=None) -> tuple[str, P.Done | None]:  # noqa: ANN001
        """g to the daemon at address; -> (its text, Done or None after an Error). at_chunk(n) runs after the
        n-th TokenChunk (one per generated token at most)."""
        self.sent += 1

        async def go() -> tuple[str, P.Done | None]:
            call = await GenerateCall.open(address, g, 10, fake_tp.TEST_KEY)
            text: list[str] = []
            try:
                while True:
                    msg = await call.receive(120)
                    if isinstance(msg, P.TokenChunk):
                        text.append(msg.text)
                        if at_chunk is not None:
                            at_chunk(len(text))
                    elif isinstance(msg, P.Error):
                        return "".join(text) + f" [Error {msg.code}: {msg.message}]", None
                    else:
                        return "".join(text), msg
            finally:
                await call.aclose()

        text, done = trio.run(go)
        if done is None:
            self.failed += 1
        else:
            self.completed += 1
        return text, done


def _cluster(tmp_path, model) -> tuple[Daemons, Tally]:  # noqa: ANN001
    """Root (d0, weighted plans) alone first: its single-node answers to the prompts are the oracle; the
    two workers are started by the test."""
    d = Daemons(tmp_path, 3, model=model)
    d.start(0, "--plan", "weighted")
    time.sleep(0.05)
    return d, Tally()


def _lose_workers_mid_generation(tmp_path, model, signals: tuple[signal.Signals, ...]) -> None:  # noqa: ANN001
    """For each signal: both workers up (the lost one started again), a 200-token request, the signal to a
    random worker at a random token between 10 and 100 -> the root's single-node text, on 2 nodes."""
    d, tally = _cluster(tmp_path, model)
    prompt = (1, 5, 9, 14)
    try:
        root = d.address(0)
        want, alone = tally.ask(root, _generate(prompt))
        assert alone is not None and alone.nodes == 1, want
        assert alone.generated_tokens > 20, alone  # enough tokens to lose a worker in the middle
        for round_, how in enumerate(signals):
            for i in (1, 2):
                if d.procs[i] is None or d.procs[i].poll() is not None:
                    d.start(i)
            wait_members(root, 3)
            assert tally.ask(root, _generate(prompt, 4))[1].nodes == 3  # the session is up (weights pushed)
            at = random.randint(10, min(100, alone.generated_tokens - 10))
            victim = random.choice((1, 2))

            def lose(n: int) -> None:
                if n == at:
                    d.procs[victim].send_signal(how)

            t0 = time.monotonic()
            got, done = tally.ask(root, _generate(prompt), lose)
            assert done is not None, f"failed after the {how.name} of worker {victim} at token {at}: {got}"
            assert got == want, f"{how.name} of worker {victim} at token {at}"
            assert done.generated_tokens == alone.generated_tokens and done.nodes == 2, done
            how_lost = "left (shutting down)" if how == signal.SIGTERM else "lost"
            assert any(line.startswith(f"recovered: worker {d.address(victim)} ") and f") {how_lost};" in line
                       and "re-planned 3 -> 2 nodes" in line for line in done.stats), done.stats
            if how == signal.SIGSTOP:  # hung, not dead: the step timeout (about a second) noticed it
                assert status(root).last_recovery.pause_s >= 0.9  # the 1 s floor, not the 30 s socket timeout
                d.procs[victim].kill()
            assert d.procs[victim].wait(10) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
            if how == signal.SIGTERM:  # it left the session, telling the root, before it exited
                assert any("left the session (SIGTERM)" in line for line in d.logs[victim]), d.logs[victim]
            reply = status(root)
            assert reply.recoveries >= round_ + 1 and reply.last_recovery is not None, reply
            assert reply.last_recovery.nodes_before == 3 and reply.last_recovery.pause_s < time.monotonic() - t0
            # at once, not after the polls' misses: the dead worker is out of the root's membership
            assert d.address(victim) not in {n.member.address for n in reply.nodes}
            survey = status_command.survey(root, key=fake_tp.TEST_KEY)  # `dllp2p status`: JSON, the view's caption
            assert status_command.to_json(survey)["recoveries"]["last"]["nodes_after"] == 2
            caption = str(status_command.table(survey).caption)
            assert re.search(r"\d+ recover(y|ies), the last .* ago: worker .*\(3 -> 2 nodes, paused \d+\.\d\d s\)",
                             caption), caption
        n = 1 + 2 * len(signals)
        assert (tally.sent, tally.completed, tally.failed) == (n, n, 0)
    finally:
        d.stop_all()


def test_a_worker_lost_mid_generation_costs_a_pause_not_the_answer(tmp_path):
    """The random 8-KV-head model, 3 nodes; a worker killed (-9), then (started again) one told to stop
    (SIGTERM: it leaves the session, telling the root), then one frozen (SIGSTOP: a hang, found by the
    step timeout), each at a random token between 10 and 100."""
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    _lose_workers_mid_generation(tmp_path, model, (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP))


@pytest.mark.slow
def test_smollm2_loses_a_worker_mid_generation(tmp_path, model_path):
    """The same on SmolLM2-135M (3 KV heads: 3 nodes, then 2): kill -9, then SIGTERM."""
    _lose_workers_mid_generation(tmp_path, model_path, (signal.SIGKILL, signal.SIGTERM))


def test_a_node_killed_and_restarted_during_back_to_back_requests_fails_none(tmp_path):
    """20 requests one after the other through the root; worker 1 killed during the 5th (mid-generation)
    and started again (same state dir, so the same node id) after the 10th: all 20 complete with the
    single-node answer, the later ones on 3 nodes again. Every 4th request is sampled with a seed (the
    5th too): the resumed sampler draws on from where it was, so its text is the seeded single-node one."""
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d, tally = _cluster(tmp_path, model)
    prompts = [((1 + i % 5, 5, 9 + i % 3), 7 if i % 4 == 0 else None) for i in range(20)]
    try:
        root = d.address(0)
        want = {p: tally.ask(root, _generate(p[0], 48, p[1]))[0]
                for p in set(prompts)}
        d.start(1)
        d.start(2)
        wait_members(root, 3)
        nodes = []
        for i, p in enumerate(prompts):
            lose = (lambda n: d.kill(1) if n == 12 else None) if i == 4 else None
            got, done = tally.ask(root, _generate(p[0], 48, p[1]), lose)
            assert done is not None and got == want[p], f"request {i}: {got}"
            nodes.append(done.nodes)
            if i == 9:
                d.start(1)
                wait_members(root, 3)
        assert nodes[0] == 3 and nodes[4] == 2 and nodes[-1] == 3, nodes
        assert (tally.sent, tally.completed, tally.failed) == (20 + len(set(prompts)), 20 + len(set(prompts)), 0)
    finally:
        d.stop_all()
