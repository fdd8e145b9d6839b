"""A prompt sent to a daemon (wire.Generate): the root generates it, any other daemon forwards it.

    root      the model (loaded once, memory-mapped) -> prompt tokens -> an engine over the compatible
              members as they are at this moment (root.start: Hello, plan, weight push, mesh; the
              JIT engine when the root is alone) -> the generation loop in one worker thread ->
              TokenChunks through a bounded channel -> Done
    forward   a connection to the root; the Generate passed on (hops + 1); every answer relayed back

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
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import trio

from ..chat import Message
from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..error_codes import CodedError, ErrorCode, code_of
from ..errors import user_facing_errors
from ..engine import kv_bytes_per_position
from ..formats import load_model
from ..generate import GenerationStats, StopFilter, generate
from ..prompt import chat_tokens, prompt_tokens
from ..sampler import Sampler, SamplerConfig
from ..scheduler import Peer, Plan, plan
from ..tokenizer import StreamDecoder, Tokenizer
from ..wire.client import GenerateCall
from ..wire.codec import ProtocolError
from ..wire.link import LinkClosed, LinkTimeout, TrioLink, first_error
from ..wire.messages import MAX_HOPS, Done, Error, Generate, TokenChunk
from ..wire.secure import HandshakeFailed
from .batcher import BatchConfig
from .batching import BatchService, jit_batch_engine
from .checks import MAX_CTX, MEMORY_SHARE, mem_available
from .progress import Latest, LogEvents
from .root import ClusterError, ClusterOptions, start
from .slices import PlanSlices

log = logging.getLogger("dllp2p.daemon")

CHANNEL = 16  # text pieces between the generation thread and the connection
WARM_S = 30.0  # how long a finished request's engine is kept for the next one
LEFT_OUT_S = 600.0  # how long a worker that answered disk_full is planned without


@dataclass(frozen=True)
class _LeftOut:
    """A worker the root plans without until `until` (time.time()), and why."""

    node_id: str
    address: str
    code: ErrorCode
    reason: str
    until: float


@dataclass(frozen=True)
class _Warm:
    key: tuple  # (workers, ctx): what the next request must match to reuse the engine
    engine: Any
    plan: Plan
    until: float  # trio.current_time() after which keep_warm closes it
    kv: tuple[int, ...] = ()  # the token ids at the positions its KV cache holds (the last request's)


@dataclass
class _Loaded:
    model: Any  # formats.GGUFModel
    tokenizer: Any  # tokenizer.Tokenizer


class RootService:
    """What a daemon needs to serve requests as the root. `tp`: the compute module getter."""

    def __init__(self, model_path: Path | None, node_id: str, threads: int, policy: str, timeouts: Timeouts,
                 tp: Callable[[], Any], exchange: str = "exact", cache_dir: Path | None = None,
                 key: ClusterKey | None = None, batch: BatchConfig = BatchConfig(), slot: trio.Lock | None = None):
        self.model_path = model_path
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
        self.last_plan: Plan | None = None  # of the latest request (Status shows it)
        self._warm: _Warm | None = None  # the last request's engine, kept for the next one
        self._left_out: dict[str, _LeftOut] = {}  # address -> a worker planned without for a while (disk full)
        # requests served alone are batched (batching.py; its run() is a task of the daemon)
        self.batching = BatchService(batch, node_id, slot, timeouts.idle)

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
            _check_length(g)
            loaded = await trio.to_thread.run_sync(self._load)
            ids = list(g.tokens) or await trio.to_thread.run_sync(self._tokens, loaded, g)
            _check_prompt(ids, loaded.model.config.vocab_size, g.ctx)
            _check_ctx(g.ctx, loaded.model.config, await trio.to_thread.run_sync(_meminfo))
            return ids
        except user_facing_errors() as e:
            log.warning("request from %s refused: %s", link.peer, e)
            await _send_error(link, Error(code_of(e), f"root {self.node_id}: {e}"))
            return None

    async def serve_batched(self, link: TrioLink, g: Generate, workers: list[str], ids: list[int]) -> bool:
        """Serve g together with the others (batching.py) when this root is alone, or over its workers too when
        BatchConfig.cluster; False: serve it in the prompt slot (a root with workers, by default). A change of
        workers takes effect when the batcher is idle (the engine is made anew over them)."""
        left_out = {x.address for x in self.left_out_now()}
        workers = [w for w in workers if w not in left_out]
        if workers and not self.batching.cfg.cluster:
            return False
        loaded = await trio.to_thread.run_sync(self._load)
        self.batching.attach(self._batch_engine, loaded.tokenizer, g.ctx, kv_bytes_per_position(loaded.model.config))
        if not self.batching.busy() and tuple(workers) != self.batching.workers:
            self.batching.replan(tuple(workers))
        self.requests += 1
        await self.batching.generate(link, g, ids)
        return True

    async def _batch_engine(self, ctx: int) -> Any:
        """The batcher's engine: max_batch sequence slots of ctx positions, on this root alone (JIT) or over
        the batcher's workers (a ClusterEngine, every node holding the slots)."""
        model, slots = self._load().model, self.batching.cfg.max_batch
        if not self.batching.workers:
            extra = {} if self.cache_dir is None else {"cache_dir": self.cache_dir}
            engine = await trio.to_thread.run_sync(partial(jit_batch_engine, model, ctx, self.threads, slots, **extra))
            self.last_plan = plan(model.config, [Peer(self.node_id, "", self.threads, float(self.threads))],
                                  self.requests, self.policy, exchange=self.exchange)
            self.batching.nodes = 1
            return engine
        await self.close_warm()  # a kept session of the slot's path holds the workers
        engine, self.last_plan, _ = await self._engine_usable(model, ctx, list(self.batching.workers), self.requests,
                                                              max_seqs=slots)
        self.batching.nodes = self.last_plan.n_nodes
        return engine

    async def serve(self, link: TrioLink, g: Generate, workers: list[str], ids: list[int]) -> None:
        """Generate g (its prompt_ids: ids) over this root and `workers` ("host:port" of the compatible
        members), answering on link."""
        self.requests += 1
        epoch = self.requests
        try:
            await self._serve(link, g, workers, epoch, ids)
        except user_facing_errors() as e:  # ClusterError and PlanError included
            log.warning("request %d failed: %s", epoch, e)
            await _send_error(link, Error(code_of(e), f"root {self.node_id}: {e}"))

    async def _serve(self, link: TrioLink, g: Generate, workers: list[str], epoch: int, ids: list[int]) -> None:
        sampler = SamplerConfig(g.temperature, g.top_k, g.top_p, g.min_p, g.repeat_penalty, seed=g.seed)
        loaded = await trio.to_thread.run_sync(self._load)
        left_out = {x.address for x in self.left_out_now()}
        workers = [w for w in workers if w not in left_out]
        key = (tuple(workers), g.ctx)
        warm = self._take_warm(key)
        if warm is None:
            await self.close_warm()
            engine, the_plan, key = await self._engine_usable(loaded.model, g.ctx, workers, epoch)
        else:
            engine, the_plan = warm.engine, warm.plan
        while True:
            self.last_plan = the_plan
            stats = GenerationStats()
            try:
                await self._stream(link, engine, loaded, ids, sampler, g.steps, stats, g.stop, warm.kv if warm else ())
            except BaseException as e:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(engine.close)
                if warm is None or stats.generated_tokens or not isinstance(e, ClusterError):
                    raise
                log.info("request %d: the kept session failed before its first token (%s); starting afresh", epoch, e)
                warm = None
                engine, the_plan, key = await self._engine_usable(loaded.model, g.ctx, workers, epoch)
                continue
            break
        log.info("request %d: %d prompt tokens on %d nodes%s", epoch, len(ids), the_plan.n_nodes,
                 f" (session kept from the last request, {stats.reused_tokens} of them already in its KV cache)"
                 if warm else "")
        lines = tuple(engine.stats_summary()) if hasattr(engine, "stats_summary") else ()
        if stats.reused_tokens:
            lines += (f"{stats.reused_tokens} of the {len(ids)} prompt tokens were in the kept session's KV cache",)
        self._warm = _Warm(key, engine, the_plan, trio.current_time() + WARM_S, stats.kv_tokens)
        await link.send(Done(stats.prompt_tokens, stats.generated_tokens, stats.prefill_tok_s, stats.decode_tok_s,
                             the_plan.n_nodes, self.node_id, lines, stats.stop_reason))

    async def _stream(self, link: TrioLink, engine: Any, loaded: _Loaded, ids: list[int], sampler: Any, steps: int,
                      stats: Any, stop: tuple[str, ...] = (), cached: tuple[int, ...] = ()) -> None:
        """Generate on engine, each text piece sent on link as a TokenChunk. The engine's own error (a
        lost worker: ClusterError) is raised as it is, not inside an exception group."""
        send, recv = trio.open_memory_channel[str](CHANNEL)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, engine, loaded, ids, sampler, steps, stats, send, stop, cached)
                async with recv:
                    async for piece in recv:
                        await link.send(TokenChunk(piece))
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    def _take_warm(self, key: tuple) -> _Warm | None:
        """The kept engine if it matches key and has not expired (it is no longer kept: the request owns it)."""
        w = self._warm
        if w is None or w.key != key or trio.current_time() >= w.until:
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
                             max_seqs: int = 1) -> tuple[Any, Plan, tuple]:
        """_engine, planning again without a worker that answers disk_full (left out for LEFT_OUT_S, with
        one log line). -> (engine, plan, the warm key of the workers it was made over)."""
        while True:
            try:
                engine, the_plan = await self._engine(model, ctx, workers, epoch, max_seqs)
                return engine, the_plan, (tuple(workers), ctx)
            except ClusterError as e:
                if code_of(e) != ErrorCode.DISK_FULL or e.address not in workers:
                    raise
                self._left_out[e.address] = _LeftOut(e.node_id, e.address, ErrorCode.DISK_FULL, str(e),
                                                     time.time() + LEFT_OUT_S)
                log.warning("request %d: %s; planning without it for %.0f s", epoch, e, LEFT_OUT_S)
                workers = [w for w in workers if w != e.address]

    async def _engine(self, model: Any, ctx: int, workers: list[str], epoch: int,
                      max_seqs: int = 1) -> tuple[Any, Plan]:
        """A ClusterEngine over this root and the workers (max_seqs KV slots on every node), or a JIT engine
        when there are none."""
        if workers:
            options = ClusterOptions(tuple(workers), self.policy, self.timeouts, exchange=self.exchange,
                                     skip_unreachable=True, cache_dir=self.cache_dir, key=self.key, max_seqs=max_seqs)
            tp = self._tp()
            if self._slices is None:
                self._slices = PlanSlices(tp.node_tensors)
            self.progress.clear()
            engine = await start(model, options, ctx, self.threads, tp, self.progress, node_id=self.node_id,
                                 epoch=epoch, slices=self._slices)
            return engine, engine.plan
        from ..jit.engine import JITEngine  # llvmlite: loaded by the first prompt served alone

        alone = plan(model.config, [Peer(self.node_id, "", self.threads, float(self.threads))], epoch, self.policy,
                     exchange=self.exchange)
        extra = {} if self.cache_dir is None else {"cache_dir": self.cache_dir}
        return await trio.to_thread.run_sync(lambda: JITEngine(model, ctx, self.threads, **extra)), alone

    @staticmethod
    async def _produce(engine: Any, loaded: _Loaded, ids: list[int], sampler_config: Any, steps: int, stats: Any,
                       send: trio.MemorySendChannel, stop: tuple[str, ...] = (), cached: tuple[int, ...] = ()) -> None:
        """The generation loop in one worker thread; each text piece goes through `send` (blocking when
        the connection lags). Ends early at a stop string (stats.stop_reason "stop"; the string is not
        sent) or when the receiving side is closed. `cached`: what the engine's KV cache holds."""
        def loop() -> None:
            decoder, stops = StreamDecoder(loaded.tokenizer), StopFilter(stop)

            def out(text: str) -> None:
                if text:
                    trio.from_thread.run(send.send, text)

            tokens = generate(engine, ids, Sampler(sampler_config), steps, loaded.tokenizer.eos_ids, stats,
                              cached=cached)
            try:
                for token in tokens:
                    out(stops.push(decoder.push(token)))
                    if stops.stopped:
                        break
                else:
                    out(stops.push(decoder.flush()))
                    out(stops.flush())  # nothing once stopped
                if stops.stopped:
                    stats.stop_reason = "stop"
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled, trio.RunFinishedError):
                pass  # nobody listens any more
            finally:
                tokens.close()  # now, so stats.kv_tokens says what the KV cache holds

        async with send:
            await trio.to_thread.run_sync(loop)


