"""A worker lost mid-batch costs the running requests a pause, not their answers (issues 17 and 18): the
batcher (batching.BatchService) makes the engine anew over the workers left, every running sequence computes
again what its slot held (BatchCore.rewind: prompt and tokens generated, as prompt chunks), and each goes on
with its own sampler. Over toy engines whose logits are a hash of everything a slot's KV holds (test_batching's
HashEngine), so a replay that left out, doubled or misplaced one token would change the text: each stream's
text equals its solo run's, with one batch and with 2 steps in flight, and the recovery is in its Done and
counted. A failure that is not a lost worker, and a loss too many, still fail the requests with an Error."""

from __future__ import annotations

import pytest
import trio

from dllp2p import wire as P
from dllp2p.engine import SoloBatch
from dllp2p.error_codes import ErrorCode
from dllp2p.session.batcher import BatchConfig, BatchCore, Seq
from dllp2p.session.batching import BatchService
from dllp2p.session.handshake import ClusterError, Worker, expect
from dllp2p.session.recovery import MAX_RECOVERIES
from dllp2p.wire.link import LinkClosed, LinkTimeout
from dllp2p.wire.messages import Done, Error
from test_batching import Sink, _engine, _gen, _prompt, random_model, solo_text
from test_pipelined_batching import Pipelined


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory)


class Losing(Pipelined):
    """An engine of `depth` stages (1: one batch) whose step number `fail_at` fails as a worker lost mid-step does
    (fail_at 0: never). `rows` keeps every step's rows."""

    def __init__(self, inner: SoloBatch, depth: int, fail_at: int):
        super().__init__(inner, depth)
        self.fail_at, self.completed, self.rows = fail_at, 0, []

    def complete(self, ticket):
        self.completed += 1
        if self.completed == self.fail_at:
            raise ClusterError("worker 127.0.0.1:9 (node w1) lost: connection reset", address="127.0.0.1:9",
                               node_id="w1", lost=True)
        self.rows.append(tuple(ticket))
        return super().complete(ticket)


def _serve(model, reqs, fail_at: list[int], depth: int = 1, lost=None):
    """Serve reqs ((ids, steps) each, all at once) over engines made in turn, the k-th failing at its step
    fail_at[k]; lost: the on_lost hook (default: every loss a worker lost, none left). -> (sinks, engines, the
    service, the recoveries counted, on_lost's calls)."""
    m, tok = model
    made: list[Losing] = []
    counted, calls = [], []

    async def make(c: int) -> Losing:
        made.append(Losing(SoloBatch(lambda: _engine(m.config, tok, c), 4), depth, fail_at[len(made)]))
        return made[-1]

    async def on_lost(e):
        calls.append(e)
        return (f"worker {e.address} (node {e.node_id}) lost", ()) if isinstance(e, ClusterError) and e.lost else None

    svc = BatchService(BatchConfig(max_batch=4, chunk=8), "root-test", clock=trio.current_time,
                       on_lost=lost or on_lost, on_recovered=counted.append)
    svc.attach(make, tok, 96, 64)
    sinks = [Sink() for _ in reqs]

    async def main():
        async with trio.open_nursery() as nursery:
            for (ids, steps), sink in zip(reqs, sinks):
                nursery.start_soon(svc.generate, sink, _gen(ids, steps, 96), list(ids))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    trio.run(main)
    return sinks, made, svc, counted, calls


REQS = [(_prompt(1, 5), 30), (_prompt(2, 11), 24), (_prompt(3, 3), 40)]


@pytest.mark.parametrize("depth", [1, 2], ids=["one-batch", "2-steps-in-flight"])
def test_a_worker_lost_mid_batch_costs_a_pause_not_the_answers(model, depth):
    """The first engine fails at its 12th step (every request past its prompt, 2 steps in flight with depth 2):
    each text and stop reason is its solo run's; the second engine's first steps recompute each running
    sequence from position 0 (prompt and tokens so far); Done says so; the root counted one recovery each."""
    sinks, made, svc, counted, calls = _serve(model, REQS, [12, 0], depth)
    for (ids, steps), sink in zip(REQS, sinks):
        done = sink.got[-1]
        assert isinstance(done, Done), done
        assert (sink.text(), done.stop_reason) == solo_text(model, ids, steps, 96)
    assert len(made) == 2 and len(calls) == 1 and not svc.core.running
    replayed = {}  # slot -> the first row the new engine computed for it
    for rows in made[1].rows:
        for r in rows:
            replayed.setdefault(r.seq, r)
    assert len(replayed) == len(REQS) and all(r.start_pos == 0 and len(r.tokens) > 1 for r in replayed.values())
    recovered = [s.got[-1] for s in sinks if any(line.startswith("recovered: worker 127.0.0.1:9 (node w1) lost")
                                                  for line in s.got[-1].stats)]
    assert len(recovered) == len(counted) == len(REQS)  # all three were running when it was lost
    assert all(r.nodes_before == 1 and r.nodes_after == 1 and r.replayed > 5 for r in counted)


