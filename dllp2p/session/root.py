"""The root side of a session: this process becomes node 0, the root, of a tensor-parallel cluster
(`dllp2p run --workers HOST:PORT ...`, or a root daemon serving a prompt: service.py).

    connect   Hello both ways with every worker (protocol version, node id, threads, capacity)
    plan      scheduler.plan over [root] + workers; workers the plan leaves out are let go
    push      Session to each worker (plan, model config, ctx, its slice list); it answers Need, the
              slices its cache lacks; exactly those go as WeightChunks, each one a Progress event
              (progress.py); it answers WeightsReady
    mesh      Mesh to each worker; the root dials every worker, worker j dials workers k > j
    build     every node builds its engine (TPNode: JIT compile, weight packing) at the same time;
              workers answer Ready (a Progress event at each node's start and end)
    generate  ClusterEngine.forward: a Step to every worker on its control socket, then the root's own
              TPNode.forward, whose exchanges happen natively over the mesh sockets

Set-up runs on trio (workers in parallel); the per-token path is blocking sockets on the calling
thread, so the generation loop (commands/run.py, service.py) drives a ClusterEngine as it drives
any engine.

Error handling: every failure that involves a worker is a ClusterError (a ConnectionError, so the CLI
shows it as one line) naming it, "worker HOST:PORT (node ID)". A failure mid-generation closes
everything: the workers see Stop or a closed connection and go back to idle. Its ClusterError has
`lost` set and names the lost worker (`address`, `node_id`): one that said it is leaving
(ErrorCode.LEAVING), else one the other workers say they lost (Error.node: a worker waiting on a frozen
peer falls silent too, and may be the socket that failed here), else one whose connection closed without
a word, else the one whose socket failed; a root daemon
re-plans without it and resumes (service.py, recovery.py), unless `recoverable` is False (a message
that failed authentication: not a death). A step's receive timeout follows the measured step times
(recovery.StepClock), so a silent worker fails the step within about a second, not the socket timeout.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np
import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..memlimit import engine_options
from ..engine import MAX_TOP, BatchRow, ContextFull, check_rows
from ..error_codes import ErrorCode
from ..formats import ModelConfig
from ..pipeline import AnyPlan, build_plan
from ..scheduler import steady_rates, with_rates
from ..wire.chunks import weight_chunks
from ..wire.codec import ProtocolError, encode
from ..wire.link import LinkClosed, LinkTimeout, TrioLink, run_in_thread, shutdown
from ..wire.secure import exchange_keys
from ..wire.messages import (MAX_CHUNK, PROTOCOL_VERSION, Error, Hello, Mesh, Need, Ready, Session,
                             SliceInfo, Step, Stop, WeightsReady)
from . import autoplan
from .cluster_stats import ClusterStats, StepStats
from .progress import BUILD, PUSH, Note, Progress, Sink, ignore
from .rates import run_delay_ms
from .recovery import STEP_FLOOR_S, StepClock
from .handshake import ClusterError, Worker, dial, dropped, expect, gather, say_hello, say_hello_or_skip

ROOT_EPOCH = 0  # a re-plan after a lost node will take the next one


@dataclass(frozen=True)
class ClusterOptions:
    workers: tuple[str, ...]  # "host:port" of each worker's daemon
    policy: str = "pow2"  # "pow2" or "weighted" (tensor parallel), "pipeline" or "hybrid" (pipeline.py), or "auto"
    timeouts: Timeouts = field(default_factory=Timeouts)
    cache_dir: Any = None  # the root engine's cache (kernels, packed weights); None: the engine's default
    mem_limit: int | None = None  # the root engine's memory budget, bytes: a share beyond it streams (ir_stream.py)
    exchange: str = "exact"  # scheduler.EXCHANGES
    # a worker that cannot be reached or refuses the Hello is planned without (a root daemon's members
    # may have died since they were last polled), instead of failing the run (`run --workers`)
    skip_unreachable: bool = False
    key: ClusterKey | None = None  # the cluster key every connection to the workers is made with
    figures: autoplan.NodeFacts | None = None  # the root's measured figures ("auto"); None: assumed
    link_mbps: tuple[tuple[str, float], ...] = ()  # (node id, MB/s) of earlier timed pushes ("auto")
    assume: autoplan.Assume = autoplan.Assume()  # figures stated for every node in place of measured ones
    max_seqs: int = 1  # KV slots on every node: sequences forward_batch may step together
    kv_positions: int = 0  # KV positions all slots may hold together (the root's KV budget; 0: max_seqs contexts)
    weights: tuple[tuple[str, float], ...] = ()  # (node id, weight) the previous plan was made with


class ClusterEngine:
    """Engine protocol (dllp2p/engine.py) over a root TPNode and its workers. Build with connect()."""

    def __init__(self, config: ModelConfig, ctx: int, plan_: AnyPlan, node: Any, peers: list[socket.socket | None],
                 workers: list[Worker], tp: Any, stats: ClusterStats, rates: dict[str, float] | None = None):
        self.config = config
        self.rates = rates or {}  # node id -> the weight the plan was made with (its rate, or its capacity)
        self.ctx = ctx
        self.plan = plan_
        self.stats = stats
        self._node = node
        self._peers = peers
        self._workers = workers  # in plan order, links blocking
        self._tp = tp
        self._seq = 0
        self._copies: list[tuple[int, int, int]] = []  # copy_prefix calls the workers make before the next step
        self._tickets: deque[Callable[[], np.ndarray]] = deque()  # steps submitted, not completed, oldest first
        self._closed = False
        self._clock = StepClock(stats.timeout)  # the mesh sockets' receive timeout per step
        self.choice: Any = None  # planner.Choice when the plan was "auto"
        self.max_seqs = getattr(node, "max_seqs", 1)
        self.kv_bytes_per_position = getattr(node, "kv_bytes_per_position", 0)  # the root's share of the cache

    def push_rates(self, min_bytes: int) -> dict[str, float]:
        """MB/s of the set-up's weight push to each worker that received at least min_bytes (by node id)."""
        return {w.hello.node_id: w.received_bytes / w.push_s / 1e6 for w in self._workers
                if w.received_bytes >= min_bytes and w.push_s > 0}

    @classmethod
    def connect(cls, model: Any, options: ClusterOptions, ctx: int, threads: int | None = None, *,
                tp: ModuleType | Any | None = None, events: Sink = ignore) -> ClusterEngine:
        """Set up the cluster (see the module docstring). Raises ClusterError, PlanError."""
        if tp is None:
            from .. import pipeline_node as tp  # the compute (llvmlite): loaded when a cluster is made
        if threads is None:
            from ..jit.engine import default_threads  # llvmlite, as above

            threads = default_threads()
        return trio.run(partial(start, model, options, ctx, threads, tp, events))

    max_top = MAX_TOP  # forward(..., top=K): the workers send only their K best logits (TPNode.forward)

    def forward(self, tokens: Sequence[int], start_pos: int, top: int = 0) -> np.ndarray:
        tokens = tuple(int(t) for t in tokens)
        if start_pos + len(tokens) > self.ctx:
            raise ContextFull(f"positions {start_pos}..{start_pos + len(tokens) - 1} do not fit the context of {self.ctx}")
        return self._step(Step(self.plan.epoch, self._seq, tokens, start_pos, top, copies=self._take_copies()),
                          lambda: self._node.forward(tokens, start_pos, top), len(tokens))

    def forward_batch(self, rows: Sequence[BatchRow], top: int = 0) -> np.ndarray:
        """The BatchEngine protocol (dllp2p/engine.py) over the cluster: one Step frame carries every row."""
        return self.complete(self.submit(rows, top))

    @property
    def depth(self) -> int:
        """Steps worth keeping in flight (submit before complete): a pipeline's stages, else 1."""
        return len(getattr(self.plan, "stages", ())) or 1

    def submit(self, rows: Sequence[BatchRow], top: int = 0) -> Callable[[], np.ndarray]:
        """forward_batch's first half: the Step goes to the workers now (a pipeline's first stage starts on
        it). -> its ticket for complete(). Tickets are completed in the order submitted; each slot in at most
        one step in flight (the rows' start positions are checked against what the completed steps hold)."""
        rows = [BatchRow(r.seq, tuple(int(t) for t in r.tokens), r.start_pos) for r in rows]
        check_rows(rows, self._node.seq_lengths, self.ctx, self.config.vocab_size)
        step = Step(self.plan.epoch, self._seq, tuple(t for r in rows for t in r.tokens), 0, top,
                    tuple((r.seq, r.start_pos, len(r.tokens)) for r in rows), self._take_copies())
        self._send(step)
        self._tickets.append(ticket := partial(self._run, lambda: self._node.forward_batch(rows, top), len(step.tokens)))
        return ticket

    def complete(self, ticket: Callable[[], np.ndarray]) -> np.ndarray:
        """forward_batch's second half: the root's own program for the oldest submitted step -> its logits."""
        if not self._tickets or self._tickets.popleft() is not ticket:
            raise ValueError("steps are completed in the order they were submitted")
        return ticket()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """On the root's cache now, on the workers' before the next step (sent with it)."""
        self._node.copy_prefix(src, dst, n)
        self._copies.append((src, dst, n))

    def _take_copies(self) -> tuple[tuple[int, int, int], ...]:
        copies, self._copies = tuple(self._copies), []
        return copies

    def _step(self, step: Step, run: Callable[[], np.ndarray], n_tokens: int) -> np.ndarray:
        if self._tickets:
            raise ValueError("a step is in flight: complete it first")
        self._send(step)
        return self._run(run, n_tokens)

    def _send(self, step: Step) -> None:
        if self._closed:
            raise ClusterError("the cluster engine is closed")
        frame = encode(step)
        self._seq += 1
        for w in self._workers:
            try:
                w.link.send_frame(frame)
            except (LinkClosed, LinkTimeout) as e:
                raise self._lost(w, str(e)) from None

    def _run(self, run: Callable[[], np.ndarray], n_tokens: int) -> np.ndarray:
        if self._closed:
            raise ClusterError("the cluster engine is closed")
        self._clock.arm(self._peers, n_tokens)
        t0, d0 = time.perf_counter(), run_delay_ms()
        try:
            logits = run()
        except self._tp.PeerLost as e:
            w = next((w for w in self._workers if w.index == e.node), None)
            altered = isinstance(e, getattr(self._tp, "ExchangeAuthFailed", ()))
            raise self._lost(w, str(e).removeprefix(f"node {e.node}: "), not altered) from None
        self._clock.measured(n_tokens, time.perf_counter() - t0)
        s = self._node.stats
        self.stats.steps.append(StepStats(n_tokens, s.get("step_ms", 0.0), s.get("sync_ms", 0.0),
                                          int(s.get("bytes_sent", 0)), int(s.get("bytes_received", 0)),
                                          run_delay_ms() - d0))
        return logits

    def stats_summary(self) -> list[str]:
        return self.stats.summary()

    def fresh_request(self) -> None:
        """The session goes on with another request (from position 0): its statistics start over."""
        self.stats = replace(self.stats, steps=[], kept=True)

    def close(self) -> None:
        """Stop the workers (they go back to idle) and free everything. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.link.send(Stop(self.plan.epoch, "done"))
            except (LinkClosed, LinkTimeout):
                pass
        self._release()

    def _release(self) -> None:
        self._closed = True
        try:
            if self._node is not None:
                self._node.close()
        finally:
            self._node = None
            for sock in self._peers:
                if sock is not None:
                    sock.close()
            for w in self._workers:
                w.link.close()

    def _lost(self, suspect: Worker | None, reason: str, recoverable: bool = True) -> ClusterError:
        """Name the failed worker: one that said it is leaving, else one the other workers say they lost, else
        one whose connection closed without a word, else the suspect. (A worker waiting on a frozen peer
        falls silent too: the root may time out on it, or see it drop out of the step, before it reports
        whom it waited on.) -> a ClusterError with `lost` set, naming it."""
        said, silent_dead = self._hear(suspect)
        self._release()
        leaving = [w for w, msg in said if msg.kind == ErrorCode.LEAVING]
        lost = {msg.node for _, msg in said if msg.kind == ErrorCode.PEER_LOST}
        named = [w for w in self._workers if w.index in lost and not any(w is x for x, _ in said)]
        culprit = (leaving[0] if leaving else named[0] if named
                   else suspect if suspect in silent_dead or not silent_dead else silent_dead[0])
        who = culprit.name if culprit else "a node"
        heard = f"; the other nodes said: {'; '.join(msg.message for _, msg in said)}" if said else ""
        return ClusterError(f"{who} was lost during generation ({reason}){heard}",
                            ErrorCode.LEAVING if culprit is not None and culprit in leaving else None,
                            culprit.address if culprit else "", culprit.hello.node_id if culprit else "",
                            lost=True, recoverable=recoverable)

    def _hear(self, suspect: Worker | None) -> tuple[list[tuple[Worker, Error]], list[Worker]]:
        """The workers' last words after a failed step -> (their Errors, those whose connection closed without
        one). Each is listened to for 0.2 s; while the suspect is open and silent and no one has named a node
        they lost, the silent ones are listened to on, up to the step timeout (their clocks run like this
        one; at most 3 s: the first step's timeout is the 30 s socket one)."""
        said: list[tuple[Worker, Error]] = []
        silent_dead: list[Worker] = []
        quiet = list(self._workers)
        patience = time.monotonic() + max(STEP_FLOOR_S, min(self._clock.armed, 3 * STEP_FLOOR_S))
        wait = 0.2
        while quiet:
            for w in list(quiet):
                try:
                    msg = w.link.poll(wait)
                except (LinkClosed, ProtocolError):
                    silent_dead.append(w)
                    quiet.remove(w)
                    continue
                if isinstance(msg, Error):
                    said.append((w, msg))
                    quiet.remove(w)
            wait = 0.05
            if (any(msg.node >= 0 for _, msg in said) or not any(w is suspect for w in quiet)
                    or len(self._workers) < 2 or time.monotonic() >= patience):
                break
        return said, silent_dead


# --- set-up (trio) --------------------------------------------------------------------------------


async def start(model: Any, options: ClusterOptions, ctx: int, threads: int, tp: Any, events: Sink = ignore, *,
                node_id: str | None = None, epoch: int = ROOT_EPOCH,
                slices: Callable[[Any, AnyPlan, int], dict[str, Any]] | None = None, rate: float = 0.0,
                wait_ms: float = 0.0) -> ClusterEngine:
    """The set-up on the caller's trio loop (ClusterEngine.connect runs it in a trio.run of its own; a
    root daemon on its loop, with its own node id and the request's number as the plan's epoch). `events`
    gets the set-up's progress (progress.py); `slices`: tp.plan_tensors, or a slices.PlanSlices over it.
    `rate`: the root's measured compute rate (session/rates.py): with every worker's (their Hellos), the
    plan's shares are weighed by speed (scheduler.with_rates); the engine keeps the weights (`rates`).
    `wait_ms`: its CPU wait per exchange, priced with the workers' (their Hellos) by the "auto" plan."""
    t0 = time.perf_counter()
    t = options.timeouts
    config: ModelConfig = model.config
    ctx = min(ctx, config.context_length)
    root = Hello(PROTOCOL_VERSION, node_id or f"root-{secrets.token_hex(4)}", "root", threads, float(threads),
                 rate=rate, wait_ms=wait_ms)
    workers: list[Worker] = []
    peers: list[socket.socket | None] = []
    node = None
    try:
        hello = partial(say_hello_or_skip, events=events) if options.skip_unreachable else say_hello
        slices = slices or tp.plan_tensors
        workers = [w for w in await gather([partial(hello, a, root, t, options.key) for a in options.workers])
                   if w is not None]
        policy, max_nodes, choice, extra = options.policy, None, None, {}
        members = [root.peer("")] + [w.hello.peer(w.address) for w in workers]
        if policy == "auto":  # the cost model's plan; slices (or layers) by the GB/s it assumed for each node
            choice, rates = _auto(model, options, root, workers)
            policy, max_nodes, extra = autoplan.recipe(choice.chosen.candidate)
            members = [replace(p, capacity=rates[p.node_id]) for p in members]
            events(Note(f"auto plan: {autoplan.reason(choice)}"))
        if choice is None or policy == "weighted":  # (an auto pipeline keeps the layer split it priced)
            # the speeds measured from decode steps, where every node has one, weigh the shares (issue 19)
            measured = dict(zip([p.node_id for p in members], [rate] + [w.hello.rate for w in workers]))
            if all(v > 0 for v in measured.values()):  # the last plan's weights while the rates stay within noise
                measured = steady_rates(dict(options.weights), measured)
            members = with_rates(members, [measured[p.node_id] for p in members])
        the_plan = build_plan(config, members, epoch, policy, exchange=options.exchange, block=tp.split_block(model),
                              max_nodes=max_nodes, **extra)
        for w in workers:
            w.index = next((n.index for n in the_plan.nodes if n.node_id == w.hello.node_id), -1)
        for w in [w for w in workers if w.index < 0]:
            events(Note(f"{w.name} is not needed by the {options.policy} plan of {the_plan.n_nodes} nodes"))
            await w.link.aclose()
        workers = sorted((w for w in workers if w.index > 0), key=lambda w: w.index)

        own = await trio.to_thread.run_sync(slices, model, the_plan, 0)
        await gather([partial(_push, w, model, the_plan, ctx, options, t, slices, events) for w in workers])

        for w in workers:
            await w.link.send(Mesh(the_plan.epoch))
        dialed = await gather([partial(dial, w, the_plan, root.node_id, t, options.key) for w in workers])
        peers = [None, *(sock for sock, _ in dialed)]
        keys = exchange_keys([None, *(exporter for _, exporter in dialed)], 0)  # None: plain (no cluster key)

        async def build() -> Any:
            events(Progress(BUILD, "root", 0, 1))
            extra = engine_options(cache_dir=options.cache_dir, mem_limit=options.mem_limit)
            if options.max_seqs > 1:
                extra["max_seqs"] = options.max_seqs
            if keys is not None:
                extra["exchange_keys"] = keys
            node = await run_in_thread(lambda: tp.plan_node(config, the_plan, 0, own, peers, ctx, threads, **extra),
                                       lambda: [shutdown(s) for s in peers])
            events(Progress(BUILD, "root", 1, 1))
            return node

        async def ready(w: Worker) -> None:
            events(Progress(BUILD, w.name, 0, 1))
            await expect(w, Ready, t.build)
            events(Progress(BUILD, w.name, 1, 1))

        built = await gather([build, *(partial(ready, w) for w in workers)])
        node = built[0]
        for w in workers:
            blocking = w.link.blocking(t.socket)
            await w.link.aclose()
            w.link = blocking
    except BaseException:
        if node is not None:
            node.close()
        for sock in peers:
            if sock is not None:
                sock.close()
        for w in workers:
            if isinstance(w.link, TrioLink):
                await w.link.aclose()
            else:
                w.link.close()
        raise
    stats = ClusterStats(the_plan.n_nodes, the_plan.policy, the_plan.exchange, sum(w.received_bytes for w in workers),
                         sum(w.cached for w in workers), time.perf_counter() - t0, timeout=t.socket)
    weights = {p.node_id: p.capacity for p in members if p.node_id in {n.node_id for n in the_plan.nodes}}
    engine = ClusterEngine(config, ctx, the_plan, node, peers, workers, tp, stats, weights)
    engine.choice = choice
    return engine


def _auto(model: Any, options: ClusterOptions, root: Hello, workers: list[Worker]) -> tuple[Any, dict[str, float]]:
    """The planner's choice (planner.Choice) for these workers and the GB/s it assumed per node id."""
    me = options.figures or autoplan.NodeFacts(root.node_id, root.capacity)
    pushed = dict(options.link_mbps)
    facts = [replace(me, node_id=root.node_id, capacity=root.capacity, rtt_ms=0.0, wait_ms=root.wait_ms)]
    facts += [autoplan.NodeFacts(w.hello.node_id, w.hello.capacity, w.hello.gbps, w.hello.disk_gbps, w.hello.ram,
                                 w.rtt_ms, pushed.get(w.hello.node_id, 0.0), w.hello.wait_ms) for w in workers]
    choice, order = autoplan.choose(model, [options.assume.apply(f) for f in facts], options.exchange)
    devices, _ = autoplan.figures(order)
    return choice, {n.node_id: d.gbps for n, d in zip(order, devices)}


async def _push(w: Worker, model: Any, the_plan: AnyPlan, ctx: int, options: ClusterOptions, t: Timeouts, slices: Callable,
                events: Sink) -> None:
    """Session -> Need -> the missing slices -> WeightsReady."""
    tensors = await trio.to_thread.run_sync(slices, model, the_plan, w.index)
    slices = tuple(SliceInfo(name, name, int(x.qtype), tuple(x.shape), x.sha256) for name, x in tensors.items())
    try:
        await w.link.send(Session(the_plan, model.config, ctx, slices, options.max_seqs, options.kv_positions))
        need: Need = await expect(w, Need, t.transfer)
        by_hash = {x.sha256: x for x in tensors.values()}
        unknown = [h for h in need.sha256s if h not in by_hash]
        if unknown:
            raise ClusterError(f"{w.name} asked for a slice it was not given ({unknown[0][:16]}..)")
        total, done = sum(by_hash[h].nbytes for h in need.sha256s), 0
        t0 = time.perf_counter()
        if total:
            events(Progress(PUSH, w.name, 0, total))
        for h in need.sha256s:  # each slice cut from the model's map piece by piece (tp.CutTensor.pieces)
            x, start = by_hash[h], 0
            pieces = x.pieces(MAX_CHUNK)
            while (piece := await trio.to_thread.run_sync(next, pieces, None)) is not None:
                for chunk in weight_chunks(the_plan.epoch, x.name, x.name, x.qtype, tuple(x.shape), piece, h,
                                           start=start, total=x.nbytes):
                    await w.link.send(chunk)
                    done += len(chunk.data)
                    events(Progress(PUSH, w.name, done, total))
                start += len(piece)
        ready: WeightsReady = await expect(w, WeightsReady, t.transfer)
    except (LinkClosed, LinkTimeout) as e:
        raise dropped(w, e) from None
    w.received_bytes, w.cached = ready.received_bytes, ready.cached
    w.push_s = time.perf_counter() - t0 if total else 0.0
