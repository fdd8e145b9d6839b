"""Pipelined requests (issue 20): over a pipeline plan of s stages the batcher keeps up to s groups of
sequences in flight (BatchCore.plan_groups, the pure grouping batcher.groups), each group's step submitted
before the older ones complete, so each stage works on another group. Here: the grouping's rules, the
core's bookkeeping of steps in flight, and the driver over an engine that completes its steps only when
asked, in order (as ClusterEngine.submit/complete do): every greedy stream's text is its solo run's.
Through real daemons: tests/test_pipeline_batching_live.py."""

from __future__ import annotations

import math
from collections import deque

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p.engine import SoloBatch
from dllp2p.session.batcher import BatchConfig, BatchCore, Seq, groups
from dllp2p.session.batching import BatchService
from dllp2p.wire.messages import Done, Error

from test_batching import Sink, _engine, _gen, _prompt, random_model, solo_text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory)

# --- the grouping ------------------------------------------------------------------------------------------


def test_groups_split_evenly_and_even_out_a_group_that_came_back_too_large():
    assert groups(list("abcde"), 5, 0, 4) == [["a", "b"], ["c"], ["d"], ["e"]]  # nothing in flight: all of them
    assert groups(list("abcd"), 4, 0, 2) == [["a", "b"], ["c", "d"]]
    assert groups(list("acd"), 4, 1, 2) == [["a", "c"]]  # at most ceil(4 / 2) now; d goes with the next
    assert groups(list("a"), 1, 0, 3) == [["a"]]
    assert groups(list("ab"), 4, 2, 2) == [] and groups([], 3, 0, 2) == []  # the pipeline is full; none ready


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16), st.integers(1, 5), st.data())
def test_groups_keep_the_rules(running, stages, data):
    in_flight = data.draw(st.integers(0, stages))
    ready = list(range(data.draw(st.integers(0, running))))
    got = groups(ready, running, in_flight, stages)
    assert len(got) <= max(0, stages - in_flight) and all(got)
    assert [x for g in got for x in g] == ready[: sum(map(len, got))]  # in order, the longest waiting first
    sizes = [len(g) for g in got]
    assert not sizes or (max(sizes) <= math.ceil(running / stages) and max(sizes) - min(sizes) <= 1)
    if in_flight < stages and ready:
        assert got  # something goes whenever the pipeline has room
    if in_flight == 0:
        assert sum(sizes) == len(ready)  # an empty pipeline takes every ready sequence


# --- the core --------------------------------------------------------------------------------------------


def test_core_keeps_each_sequence_in_one_step_in_flight_and_a_cancelled_ones_slot_until_it_lands():
    core = BatchCore(BatchConfig(max_batch=4, chunk=64), 64, 1)
    seqs = [Seq(i, _prompt(i, 3 + i), 5, 64) for i in range(4)]
    for s in seqs:
        core.submit(s)
    a, b = core.plan_groups(2, 0)
    assert {s.rid for s in a.seqs} | {s.rid for s in b.seqs} == {0, 1, 2, 3} and len(a.rows) == len(b.rows) == 2
    assert all(s.flying for s in seqs) and core.plan_groups(2, 2) == [] and core.plan_groups(3, 2) == []
    core.advance(a)
    for s in a.seqs:
        core.push(s, 7)
    again = core.plan_groups(2, 1)  # a's sequences again, one decode row each; b's still in flight
    assert len(again) == 1 and again[0].seqs == a.seqs and all(len(r.tokens) == 1 for r in again[0].rows)
    gone = b.seqs[0]
    core.cancel(gone)
    late = Seq(9, _prompt(9, 4), 5, 64)
    core.submit(late)  # every slot is taken: it waits
    assert late.state == "queued" and core.plan_groups(2, 2) == [] and late.state == "queued"  # b writes its slot
    core.advance(b)  # b landed: the cancelled sequence's slot is free now
    (step,) = core.plan_groups(2, 1)
    assert late.state == "running" and late.slot == gone.slot and late in step.seqs and gone not in core.running


