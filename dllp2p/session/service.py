"""A prompt sent to a daemon (wire.Generate): the root generates it, any other daemon forwards it.

    root      the model (loaded once, memory-mapped) -> prompt tokens -> an engine over the compatible
              members as they are at this moment (root.start: Hello, plan, weight push, mesh; the
              JIT engine when the root is alone) -> the generation loop in one worker thread ->
              TokenChunks (text + the ids it completes) through a bounded channel -> Done
    forward   (forwarding.py) a connection to the root; the Generate passed on (hops + 1); every answer relayed back;
              RootLost (the ids relayed so far) when the root is lost or stops first, for the prompt
              slot (daemon/prompts.py) to resubmit to the next root as Generate.already

Many at once: a root alone (no worker takes part) serves its requests together (serve_batched ->
batching.BatchService: continuous batching over one JIT engine of max_batch sequence slots, a FIFO
queue, 429 beyond it, prefix sharing); what follows is the path of a root with workers, one request at a
time in the prompt slot.

Re-planning: every request that cannot reuse the kept session (below) plans anew over the
membership of that moment (epoch = the request's number), so a daemon that joined since the last
request takes part in this one as far as the scheduler's policy allows, and one that left is not in it. Workers keep their slices in their
content-addressed cache, so only slices a worker lacks are pushed. The daemon runs one request at a
time (its slot), so a plan never changes in the middle of a request.

Warm sessions: after a request the root keeps its engine (the cluster session: workers, mesh, every
node's engine and KV cache) for WARM_S seconds. The next request with the same members and context
size reuses it, skipping the set-up (its prompt starts again at position 0); anything else closes it
first (keep_warm closes it once it has waited WARM_S). A kept session that fails before its first
token (a worker died meanwhile) is closed and the request starts afresh, planning without whoever
cannot be reached.

Recovery: a worker lost in the middle of a request (killed, unplugged, silent past the step timeout,
or leaving on SIGTERM) costs a pause, not the request. The root tells the daemon at once (`on_lost`:
membership drops it, so the next prompt is planned without it too), plans again over the workers still
alive (fewer nodes, or the root alone), rebuilds the KV cache with one batched prefill of the prompt and
the tokens streamed so far, and goes on with the same sampler (recovery.InFlight; generate's `already`):
the client's text is that of an undisturbed run. Each recovery is logged, counted in Status and reported
in Done's lines (`run --stats`). serve(..., already=tokens) is the same resumption for a request another
root began: those tokens are prefilled, never streamed again, the sampler moved past them.

A full disk: a worker that answers the weight push with disk_full (worker.py) is left out of this
request's plan (planned again at once without it) and of every plan for LEFT_OUT_S; Status lists it
(left_out_now) with the worker's message.

Error handling: whatever fails while serving a request (a bad prompt, no model, a worker lost, the
root unreachable) is answered with one Error frame naming it; the daemon serves on. A client that
goes away ends the generation at its next token.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import trio

from ..chat import Message
from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..memlimit import engine_options
from ..error_codes import CodedError, ErrorCode, code_of
from ..errors import user_facing_errors
from ..engine import kv_bytes_per_position
from ..formats import load_model
from ..memory import trim
from ..prompt import chat_tokens, prompt_tokens
from ..sampler import SamplerConfig
from ..pipeline import AnyPlan, build_plan
from ..scheduler import Peer, Plan, rates_moved
from ..tokenizer import Tokenizer
from ..wire.link import TrioLink, first_error
from ..wire.messages import Done, Error, Generate, TokenChunk
from ..wire.reports import PlanEstimate
from .autoplan import PUSH_MIN, Assume, NodeFacts, choose_for, estimates, model_shape
from .batcher import BatchConfig
from .batching import BatchService, jit_batch_engine
from .forwarding import _send_error
from .records import _LeftOut, _Loaded, _Warm
from . import admission
from .progress import Latest, LogEvents
from .busy import BusyNodes, Polled
from .rates import RateMeter, batched_step
from .recovery import MAX_RECOVERIES, InFlight, Recovery, produce
from .root import ClusterError, ClusterOptions, start
from .slices import PlanSlices

log = logging.getLogger("dllp2p.daemon")

CHANNEL = 16  # text pieces between the generation thread and the connection
WARM_S = 30.0  # how long a finished request's engine is kept for the next one
LEFT_OUT_S = 600.0  # how long a worker that answered disk_full is planned without


class RootService:
    """What a daemon needs to serve requests as the root. `tp`: the compute module getter."""

    def __init__(self, model_path: Path | None, node_id: str, threads: int, policy: str, timeouts: Timeouts,
                 tp: Callable[[], Any], exchange: str = "exact", cache_dir: Path | None = None,
                 key: ClusterKey | None = None, on_lost: Callable[[str, str], None] = lambda address, cause: None,
                 meter: RateMeter | None = None, rates: Callable[[], dict[str, float]] = dict,
                 pick_threads: Callable[[], int] | None = None, batch: BatchConfig = BatchConfig(),
                 slot: trio.Lock | None = None, polled: Callable[[], list[Polled]] = list, drop_busy: bool = False,
                 mem_limit: int | None = None):
        self.model_path, self.mem_limit = model_path, mem_limit  # mem_limit: its engines' budget (ir_stream.py)
        self.on_lost = on_lost  # (address, cause) of a worker lost mid-request: the daemon's membership drops it
        self.pick_threads = pick_threads  # (blocking) the thread count for a request's engine; None: `threads`
        self.meter = meter or RateMeter()  # this node's compute rate (session/rates.py)
        self.rates = rates  # node id -> the members' rates as their latest Status polls said
        self.polled = polled  # the members' rates and CPU waits by their latest Status polls (busy.py)
        self.busy = BusyNodes() if drop_busy else None  # workers left out while their CPU is busy
        self.key = key  # the cluster key its connections to the workers are made with
        self.node_id = node_id
        self.threads = threads
        self.policy = policy
        self.exchange = exchange
        self.timeouts = timeouts
        self._tp = tp
        self.cache_dir = cache_dir  # the engines' (kernels, packed weights); None: the engine's default
        self._slices: PlanSlices | None = None  # node_tensors per plan shape: every slice hashed once
        self.progress = Latest(LogEvents(log))  # the latest set-up's progress, for Status
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self.requests = 0  # served or failed
        self.last_plan: AnyPlan | None = None  # of the latest request (Status shows it)
        self._warm: _Warm | None = None  # the last request's engine, kept for the next one
        self._left_out: dict[str, _LeftOut] = {}  # address -> a worker planned without for a while (disk full)
        self.figures: NodeFacts | None = None  # this machine's measured figures (the daemon sets them)
        self.assume = Assume()  # figures its config states for every node in place of measured ones (plan_figures)
        self.shape: tuple[Any, Any] | None = None  # (costmodel.ModelShape, ModelConfig) of its model, for previews
        self._link_mbps: dict[str, float] = {}  # node id -> MB/s of the latest timed push to it
        self._weights: dict[str, float] = {}  # node id -> the weight its latest plan gave it (root.start)
        self.last_choice: Any = None  # planner.Choice of the latest "auto" plan
        self.last_measured_ms = 0.0  # ms per decoded token of the latest request (0: none)
        self._plans = 0  # plans made: every request's and every recovery's (their epochs)
        self.recoveries = 0  # requests that lost a node and went on
        self.last_recovery: Recovery | None = None
        # requests served alone are batched (batching.py; its run() is a task of the daemon)
        self.batching = BatchService(batch, node_id, slot, timeouts.idle, on_lost=self._batch_lost,
                                     on_recovered=lambda r: self._count(r, "batched request"), on_step=self._batch_stepped)

    def plan_estimates(self, members: Sequence[NodeFacts] = ()) -> tuple[PlanEstimate, ...]:
        """The candidates the latest "auto" plan priced, fastest first; the chosen one with the measured
        ms per decoded token of the latest request (Status, `dllp2p plan`). Before any: a preview over
        `members` (the other compatible members, as the daemon knows them) once the model's shape is known."""
        c = self.last_choice
        if c is None and self.policy == "auto" and self.shape is not None:
            me = self.figures or NodeFacts(self.node_id, float(self.threads))
            facts = [self.assume.apply(n) for n in (me, *members)]
            c = choose_for(self.shape[0], self.shape[1], facts, self.exchange)[0]
        return () if c is None else estimates(c, self.last_measured_ms)

    def learn_shape(self) -> None:
        """(thread) The model's shape for previews (the file's header and tensor table; ~0.1 s for SmolLM2)."""
        if self.model_path is not None and self.shape is None:
            model = load_model(self.model_path)
            self.shape = (model_shape(model), model.config)

    def left_out_now(self) -> list[_LeftOut]:
        """Workers this root plans without at this moment (Status shows them)."""
        now = time.time()
        return [x for x in self._left_out.values() if x.until > now]

    def _load(self) -> _Loaded:
        """(thread) The model and tokenizer, loaded by the first request."""
        with self._lock:
            if self._loaded is None:
                if self.model_path is None:
                    raise CodedError(f"root {self.node_id} has no model (start its daemon with --model PATH)",
                                     ErrorCode.NO_MODEL)
                model = load_model(self.model_path)
                self._loaded = _Loaded(model, Tokenizer.from_metadata(model.metadata))
            return self._loaded

    async def prompt_ids(self, link: TrioLink, g: Generate) -> list[int] | None:
        """g's prompt token ids, checked against the vocabulary and context; None once an Error is sent. Called
        outside the prompt slot: a long prompt's tokenization (in a thread) holds up no other request, and a
        text too long for the context in any tokenization is refused before it starts."""
        try:
            admission.check_length(g)
            loaded = await trio.to_thread.run_sync(self._load)
            ids = list(g.tokens) or await trio.to_thread.run_sync(self._tokens, loaded, g)
            admission.check_prompt(ids, loaded.model.config.vocab_size, g.ctx)
            admission.check_vocabulary(g.already, loaded.model.config.vocab_size)
            admission.check_ctx(g.ctx, loaded.model.config, await trio.to_thread.run_sync(admission.meminfo))
            return ids
        except user_facing_errors() as e:
            log.warning("request from %s refused: %s", link.peer, e)
            await _send_error(link, Error(code_of(e), f"root {self.node_id}: {e}"))
            return None

    async def serve_batched(self, link: TrioLink, g: Generate, workers: list[str], ids: list[int]) -> bool:
        """Serve g together with the others (batching.py) when this root is alone, or over its workers too when
        BatchConfig.cluster; False: serve it in the prompt slot (a root with workers, by default). A change of
        workers takes effect when the batcher is idle (the engine is made anew over them)."""
        loaded = await trio.to_thread.run_sync(self._load)
        self._judge_busy(loaded.model, workers)
        left_out = {x.address for x in self.left_out_now()}
        workers = [w for w in workers if w not in left_out]
        if workers and not self.batching.cfg.cluster:
            return False
        self.batching.attach(self._batch_engine, loaded.tokenizer, g.ctx, kv_bytes_per_position(loaded.model.config))
        if not self.batching.busy() and tuple(workers) != self.batching.workers:
            self.batching.replan(tuple(workers))
        self.requests += 1
        await self.batching.generate(link, g, ids, already=g.already)
        return True

    async def _batch_engine(self, ctx: int) -> Any:
        """The batcher's engine: max_batch sequence slots of ctx positions, on this root alone (JIT) or over
        the batcher's workers (a ClusterEngine, every node holding the slots)."""
        model, slots = self._load().model, self.batching.cfg.max_batch
        if not self.batching.workers:
            extra = engine_options(cache_dir=self.cache_dir, mem_limit=self.mem_limit)
            engine = await trio.to_thread.run_sync(partial(jit_batch_engine, model, ctx, self.threads, slots, **extra))
            await trio.to_thread.run_sync(_settle_memory, model)
            self.last_plan = self._alone_plan(model.config, self.threads, self.requests)
            self.batching.nodes = 1
            return engine
        await self.close_warm()  # a kept session of the slot's path holds the workers
        engine, self.last_plan, _ = await self._engine_usable(
            model, ctx, list(self.batching.workers), self.requests, slots, min(self.batching.core.budget, slots * ctx))
        self.batching.nodes = self.last_plan.n_nodes
        return engine

    def _alone_plan(self, config: Any, threads: int, epoch: int) -> AnyPlan:
        """The plan of this root serving alone (Status shows it); "auto" alone is a one-node weighted plan."""
        policy = "weighted" if self.policy == "auto" else self.policy
        return build_plan(config, [Peer(self.node_id, "", threads, float(threads))], epoch, policy,
                          exchange=self.exchange)

    async def serve(self, link: TrioLink, g: Generate, workers: list[str], ids: list[int],
                    already: tuple[int, ...] = ()) -> None:
        """Generate g (its prompt_ids: ids) over this root and `workers` ("host:port" of the compatible
        members), answering on link. already: tokens of this request's answer the client has (another
        root streamed them): prefilled, not streamed again; the answer goes on after them."""
        self.requests += 1
        epoch = self.requests
        try:
            if already:
                log.info("request %d resumes after %d tokens generated by a root that is gone", epoch, len(already))
            await self._serve(link, g, workers, epoch, ids, already)
        except user_facing_errors() as e:  # ClusterError and PlanError included
            log.warning("request %d failed: %s", epoch, e)
            await _send_error(link, Error(code_of(e), f"root {self.node_id}: {e}"))

    def _next_epoch(self) -> int:
        self._plans += 1
        return self._plans

    async def _serve(self, link: TrioLink, g: Generate, workers: list[str], epoch: int, ids: list[int],
                     already: tuple[int, ...] = ()) -> None:
        sampler = SamplerConfig(g.temperature, g.top_k, g.top_p, g.min_p, g.repeat_penalty, seed=g.seed)
        loaded = await trio.to_thread.run_sync(self._load)
        request = InFlight.resume(loaded.tokenizer, ids, sampler, g.stop, already)
        self._judge_busy(loaded.model, workers)
        left_out = {x.address for x in self.left_out_now()}
        workers = [w for w in workers if w not in left_out]
        key = (tuple(workers), g.ctx)
        warm = self._take_warm(key)
        if warm is None:
            await self.close_warm()
            engine, the_plan, key = await self._engine_usable(loaded.model, g.ctx, workers, self._next_epoch())
        else:
            engine, the_plan = warm.engine, warm.plan
        cached = warm.kv if warm else ()
        while True:
            self.last_plan = the_plan
            try:
                await self._stream(link, engine, loaded, request, g.steps, cached)
            except BaseException as e:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(engine.close)
                self._settle(request, epoch)
                if warm is not None and not request.tokens and isinstance(e, ClusterError):
                    log.info("request %d: the kept session failed before its first token (%s); starting afresh", epoch, e)
                    if e.lost and e.address:  # it died since the last request: out of the membership now
                        self.on_lost(e.address, str(e))
                    warm, cached = None, ()
                    engine, the_plan, key = await self._engine_usable(loaded.model, g.ctx, workers, self._next_epoch())
                    continue
                if not (isinstance(e, ClusterError) and e.lost and e.recoverable
                        and len(request.recoveries) < MAX_RECOVERIES):
                    raise
                warm, cached = None, ()
                workers = await self._drop_lost(request, e, the_plan, workers, epoch)
                engine, the_plan, key = await self._engine_usable(loaded.model, g.ctx, workers, self._next_epoch())
                request.replanned(the_plan.n_nodes)
                continue
            break
        self._settle(request, epoch)
        stats = request.stats
        log.info("request %d: %d prompt tokens on %d nodes%s", epoch, len(ids), the_plan.n_nodes,
                 f" (session kept from the last request, {stats.reused_tokens} of them already in its KV cache)"
                 if warm else "")
        lines = tuple(engine.stats_summary()) if hasattr(engine, "stats_summary") else ()
        if stats.reused_tokens:
            lines += (f"{stats.reused_tokens} of the {len(ids)} prompt tokens were in the kept session's KV cache",)
        lines += tuple(r.line() for r in request.recoveries)
        self._measure(engine, the_plan, loaded.model.config.n_layers, stats)
        self._warm = _Warm(key, engine, the_plan, trio.current_time() + WARM_S, stats.kv_tokens,
                           dict(getattr(engine, "rates", {})))
        self.last_measured_ms = 1e3 / stats.decode_tok_s if stats.decode_tok_s > 0 else 0.0
        if already:
            lines += (f"resumed after {len(already)} tokens generated by a root that was lost or left",)
        await link.send(Done(stats.prompt_tokens, stats.generated_tokens, stats.prefill_tok_s, stats.decode_tok_s,
                             the_plan.n_nodes, self.node_id, lines, stats.stop_reason))

    async def _drop_lost(self, request: InFlight, e: ClusterError, before: Plan, workers: list[str],
                         number: int) -> list[str]:
        """A worker was lost mid-request (e names it): the daemon is told (on_lost), the request notes the
        loss (its pause runs from its last token). -> the workers to plan over now."""
        request.lost(self._lost_worker(e), before.n_nodes)
        left = [w for w in workers if w != e.address]
        log.warning("request %d: %s after %d tokens; re-planning over %d workers and resuming",
                    number, e, len(request.tokens), len(left))
        return left

    def _lost_worker(self, e: ClusterError) -> str:
        """A worker lost mid-generation: the daemon is told (on_lost, its membership drops it). -> the cause."""
        how = "left (shutting down)" if code_of(e) == ErrorCode.LEAVING else "lost"
        if e.address:
            self.on_lost(e.address, str(e))
        return f"worker {e.address} (node {e.node_id}) {how}" if e.address else "a node lost"

    async def _batch_lost(self, e: Exception) -> tuple[str, tuple[str, ...]] | None:
        """A batched step failed with e (batching.py): a worker lost -> (the cause, the workers to go on over)."""
        if not (isinstance(e, ClusterError) and e.lost and e.recoverable):
            return None
        return self._lost_worker(e), tuple(w for w in self.batching.workers if w != e.address)

    def _batch_stepped(self, engine: Any, rows: Any, seconds: float) -> None:
        """A batched step ran: a decode step of one row feeds this node's rate meter (rates.batched_step)."""
        loaded = self._loaded  # (the batcher's engine was made from it)
        batched_step(self.meter, engine, rows, seconds, self.last_plan, loaded.model.config.n_layers if loaded else 0)

    def _count(self, r: Recovery, what: str) -> None:
        """A request that lost a node went on: counted (Status) and logged."""
        self.recoveries += 1
        self.last_recovery = r
        log.warning("%s %s", what, r.line())

    def _settle(self, request: InFlight, number: int) -> None:
        """Count and log the request's recoveries that have resumed (their pause is known) since last time."""
        for r in request.recoveries[request.reported:]:
            self._count(r, f"request {number}")
        request.reported = len(request.recoveries)

    def handed_over(self, r: Recovery) -> None:
        """A request this daemon forwarded lost its root and resumed on the next one (daemon/prompts.py):
        counted and shown with the recoveries it made as root (Status, the log)."""
        self._count(r, "request")

    async def _stream(self, link: TrioLink, engine: Any, loaded: _Loaded, request: InFlight, steps: int,
                      cached: tuple[int, ...] = ()) -> None:
        """Generate request on engine from where it stands, each text piece sent on link as a TokenChunk with
        the ids it completes (what a forwarding daemon needs to resume the request if this root is lost).
        The engine's own error (a lost worker: ClusterError) is raised as it is, not inside an exception group."""
        send, recv = trio.open_memory_channel[tuple[str, tuple[int, ...]]](CHANNEL)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, engine, loaded, request, steps, send, cached)
                async with recv:
                    async for piece, piece_ids in recv:
                        await link.send(TokenChunk(piece, piece_ids))
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    def _measure(self, engine: Any, the_plan: AnyPlan, n_layers: int, stats: Any) -> None:
        """This node's compute rate from the request's decode steps: its compute ms (a cluster's root: not
        the exchanges' waits, but its waits for a CPU) for its share of the plan; alone, the decode speed."""
        steps = getattr(getattr(engine, "stats", None), "steps", None)
        if steps is None:
            self.meter.add_rate(stats.decode_tok_s if stats.generated_tokens > 1 else 0.0)
            return
        self.meter.add_plan_steps(steps, the_plan, n_layers)

    def _judge_busy(self, model: Any, workers: list[str]) -> None:
        """Plan without the workers whose CPU wait costs more than their share saves (busy.py), for a while."""
        other = {x.address for x in self.left_out_now() if x.code != "cpu_wait"}  # out for another reason
        polled = [p for p in self.polled() if p.address in workers and p.address not in other]
        if self.busy is not None and polled:
            me = Polled(self.node_id, "", self.meter.rate, self.meter.wait_ms)
            for x in self.busy.judge(model_shape(model), self.exchange, me, polled, time.time()):
                self._left_out[x.address] = _LeftOut(x.node_id, x.address, "cpu_wait", x.reason, x.until)

    def current_rates(self) -> dict[str, float]:
        """node id -> the latest measured rate: the members' from their Status polls, this node's own."""
        return {**self.rates(), self.node_id: self.meter.rate}

    def _take_warm(self, key: tuple) -> _Warm | None:
        """The kept engine if it matches key and has not expired (it is no longer kept: the request owns it),
        and (the weighted policy) the nodes' shares of the measured rates have not moved beyond
        scheduler.RATE_TOLERANCE from the weights of its plan (then: re-plan)."""
        w = self._warm
        if w is None or w.key != key or trio.current_time() >= w.until:
            return None
        now = self.current_rates()
        if self.policy == "weighted" and rates_moved(w.rates, now):
            log.info("the nodes' compute rates moved (plan weights %s, rates now %s): planning again",
                     _rates(w.rates), _rates({k: now[k] for k in w.rates}))
            return None
        self._warm = None
        if hasattr(w.engine, "fresh_request"):
            w.engine.fresh_request()
        return w

    async def close_warm(self) -> None:
        """Close the kept engine, if any (its workers go back to idle)."""
        w, self._warm = self._warm, None
        if w is not None:
            await trio.to_thread.run_sync(w.engine.close)
            del w
            await trio.to_thread.run_sync(trim)  # its buffers go back to the system (memory.trim)

    async def keep_warm(self) -> None:
        """(a task of the daemon) Close the kept engine once it has waited WARM_S; close it on the way out."""
        try:
            while True:
                await trio.sleep(1.0)
                w = self._warm
                if w is not None and trio.current_time() >= w.until:
                    await self.close_warm()
        finally:
            with trio.CancelScope(shield=True):
                await self.close_warm()

    @staticmethod
    def _tokens(loaded: _Loaded, g: Generate) -> list[int]:
        if g.messages:
            return chat_tokens(loaded.tokenizer, loaded.model, [Message(t.role, t.content) for t in g.messages])
        return prompt_tokens(loaded.tokenizer, loaded.model, g.prompt, g.chat, g.system)

    async def _engine_usable(self, model: Any, ctx: int, workers: list[str], epoch: int,
                             max_seqs: int = 1, kv_positions: int = 0) -> tuple[Any, AnyPlan, tuple]:
        """_engine, planning again without a worker that answers disk_full (left out for LEFT_OUT_S, with
        one log line). -> (engine, plan, the warm key of the workers it was made over)."""
        while True:
            try:
                engine, the_plan = await self._engine(model, ctx, workers, epoch, max_seqs, kv_positions)
                return engine, the_plan, (tuple(workers), ctx)
            except ClusterError as e:
                if code_of(e) != ErrorCode.DISK_FULL or e.address not in workers:
                    raise
                self._left_out[e.address] = _LeftOut(e.node_id, e.address, ErrorCode.DISK_FULL, str(e),
                                                     time.time() + LEFT_OUT_S)
                log.warning("request %d: %s; planning without it for %.0f s", epoch, e, LEFT_OUT_S)
                workers = [w for w in workers if w != e.address]

    async def _engine(self, model: Any, ctx: int, workers: list[str], epoch: int,
                      max_seqs: int = 1, kv_positions: int = 0) -> tuple[Any, AnyPlan]:
        """A ClusterEngine over this root and the workers (max_seqs KV slots on every node, kv_positions of
        them together: the batcher's budget; 0: max_seqs contexts), or a JIT engine when there are none."""
        threads = await trio.to_thread.run_sync(self.pick_threads) if self.pick_threads else self.threads
        if workers:
            options = ClusterOptions(tuple(workers), self.policy, self.timeouts, exchange=self.exchange,
                                     skip_unreachable=True, cache_dir=self.cache_dir, key=self.key, max_seqs=max_seqs,
                                     mem_limit=self.mem_limit, kv_positions=kv_positions,
                                     figures=self.figures, link_mbps=tuple(self._link_mbps.items()), assume=self.assume,
                                     weights=tuple(self._weights.items()))
            tp = self._tp()
            if self._slices is None:
                self._slices = PlanSlices(tp.plan_tensors)
            self.progress.clear()
            engine = await start(model, options, ctx, threads, tp, self.progress, node_id=self.node_id,
                                 epoch=epoch, slices=self._slices, rate=self.meter.rate, wait_ms=self.meter.wait_ms)
            await trio.to_thread.run_sync(_settle_memory, model)
            self._link_mbps.update(engine.push_rates(PUSH_MIN) if hasattr(engine, "push_rates") else {})
            self._weights.update(getattr(engine, "rates", {}))
            self.last_choice, self.last_measured_ms = getattr(engine, "choice", None), 0.0
            return engine, engine.plan
        from ..jit.engine import JITEngine  # llvmlite: loaded by the first prompt served alone

        alone = self._alone_plan(model.config, threads, epoch)
        extra = engine_options(cache_dir=self.cache_dir, mem_limit=self.mem_limit)
        engine = await trio.to_thread.run_sync(lambda: JITEngine(model, ctx, threads, **extra))
        await trio.to_thread.run_sync(_settle_memory, model)
        return engine, alone

    @staticmethod
    async def _produce(engine: Any, loaded: _Loaded, request: InFlight, steps: int, send: trio.MemorySendChannel,
                       cached: tuple[int, ...] = ()) -> None:
        """The generation loop (recovery.produce) in one worker thread; each text piece, with its ids, goes
        through `send` (blocking when the connection lags). `cached`: what the engine's KV cache holds."""
        async with send:
            await trio.to_thread.run_sync(produce, engine, request, steps, loaded.tokenizer.eos_ids, send, cached)


def _settle_memory(model: Any) -> None:
    """(thread) Once an engine is built: the model file's pages leave the resident set (the engine holds its
    packed copy; a worker's slices are cut from the map again when pushed) with the set-up's garbage."""
    model.release()
    trim()


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(rates.items()))