async def forward(link: TrioLink, g: Generate, root: str, node_id: str, timeouts: Timeouts,
                  key: ClusterKey | None = None) -> None:
    """Pass g on to the root daemon at `root` (through the secure channel under key) and relay its answers
    until Done or Error."""
    if g.hops >= MAX_HOPS:
        await _send_error(link, Error(ErrorCode.FORWARD_LOOP, f"node {node_id}: the request was forwarded {g.hops} times; "
                                                  "the daemons do not agree on a root"))
        return
    try:
        up = await GenerateCall.open(root, replace(g, hops=g.hops + 1), timeouts.hello, key)
    except (LinkClosed, LinkTimeout, HandshakeFailed) as e:
        await _send_error(link, Error(ErrorCode.UNREACHABLE, f"node {node_id}: the root is unreachable: {e}"))
        return
    try:
        while True:
            try:
                msg = await up.receive(timeouts.build)
            except (LinkClosed, LinkTimeout, ProtocolError) as e:
                await _send_error(link, Error(ErrorCode.GENERATE, f"node {node_id}: root {root} failed: {e}"))
                return
            await link.send(msg)  # LinkClosed: the client went away; closing `up` stops the root
            if not isinstance(msg, TokenChunk):
                return
    finally:
        await up.aclose()


MAX_TOKEN_BYTES = 256  # no token of any vocabulary spans more bytes: a text over ctx x this cannot fit