# --- the driver ------------------------------------------------------------------------------------------


class Pipelined:
    """SoloBatch as the driver sees a pipeline of `depth` stages: submit() takes a step now, complete() computes
    the oldest; it checks that no slot is in two steps in flight and that no prefix is copied into a slot a step
    in flight writes (the root copies at once: ClusterEngine.copy_prefix)."""

    def __init__(self, inner: SoloBatch, depth: int):
        self.inner, self.depth, self.max_seqs = inner, depth, inner.max_seqs
        self.pending: deque = deque()
        self.most = 0  # steps in flight at once

    def _flying(self) -> set[int]:
        return {r.seq for rows in self.pending for r in rows}

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        assert dst not in self._flying()
        self.inner.copy_prefix(src, dst, n)

    def submit(self, rows):
        assert not self._flying() & {r.seq for r in rows}
        self.pending.append(rows)
        self.most = max(self.most, len(self.pending))
        return rows

    def complete(self, ticket):
        assert self.pending.popleft() is ticket
        return self.inner.forward_batch(ticket)

    def forward_batch(self, rows):
        return self.complete(self.submit(rows))

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("depth, n, groups_", [(2, 3, 0), (3, 4, 0), (2, 4, 1)], ids=["2-stages", "3-stages", "one-batch"])
def test_pipelined_greedy_streams_equal_their_solo_runs(model, depth, n, groups_):  # noqa: F811
    """n requests of different lengths joining at different times, some sharing a system prompt (prefix copies),
    over an engine of `depth` stages: each text and stop reason is its solo run's; with pipeline_groups 1 one
    step at a time, else up to `depth` in flight."""
    m, tok = model
    system = _prompt(77, 12)
    reqs = [(_prompt(i, 3 + 5 * i, system if i % 2 else ()), 5 + 3 * i, 96) for i in range(n)]
    made: list[Pipelined] = []

    async def make(c: int) -> Pipelined:
        made.append(Pipelined(SoloBatch(lambda: _engine(m.config, tok, c), 8), depth))
        return made[-1]

    svc = BatchService(BatchConfig(max_batch=8, chunk=12, groups=groups_), "root-test", clock=trio.current_time)
    svc.attach(make, tok, 96, 64)
    sinks = [Sink() for _ in reqs]
    finished, started = [], {}

    async def main():
        async with trio.open_nursery() as nursery:
            async def one(i):
                while i and (i - 1 not in started or (svc.steps < started[i - 1] + 2 and svc.busy())):
                    await trio.sleep(0.001)  # joining 2 steps after the one before, while the others run
                started[i] = svc.steps
                ids, steps, ctx = reqs[i]
                await svc.generate(sinks[i], _gen(ids, steps, ctx), list(ids))
                finished.append(i)

            async def driver():
                while len(finished) < n:
                    if svc.busy():
                        await svc.step()
                    await trio.sleep(0.001)

            nursery.start_soon(driver)
            for i in range(n):
                nursery.start_soon(one, i)

    trio.run(main)
    for (ids, steps, ctx), sink in zip(reqs, sinks):
        done = sink.got[-1]
        assert isinstance(done, Done), sink.got[-1]
        assert (sink.text(), done.stop_reason) == solo_text(model, ids, steps, ctx)
    assert len(made) == 1 and made[0].most == (1 if groups_ == 1 else depth)
    assert not made[0].pending and not svc.core.running


def test_bench_concurrency_decodes_the_same_in_groups_as_in_one_batch(model):  # noqa: F811
    """`dllp2p bench --concurrency N --plan pipeline`'s third run: N streams in groups, steps in flight."""
    from dllp2p.bench_concurrency import decode_run

    m, tok = model
    ps = [_prompt(i, 6 + i) for i in range(5)]

    def engine(depth: int) -> Pipelined:
        e = Pipelined(SoloBatch(lambda: _engine(m.config, tok, 64), 5), depth)
        e.kv_bytes_per_position = 64
        return e

    _, one_batch = decode_run(engine(1), ps, 6, 64)
    grouped = engine(3)
    seconds, in_groups = decode_run(grouped, ps, 6, 64, groups=3)
    assert in_groups == one_batch and all(len(t) == 6 for t in in_groups) and seconds > 0
    assert grouped.most == 3 and not grouped.pending


