"""A root's requests served together: the batcher's core (batcher.py) driven over one BatchEngine.

    generate(link, g, ids)   a request: submitted to the core (admitted, queued, or refused with an Error
                             frame), then its text pieces relayed to link as TokenChunks, then Done
    run()                    (a task of the daemon) one step after another while any request runs: the
                             core's Step -> one engine call off the trio loop (its prefix copies, one
                             forward_batch, each finished row's sampling) -> every stream's new token
                             decoded, cut at its stop strings, put in its own channel

Each request has its own sampler (and RNG), stop strings, token limit and context; with a greedy
sampler a stream's tokens are those of its solo run, whatever else runs beside it (the engines compute
each slot's rows as they would alone). A client that goes away (its link's send fails, or its task is
cancelled) cancels its sequence: the core frees its slot at the next step.

The slot: the daemon's prompt slot (one worker session or one root's work at a time) is taken when the
first request arrives and given back when none runs or waits; the engine is kept WARM_S seconds after,
with its cached prefixes, then closed. A request whose context is over the engine's waits until nothing
runs, and the engine is made anew with it.

Error handling: a worker lost mid-batch (the `on_lost` hook, service.py, says which workers are left) costs
the running requests a pause, not their answers: the engine is made anew over the workers left (or this root
alone), every running sequence computes its prompt and the tokens it had again (BatchCore.rewind), and goes on
with its own sampler, so its text is that of an undisturbed run (at most MAX_RECOVERIES losses in a row). Any
other engine failure fails every running request with an Error naming it (the engine is closed; the next
request makes a new one); a refusal (queue full: rate_limit_exceeded, HTTP 429) goes to that request only.
Nothing here raises into the daemon.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from ..engine import BatchEngine, SoloBatch
from ..memlimit import engine_options
from ..error_codes import CodedError, ErrorCode, code_of
from ..errors import user_facing_errors
from ..generate import StopFilter
from ..memory import trim
from ..sampler import Sampler, SamplerConfig
from ..tokenizer import StreamDecoder
from ..wire.link import LinkClosed
from ..wire.messages import Done, Error, Generate, TokenChunk
from ..wire.reports import ServingStatus
from .admission import meminfo
from .batcher import BatchConfig, BatchCore, Seq, Step
from .checks import MEMORY_SHARE
from .inline import InlineChoice
from .recovery import MAX_RECOVERIES, Recovery

log = logging.getLogger("dllp2p.daemon")

WARM_S = 30.0  # an idle engine (and its cached prefixes) is kept this long
RATE_WINDOW_S = 2.0  # Status's tokens a second are those of the steps in the last this many seconds


@dataclass(eq=False)
class _Stream:
    """One request as the driver sees it: its sequence, sampling and text, and its clock."""

    seq: Seq
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopFilter
    eos: frozenset[int]
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel
    submitted: float
    prompt: int  # tokens of the prompt (seq.prompt is followed by those of a resumed answer)
    first: float = 0.0  # perf_counter of its first token (0: none yet)
    most: int = 0  # the largest batch (rows) it was computed in
    flights: int = 1  # the most steps in flight (pipelined groups) when one of its steps completed
    last: float = 0.0
    failure: Error | None = None
    log: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # ids generated since its last text piece (TokenChunk.ids)
    lost: tuple[str, float, int, int] | None = None  # a loss not resumed from: (cause, since, replayed, nodes before)
    recoveries: list[Recovery] = field(default_factory=list)


def jit_batch_engine(model: Any, ctx: int, threads: int, max_seqs: int, cache_dir: Any = None,
                     mem_limit: int | None = None) -> BatchEngine:
    """The compiled engine with max_seqs slots of ctx positions; where the JIT has no batched step yet, SoloBatch
    over one JITEngine per slot."""
    from ..jit.engine import JITEngine  # llvmlite: loaded by the first prompt served alone

    extra = engine_options(cache_dir=cache_dir, mem_limit=mem_limit)
    if hasattr(JITEngine, "forward_batch"):
        return JITEngine(model, ctx, threads, max_seqs=max_seqs, **extra)
    return SoloBatch(lambda: JITEngine(model, ctx, threads, **extra), max_seqs)


class BatchService:
    """Requests of one root served together. `slot`: the daemon's prompt slot (None: none to take);
    `wait_slot`: how long to wait for it before refusing (busy); `node_id`: named in answers. attach() gives
    it its engine maker and tokenizer (the root's model, loaded by its first request)."""

    def __init__(self, cfg: BatchConfig, node_id: str, slot: trio.Lock | None = None, wait_slot: float = 600.0,
                 clock: Callable[[], float] = time.perf_counter,
                 on_lost: Callable[[Exception], Awaitable[tuple[str, tuple[str, ...]] | None]] | None = None,
                 on_recovered: Callable[[Recovery], None] = lambda r: None,
                 on_step: Callable[[Any, Any, float], None] = lambda engine, rows, seconds: None):
        self.cfg, self.node_id = cfg, node_id
        # on_lost(e): a step failed with e; a worker lost -> (the cause, the workers to go on over), else None
        self._on_lost, self._on_recovered, self._on_step = on_lost, on_recovered, on_step  # on_step: (engine, rows, s)
        self._losses = 0  # losses recovered from since the last step that ran
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (clock, tokens sampled) of the latest steps
        self.served = 0  # requests answered (Done)
        self.core: BatchCore | None = None
        self.tokenizer: Any = None
        self._make: Callable[[int], Awaitable[BatchEngine]] | None = None
        self.workers: tuple[str, ...] = ()  # of the engine made next (replan)
        self.nodes = 1  # of the engine's plan (its maker says)
        self._slot, self._wait_slot, self._clock = slot, wait_slot, clock
        self._engine: BatchEngine | None = None
        self._holding = False
        self._streams: dict[int, _Stream] = {}  # by rid
        self._rid = 0
        self._wake = trio.Event()
        self.steps = 0  # engine steps run (tests: a cancelled sequence is gone within one)
        self._flying: deque[tuple[Step, Any]] = deque()  # (pipelined) steps submitted, not completed: (step, ticket)
        self._where = InlineChoice()  # its decode steps on this loop or in a thread (inline.py)

    def attach(self, make_engine: Callable[[int], Awaitable[BatchEngine]], tokenizer: Any, ctx: int,
               kv_position: int) -> None:
        """`await make_engine(ctx)`: a BatchEngine of cfg.max_batch slots of ctx positions; kv_position: the
        bytes of one position of one slot (of the whole model). Once: later calls change nothing."""
        if self.core is None:
            self._make, self.tokenizer = make_engine, tokenizer
            self.core = BatchCore(self.cfg, ctx, kv_position)
            self.core.rebuilt = True  # no engine yet

    def busy(self) -> bool:
        return self.core is not None and self.core.busy()

    def replan(self, workers: tuple[str, ...]) -> None:
        """(idle) The next step makes the engine anew over `workers` (the cached prefixes go with the old one)."""
        self.workers = workers
        if self.core is not None:
            self.core.rebuilt = True
            self.core.entries.clear()

    def serving(self) -> ServingStatus:
        """What Status shows of it now."""
        c = self.core
        if c is None:
            return ServingStatus(0, 0, 0, self.cfg.max_batch, self.cfg.queue, 0, 0)
        running = sum(s.state == "running" for s in c.running)  # (a cancelled one leaves at the next plan)
        return ServingStatus(running, len(c.queue), c.last_batch, self.cfg.max_batch, self.cfg.queue, c.reserved(), c.budget,
                             self._rate(), self.served)

    def _rate(self) -> float:
        """Tokens generated a second over the steps of the last RATE_WINDOW_S seconds (0: fewer than two)."""
        now = self._clock()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        if len(self._recent) < 2 or self._recent[-1][0] <= self._recent[0][0]:
            return 0.0
        return sum(n for _, n in list(self._recent)[1:]) / (self._recent[-1][0] - self._recent[0][0])

    # --- one request ---

    async def generate(self, link: Any, g: Generate, ids: list[int], extra: tuple[str, ...] = (),
                       already: tuple[int, ...] = ()) -> None:
        """Serve g (its prompt token ids: ids) among the others, answering on link; `extra`: stats lines for Done.
        already: tokens of its answer the client has from a root that was lost (a resumption): prefilled after
        the prompt, their text not sent again, counted in its max tokens."""
        self._rid += 1
        sampler = SamplerConfig(g.temperature, g.top_k, g.top_p, g.min_p, g.repeat_penalty, seed=g.seed)
        # (text, the ids it completes): at most steps pieces; the client may lag
        send, receive = trio.open_memory_channel[tuple[str, tuple[int, ...]]](math.inf)
        if already and len(already) >= g.steps:
            await _send_quietly(link, Done(len(ids), len(already), 0.0, 0.0, self.nodes, self.node_id, extra, "steps"))
            return
        try:
            seq = Seq(self._rid, tuple(ids) + tuple(already), g.steps - len(already), g.ctx)
            stream = _Stream(seq, Sampler(sampler), StreamDecoder(self.tokenizer), StopFilter(g.stop),
                             frozenset(self.tokenizer.eos_ids), send, receive, self._clock(), prompt=len(ids))
            for token in already:  # their text is the client's already
                stream.stops.push(stream.decoder.push(token))
            stream.sampler.advance(len(already))  # a seeded request draws on as the lost root would have
            self.core.submit(seq)
        except (CodedError, ValueError) as e:
            log.info("request from %s refused: %s", link.peer, e)
            await _send_quietly(link, Error(code_of(e, ErrorCode.INVALID_REQUEST), f"root {self.node_id}: {e}"))
            return
        self._streams[seq.rid] = stream
        self._wake.set()
        try:
            async with receive:
                async for piece, piece_ids in receive:
                    await link.send(TokenChunk(piece, piece_ids))
            if stream.failure is not None:
                await link.send(stream.failure)
                return
            log.info("request %d: %d prompt tokens on %d nodes, %d generated, batched (%d running)%s%s", seq.rid,
                     len(seq.prompt), self.nodes, seq.generated, len(self.core.running),
                     f", up to {stream.flights} steps in flight" if stream.flights > 1 else "",
                     f" ({seq.cached} of them already in its KV cache)" if seq.cached else "")
            await link.send(self._done(stream, extra))
            self.served += 1
        except LinkClosed:
            pass  # the client went away: its sequence is cancelled below
        finally:
            self.core.cancel(seq)  # nothing if it is done
            self._streams.pop(seq.rid, None)
            self._wake.set()

    def _done(self, s: _Stream, extra: tuple[str, ...]) -> Done:
        seq = s.seq
        already = len(seq.prompt) - s.prompt
        computed = len(seq.prompt) - seq.cached
        prefill = s.first - s.submitted if s.first else 0.0
        decode = (seq.generated - 1) / (s.last - s.first) if seq.generated > 1 and s.last > s.first else 0.0
        lines = extra + (f"batched: up to {s.most} sequences per step (max_batch {self.cfg.max_batch})"
                         + (f", up to {s.flights} steps in flight (pipelined groups)" if s.flights > 1 else ""),)
        if seq.cached:
            lines += (f"{seq.cached} of the {len(seq.prompt)} prompt tokens were cached (a shared prefix)",)
        if already:
            lines += (f"resumed after {already} tokens generated by a root that was lost or left",)
        lines += tuple(r.line() for r in s.recoveries)
        return Done(s.prompt, already + seq.generated, computed / prefill if prefill else 0.0, decode, self.nodes, self.node_id,
                    lines, seq.stop_reason, cached_tokens=min(seq.cached, s.prompt))

    # --- the steps ---

    async def run(self) -> None:
        """(a task of the daemon) Step while requests run; close the engine once idle for WARM_S, and on the way out."""
        try:
            while True:
                if not self.busy():
                    self._give_slot()
                    with trio.move_on_after(WARM_S if self._engine is not None else math.inf) as idle:
                        await self._wake.wait()
                    self._wake = trio.Event()
                    if idle.cancelled_caught:
                        await self._close()  # idle for WARM_S: the engine and its cached prefixes go
                    continue
                if not await self._take_slot():
                    continue
                await self.step()
        finally:
            self._give_slot()
            with trio.CancelScope(shield=True):
                self._fail_all(Error(ErrorCode.GENERATE, f"root {self.node_id} is shutting down"))
                await self._close()

    async def step(self) -> bool:
        """One step (tests call it directly); False when nothing ran. Over a pipeline plan of s stages (the
        engine's `depth`), up to s groups' steps are in flight, one completed per call (_pipelined_step)."""
        if not self._flying and (self.core.rebuilt or self._engine is None) and self.core.busy():
            try:  # made before the plan: its depth says how to step (plan() may still grow the context)
                await self._remake()
            except Exception as e:
                await self._failed(e)
                return False
        if self._flying or self._groups() > 1:
            return await self._pipelined_step()
        step = self.core.plan()
        if step is None:
            await trio.sleep(0.01)  # nothing to compute yet (not expected while any request runs)
            return False
        try:
            if self.core.rebuilt or self._engine is None:
                await self._remake()
            engine = self._engine
            if self._where.inline(step.rows, engine):
                t0 = time.perf_counter()
                sampled = self._compute(engine, step)
                self._where.ran_inline(engine, took := time.perf_counter() - t0)
            else:
                sampled, took = await trio.to_thread.run_sync(self._timed_compute, engine, step)
                self._where.ran_in_thread(step.rows, engine, took)
        except Exception as e:
            await self._failed(e)
            return False
        self._finish_step(step, sampled, took)
        await trio.lowlevel.checkpoint()  # (after an inline step) the loop's other tasks run between steps
        return True

    async def _remake(self) -> None:
        """A new engine for the core's context (the old one closed first: its memory goes before). The default
        KV budget is then at most what this node's memory holds of the engine's KV (admission.meminfo x
        MEMORY_SHARE over its bytes a position: a cluster root's share): more requests wait in the queue
        rather than the kernel's OOM killer ending the daemon (workers check their share of the budget when
        the session starts: checks.check_config)."""
        await self._close()
        self._engine = await self._make(self.core.ctx)
        self.core.rebuilt = False
        self._where.reset()
        available = await trio.to_thread.run_sync(meminfo)
        per = getattr(self._engine, "kv_bytes_per_position", 0) or self.core.kv_position  # this node's share
        self.core.set_memory(0 if available is None else int(available * MEMORY_SHARE) // per)
        full = self.cfg.max_batch * self.core.ctx
        if self.core.budget < full and not self.cfg.kv_budget:  # (a budget set in the config is the config's)
            log.info("KV budget: %d positions, what %.0f MiB of available memory holds (max_batch %d contexts of "
                     "%d would take %.0f MiB)", self.core.budget, available / 2**20, self.cfg.max_batch,
                     self.core.ctx, full * per / 2**20)

    async def _failed(self, e: Exception) -> None:
        """The engine failed: a worker lost costs the running requests a pause (_recover); anything else (or
        too many losses in a row) fails every request with it. The engine is closed."""
        if await self._recover(e):
            return
        if isinstance(e, user_facing_errors()):
            log.warning("batch step failed: %s", e)
            self._fail_all(Error(code_of(e), f"root {self.node_id}: {e}"))
        else:  # a bug: its requests fail, the daemon serves on
            log.error("batch step failed unexpectedly", exc_info=e)
            self._fail_all(Error(ErrorCode.INTERNAL, f"root {self.node_id}: internal error (see its log)"))
        await self._close()

    async def _recover(self, e: Exception) -> bool:
        """A worker lost (on_lost names the workers left): the engine goes, the next is made over those left, and
        every running sequence computes again what its slot held. False: not a loss, or one too many."""
        if self._on_lost is None or self._losses >= MAX_RECOVERIES or not self.core.running:
            return False
        try:
            lost = await self._on_lost(e)
        except Exception as hook_error:  # a bug there: the requests fail with e, the daemon serves on
            log.error("re-planning after a lost worker failed", exc_info=hook_error)
            return False
        if lost is None:
            return False
        cause, workers = lost
        self._losses += 1
        for s in self._streams.values():
            if s.seq.state == "running" and s.lost is None:
                s.lost = (cause, s.last or s.submitted, len(s.seq.tokens), self.nodes)
            elif s.lost is not None:  # lost again before it resumed: one pause, both causes
                s.lost = (f"{s.lost[0]}; {cause}",) + s.lost[1:]
        await self._close()
        self.core.rewind()
        self.workers = workers
        log.warning("batch step failed: %s; re-planning over %d workers, %d running requests go on", e, len(workers),
                    len(self.core.running))
        return True

    def _finish_step(self, step: Step, sampled: list[tuple[_Stream, int]], seconds: float = 0.0) -> None:
        self.steps += 1
        self._losses = 0
        self._recent.append((self._clock(), len(sampled)))
        try:
            self._on_step(self._engine, step.rows, seconds)
        except Exception as e:  # a bug in the rates' bookkeeping costs no request
            log.error("a step's figures were not recorded", exc_info=e)
        for seq in step.seqs:
            if (stream := self._streams.get(seq.rid)) is not None:
                stream.most = max(stream.most, len(step.rows))
                stream.flights = max(stream.flights, len(self._flying) + 1)
        self.core.advance(step)
        now = self._clock()
        for stream, token in sampled:
            self._emit(stream, token, now)

    def _groups(self) -> int:
        """Steps to keep in flight: the engine's depth (a pipeline's stages) unless the config says (1: one batch)."""
        depth = getattr(self._engine, "depth", 1)
        return min(depth, self.cfg.groups) if self.cfg.groups else depth

    async def _pipelined_step(self) -> bool:
        """(a pipeline plan) Submit the steps of the groups not in flight (BatchCore.plan_groups), then complete
        the oldest step in flight and sample its rows, in one engine call off the loop. False when nothing ran."""
        steps = self.core.plan_groups(self._groups(), len(self._flying))
        if not steps and not self._flying:
            await trio.sleep(0.01)
            return False
        try:
            if self.core.rebuilt:  # the queue's head needs a larger context (nothing runs): a new engine
                await self._remake()
            done, sampled = await trio.to_thread.run_sync(self._submit_complete, self._engine, steps)
        except Exception as e:
            for step in steps:
                self.core.land(step)
            await self._failed(e)
            return False
        self._finish_step(done, sampled)
        return True

    def _submit_complete(self, engine: Any, steps: list[Step]) -> tuple[Step, list[tuple[_Stream, int]]]:
        """(thread) Each step's copies and rows submitted in turn; then the oldest in flight completed, sampled.
        An engine without submit (made anew after the groups were planned: the context grew) runs each at
        its completion."""
        pipelined = hasattr(engine, "submit")
        for step in steps:
            for c in step.copies:
                engine.copy_prefix(c.src, c.dst, c.n)
            self._flying.append((step, engine.submit(step.rows) if pipelined else step.rows))
        step, ticket = self._flying[0]
        # (if it fails, the step is landed with the others: _close)
        logits = engine.complete(ticket) if pipelined else engine.forward_batch(ticket)
        self._flying.popleft()
        return step, self._sample(step, logits)

    def _timed_compute(self, engine: BatchEngine, step: Step) -> tuple[list[tuple[_Stream, int]], float]:
        """(thread) _compute and its seconds."""
        t0 = time.perf_counter()
        return self._compute(engine, step), time.perf_counter() - t0

    def _compute(self, engine: BatchEngine, step: Step) -> list[tuple[_Stream, int]]:
        """(thread) The step's copies and rows on the engine; each finished row's next token sampled."""
        for c in step.copies:
            engine.copy_prefix(c.src, c.dst, c.n)
        return self._sample(step, engine.forward_batch(step.rows))

    def _sample(self, step: Step, logits: Any) -> list[tuple[_Stream, int]]:
        """(thread) logits: f32[rows, vocab] of step -> each finished row's next token."""
        out = []
        for i, (seq, sample) in enumerate(zip(step.seqs, step.sample)):
            stream = self._streams.get(seq.rid)
            if sample and stream is not None and seq.state == "running":
                out.append((stream, stream.sampler(logits[i], seq.tokens)))
        return out

    def _emit(self, s: _Stream, token: int, now: float) -> None:
        """token for stream s: its text (if any) to its channel; its channel closed once it is done."""
        seq = s.seq
        if seq.state != "running":
            return
        if s.lost is not None:  # its first token since a worker was lost: the pause ends
            cause, since, replayed, before = s.lost
            s.lost = None
            s.recoveries.append(Recovery(cause, now - since, replayed, before, self.nodes, time.time()))
            self._on_recovered(s.recoveries[-1])
        if token in s.eos:
            self.core.finish(seq, "eos")
            text = ""
        else:
            self.core.push(seq, token)
            s.pending.append(token)
            s.first, s.last = s.first or now, now
            text = s.stops.push(s.decoder.push(token))
            if s.stops.stopped:
                self.core.finish(seq, "stop")
                seq.stop_reason = "stop"  # also when this was its last token (as the solo loop says)
        if seq.state == "done" and seq.stop_reason != "stop":
            text += s.stops.push(s.decoder.flush())
            text += s.stops.flush()
        try:
            if text:
                s.send.send_nowait((text, tuple(s.pending)))
                s.pending.clear()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.core.cancel(seq)  # nobody listens any more
        if seq.state != "running":
            s.send.close()

    def _fail_all(self, error: Error) -> None:
        """Every running and queued request ends with error."""
        for s in list(self._streams.values()):
            if s.seq.state in ("running", "queued"):
                s.failure = error
                self.core.cancel(s.seq)
                s.send.close()

    # --- the slot and the engine ---

    async def _take_slot(self) -> bool:
        if self._holding or self._slot is None:
            return True
        with trio.move_on_after(self._wait_slot):
            await self._slot.acquire()
            self._holding = True
            return True
        self._fail_all(Error(ErrorCode.BUSY, f"node {self.node_id} is busy"))
        return False

    def _give_slot(self) -> None:
        if self._holding and self._slot is not None:
            self._slot.release()
        self._holding = False

    async def _close(self) -> None:
        for step, _ in self._flying:  # (a failure) their tickets go with the engine
            self.core.land(step)
        self._flying.clear()
        engine, self._engine = self._engine, None
        if self.core is not None:
            self.core.entries.clear()  # their KV goes with the engine
            self.core.rebuilt = True
        if engine is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.close)
                del engine
                await trio.to_thread.run_sync(trim)  # its buffers go back to the system (memory.trim)


async def _send_quietly(link: Any, msg: Any) -> None:
    try:
        await link.send(msg)
    except LinkClosed:
        pass