def _check_length(g: Generate) -> None:
    """The cheap check before tokenizing: a prompt of more bytes than ctx tokens could ever hold is refused."""
    chars = len(g.prompt) + len(g.system or "") + sum(len(t.content) for t in g.messages)
    if chars > g.ctx * MAX_TOKEN_BYTES or len(g.tokens) >= g.ctx:  # a character is at least one byte
        n = len(g.tokens) or chars
        raise CodedError(f"the prompt ({n} {'tokens' if g.tokens else 'characters'}) cannot fit a context of "
                         f"{g.ctx} tokens", ErrorCode.CONTEXT_LENGTH)


def _check_ctx(ctx: int, config: Any, available: int | None) -> None:
    """A context the root can allocate: within the model's, checks.MAX_CTX and (the whole model's f16 KV
    cache, as when the root runs alone) the memory available. Else a CodedError (HTTP 400)."""
    most = min(config.context_length, MAX_CTX)
    if ctx > most:
        raise CodedError(f"ctx {ctx} is over this model's {most} positions", ErrorCode.CONTEXT_LENGTH)
    kv = 2 * config.n_layers * ctx * config.n_kv_heads * config.head_dim * 2
    if available is not None and kv > available * MEMORY_SHARE:
        raise CodedError(f"ctx {ctx} needs {kv / 2**20:.0f} MiB of KV cache; this node has {available / 2**20:.0f} MiB "
                         "available", ErrorCode.CONTEXT_LENGTH)


def _meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return mem_available(f.read())
    except OSError:
        return None


def _check_prompt(ids: list[int], vocab: int, ctx: int) -> None:
    """A prompt the root can run, else a CodedError the client caused (HTTP 400)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise CodedError(f"token id {bad} is not in the model's vocabulary (0..{vocab - 1})", ErrorCode.INVALID_TOKEN)
    if len(ids) >= ctx:
        raise CodedError(f"the prompt has {len(ids)} tokens; the context holds {ctx} (fewer prompt tokens, or a "
                         "larger ctx)", ErrorCode.CONTEXT_LENGTH)


async def _send_error(link: TrioLink, msg: Error) -> None:
    try:
        await link.send(msg)
    except LinkClosed:
        pass