def test_a_loss_while_replaying_is_one_pause(model):
    """The second engine is lost too, in the middle of the replay: the third goes on and each text is its solo
    run's. A request not yet resumed has one pause naming both losses; one that had (its replay came first), two."""
    sinks, made, _, counted, calls = _serve(model, REQS, [12, 3, 0])
    for (ids, steps), sink in zip(REQS, sinks):
        assert (sink.text(), sink.got[-1].stop_reason) == solo_text(model, ids, steps, 96)
    assert len(made) == 3 and len(calls) == 2
    assert sum(r.cause.count("lost") for r in counted) == 2 * len(REQS)  # both losses hit every request
    assert len(REQS) <= len(counted) < 2 * len(REQS)  # the chunk budget cannot replay them all before the second
    assert sum(line.startswith("recovered: ") for s in sinks for line in s.got[-1].stats) == len(counted)


def test_a_failure_that_is_no_lost_worker_and_a_loss_too_many_fail_the_requests(model):
    """on_lost says None (not a worker lost), or fails: the requests end with the engine's Error at once. Every engine
    lost at its first step: after MAX_RECOVERIES losses in a row they end with an Error too."""
    async def never(e):
        return None

    async def broken(e):
        raise RuntimeError("a bug in the re-planning")

    for hook in (never, broken):  # (a hook that fails is no recovery either: nothing escapes into the daemon)
        sinks, made, _, counted, _ = _serve(model, REQS, [12, 0], lost=hook)
        assert all(isinstance(s.got[-1], Error) and "lost" in s.got[-1].message for s in sinks)
        assert len(made) == 1 and not counted
    sinks, made, _, counted, calls = _serve(model, REQS, [12] + [1] * MAX_RECOVERIES + [0])
    assert all(isinstance(s.got[-1], Error) for s in sinks)
    assert len(calls) == MAX_RECOVERIES and len(made) == MAX_RECOVERIES + 1 and not counted


def test_core_rewind_recomputes_prompt_and_tokens_before_the_next():
    """rewind(): the next steps' rows are prompt chunks from position 0 over prompt + generated tokens (the chunk
    budget shared as for new prompts), the last chunk sampling; after it, decode rows go on as before."""
    core = BatchCore(BatchConfig(max_batch=2, chunk=4), 64, 1)
    a, b = Seq(1, (5, 6, 7), 10, 64), Seq(2, (8,), 10, 64)
    for s in (a, b):
        core.submit(s)
    for token in (20, 21):
        core.advance(core.plan())
        for s in (a, b):
            core.push(s, token)
    assert a.tokens == [5, 6, 7, 20, 21] and a.held == 4 and b.tokens == [8, 20, 21] and b.held == 2
    core.rewind()
    assert core.rebuilt and all(s.held == 0 and not s.prefilled for s in (a, b))

    def rows(step):
        return [(r.seq, r.start_pos, r.tokens) for r in step.rows], step.sample

    step = core.plan()
    assert rows(step) == ([(a.slot, 0, (5, 6, 7, 20))], (False,))  # the chunk budget: b waits
    core.advance(step)
    step = core.plan()
    assert rows(step) == ([(a.slot, 4, (21,)), (b.slot, 0, (8, 20, 21))], (True, True))
    core.advance(step)
    for s in (a, b):
        core.push(s, 22)
    assert rows(core.plan()) == ([(a.slot, 5, (22,)), (b.slot, 3, (22,))], (True, True))


def test_a_cancelled_sequence_frees_its_slot_for_the_next_request_without_a_step():
    """busy() is False once the only running request's client left (the driver stops stepping), and a request
    submitted then takes the slot at once: max_batch 1 and no queue would otherwise refuse it (429)."""
    core = BatchCore(BatchConfig(max_batch=1, queue=0), 64, 1)
    gone = Seq(1, (5, 6), 10, 64)
    core.submit(gone)
    core.advance(core.plan())
    core.cancel(gone)
    assert not core.busy()
    late = Seq(2, (7, 8), 10, 64)
    core.submit(late)
    assert late.state == "running" and late.slot == gone.slot and core.running == [late]


class _Link:
    """A worker's link during set-up that fails its next receive with `error`, or answers `reply`."""

    def __init__(self, error=None, reply=None):
        self.error, self.reply = error, reply

    async def receive(self, timeout):
        if self.error is not None:
            raise self.error
        return self.reply


@pytest.mark.parametrize("error", [LinkClosed("closed"), LinkTimeout("timed out")], ids=["closed", "timeout"])
def test_a_worker_dropped_while_the_engine_is_set_up_is_a_lost_worker_named(error):
    """Its link closing or timing out during set-up (Need, WeightsReady; the push and the mesh dial alike) is a
    `lost` ClusterError naming it, so the batcher plans again without it; an Error it answers is not."""
    hello = P.Hello(P.PROTOCOL_VERSION, "w1", "worker", 1, 1.0)
    w = Worker("127.0.0.1:9001", hello, _Link(error))
    with pytest.raises(ClusterError) as caught:
        trio.run(expect, w, P.Need, 1.0)
    e = caught.value
    assert e.lost and e.recoverable and (e.address, e.node_id) == ("127.0.0.1:9001", "w1") and "w1" in str(e)
    answered = Worker("127.0.0.1:9001", hello, _Link(reply=Error(ErrorCode.BUSY, "busy")))
    with pytest.raises(ClusterError) as caught:
        trio.run(expect, answered, P.Need, 1.0)
    assert not caught.value.lost