class Failing(Pipelined):
    """Its 6th completion fails as a lost worker does (ClusterError is a ConnectionError)."""

    completed = 0

    def complete(self, ticket):
        self.completed += 1
        if self.completed > 5:
            raise ConnectionError("worker lost")
        return super().complete(ticket)


def test_an_engine_lost_with_steps_in_flight_fails_their_requests_and_the_next_request_runs(model):  # noqa: F811
    """complete() raises (a worker lost) while 2 steps are in flight: both requests end with an Error, nothing
    stays in flight, and the next request runs on a new engine and gets its solo text."""
    m, tok = model
    made: list[Pipelined] = []

    async def make(c: int) -> Pipelined:
        made.append((Failing if not made else Pipelined)(SoloBatch(lambda: _engine(m.config, tok, c), 4), 2))
        return made[-1]

    svc = BatchService(BatchConfig(max_batch=4, chunk=12), "root-test", clock=trio.current_time)
    svc.attach(make, tok, 64, 64)
    first, second, after = Sink(), Sink(), Sink()
    ids = [_prompt(1, 4), _prompt(2, 5), _prompt(3, 3)]

    async def main():
        async with trio.open_nursery() as nursery:
            async def driver():
                while not (after.got and isinstance(after.got[-1], (Done, Error))):
                    if svc.busy():
                        await svc.step()
                    await trio.sleep(0.001)

            nursery.start_soon(driver)
            nursery.start_soon(svc.generate, first, _gen(ids[0], 30, 64), list(ids[0]))
            nursery.start_soon(svc.generate, second, _gen(ids[1], 30, 64), list(ids[1]))
            while not (first.got and isinstance(first.got[-1], Error) and isinstance(second.got[-1], Error)):
                await trio.sleep(0.001)
            await svc.generate(after, _gen(ids[2], 8, 64), list(ids[2]))

    trio.run(main)
    assert "worker lost" in first.got[-1].message and "worker lost" in second.got[-1].message
    assert isinstance(after.got[-1], Done) and (after.text(), after.got[-1].stop_reason) == solo_text(model, ids[2], 8, 64)
    assert len(made) == 2 and not svc.core.running and not any(s.flying for s in svc.core.running)


def test_a_new_engine_without_stages_after_a_pipeline_steps_one_batch(model):  # noqa: F811
    """The members changed while idle (replan): the engine made next has no stages (a root alone), and the
    next requests run on it as one batch, with their solo text."""
    m, tok = model
    made: list = []

    async def make(c: int):
        inner = SoloBatch(lambda: _engine(m.config, tok, c), 4)
        made.append(Pipelined(inner, 2) if not made else inner)
        return made[-1]

    svc = BatchService(BatchConfig(max_batch=4, chunk=12), "root-test", clock=trio.current_time)
    svc.attach(make, tok, 64, 64)
    ids = [_prompt(1, 4), _prompt(2, 5), _prompt(3, 3), _prompt(4, 6)]
    sinks = [Sink() for _ in ids]

    async def batch(which):
        async with trio.open_nursery() as nursery:
            for i in which:
                nursery.start_soon(svc.generate, sinks[i], _gen(ids[i], 9, 64), list(ids[i]))
            await trio.sleep(0.001)
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    async def main():
        await batch([0, 1])
        svc.replan(("another",))
        await batch([2, 3])

    trio.run(main)
    for i, sink in zip(ids, sinks):
        assert isinstance(sink.got[-1], Done) and (sink.text(), sink.got[-1].stop_reason) == solo_text(model, i, 9, 64)
    assert len(made) == 2 and isinstance(made[1], SoloBatch) and made[0].most == 2
