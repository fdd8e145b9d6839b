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
everything: the workers see Stop or a closed connection and go back to idle.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, field, replace
from functools import partial
from types import ModuleType
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..engine import MAX_TOP, BatchRow, ContextFull, check_rows
from ..error_codes import ErrorCode
from ..formats import ModelConfig
from ..scheduler import Plan, plan
from ..wire.chunks import weight_chunks
from ..wire.codec import ProtocolError, encode
from ..wire.link import (
    LinkClosed,
    LinkTimeout,
    MeshRefused,
    TrioLink,
    dial_mesh,
    first_error,
    open_link,
    run_in_thread,
    shutdown,
)
from ..wire.secure import HandshakeFailed, exchange_keys
from ..wire.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Mesh,
    MeshHello,
    Need,
    Ready,
    Session,
    SliceInfo,
    Step,
    Stop,
    WeightsReady,
)
from .progress import BUILD, PUSH, Note, Progress, Sink, ignore

ROOT_EPOCH = 0  # a re-plan after a lost node will take the next one


class ClusterError(ConnectionError):
    """A worker refused, failed or was lost; the message names it. `code`: the ErrorCode the worker
    answered with, if any (DISK_FULL: service.py plans without it); `address`, `node_id`: which worker."""

    def __init__(self, message: str, code: ErrorCode | None = None, address: str = "", node_id: str = ""):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.address, self.node_id = address, node_id


@dataclass(frozen=True)
class ClusterOptions:
    workers: tuple[str, ...]  # "host:port" of each worker's daemon
    policy: str = "pow2"  # scheduler policy: "pow2" or "weighted"
    timeouts: Timeouts = field(default_factory=Timeouts)
    cache_dir: Any = None  # the root engine's cache (kernels, packed weights); None: the engine's default
    exchange: str = "exact"  # scheduler.EXCHANGES
    # a worker that cannot be reached or refuses the Hello is planned without (a root daemon's members
    # may have died since they were last polled), instead of failing the run (`run --workers`)
    skip_unreachable: bool = False
    key: ClusterKey | None = None  # the cluster key every connection to the workers is made with
    max_seqs: int = 1  # KV slots on every node: sequences forward_batch may step together


@dataclass
class Worker:
    address: str
    hello: Hello
    link: Any  # TrioLink during set-up, BlockingLink after
    index: int = -1  # in the plan; -1: left out
    received_bytes: int = 0  # weight bytes pushed to it
    cached: int = 0  # slices it had already

    @property
    def name(self) -> str:
        return f"worker {self.address} (node {self.hello.node_id})"


@dataclass(frozen=True)
class StepStats:
    tokens: int
    step_ms: float  # wall time of the root's forward (the whole cluster's step)
    sync_ms: float  # of which waiting for and moving activations
    bytes_sent: int  # by the root, this step
    bytes_received: int


@dataclass
class ClusterStats:
    nodes: int = 0
    policy: str = ""
    exchange: str = ""
    pushed_bytes: int = 0
    cached_slices: int = 0
    setup_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list)
    kept: bool = False  # serving a later request of the session (service.py's warm sessions)

    def summary(self) -> list[str]:
        """Lines like distributed-llama's: per token inference ms, sync ms, bytes sent and received."""
        head = f"cluster of {self.nodes} nodes ({self.policy} plan, {self.exchange} exchange): "
        if self.kept:
            head += "session kept from the last request (weights pushed 0.0 MB, set-up 0.00 s)"
        else:
            head += (f"weights pushed {self.pushed_bytes / 1e6:.1f} MB, {self.cached_slices} slices cached; "
                     f"set-up {self.setup_s:.2f} s")
        lines = [head]
        prefill = [s for s in self.steps if s.tokens > 1]
        decode = [s for s in self.steps if s.tokens == 1]
        for label, steps in (("prefill", prefill), ("decode", decode)):
            n = sum(s.tokens for s in steps)
            if not n:
                continue
            ms = sum(s.step_ms for s in steps) / n
            sync = sum(s.sync_ms for s in steps) / n
            sent = sum(s.bytes_sent for s in steps) / n / 1e3
            recv = sum(s.bytes_received for s in steps) / n / 1e3
            lines.append(f"{label} per token ({n} tokens): {ms:.2f} ms, inference {ms - sync:.2f} ms, "
                         f"sync {sync:.2f} ms; sent {sent:.1f} kB, received {recv:.1f} kB")
        return lines


class ClusterEngine:
    """Engine protocol (dllp2p/engine.py) over a root TPNode and its workers. Build with connect()."""

    def __init__(self, config: ModelConfig, ctx: int, plan_: Plan, node: Any, peers: list[socket.socket | None],
                 workers: list[Worker], tp: Any, stats: ClusterStats):
        self.config = config
        self.ctx = ctx
        self.plan = plan_
        self.stats = stats
        self._node = node
        self._peers = peers
        self._workers = workers  # in plan order, links blocking
        self._tp = tp
        self._seq = 0
        self._copies: list[tuple[int, int, int]] = []  # copy_prefix calls the workers make before the next step
        self._closed = False
        self.max_seqs = getattr(node, "max_seqs", 1)
        self.kv_bytes_per_position = getattr(node, "kv_bytes_per_position", 0)  # the root's share of the cache

    @classmethod
    def connect(cls, model: Any, options: ClusterOptions, ctx: int, threads: int | None = None, *,
                tp: ModuleType | Any | None = None, events: Sink = ignore) -> ClusterEngine:
        """Set up the cluster (see the module docstring). Raises ClusterError, PlanError."""
        if tp is None:
            from .. import tp  # the compute (llvmlite): loaded when a cluster is made
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
        rows = [BatchRow(r.seq, tuple(int(t) for t in r.tokens), r.start_pos) for r in rows]
        check_rows(rows, self._node.seq_lengths, self.ctx, self.config.vocab_size)
        step = Step(self.plan.epoch, self._seq, tuple(t for r in rows for t in r.tokens), 0, top,
                    tuple((r.seq, r.start_pos, len(r.tokens)) for r in rows), self._take_copies())
        return self._step(step, lambda: self._node.forward_batch(rows, top), len(step.tokens))

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """On the root's cache now, on the workers' before the next step (sent with it)."""
        self._node.copy_prefix(src, dst, n)
        self._copies.append((src, dst, n))

    def _take_copies(self) -> tuple[tuple[int, int, int], ...]:
        copies, self._copies = tuple(self._copies), []
        return copies

    def _step(self, step: Step, run: Callable[[], np.ndarray], n_tokens: int) -> np.ndarray:
        if self._closed:
            raise ClusterError("the cluster engine is closed")
        frame = encode(step)
        self._seq += 1
        for w in self._workers:
            try:
                w.link.send_frame(frame)
            except (LinkClosed, LinkTimeout) as e:
                raise self._lost(w, str(e)) from None
        try:
            logits = run()
        except self._tp.PeerLost as e:
            w = next((w for w in self._workers if w.index == e.node), None)
            raise self._lost(w, str(e).removeprefix(f"node {e.node}: ")) from None
        s = self._node.stats
        self.stats.steps.append(StepStats(n_tokens, s.get("step_ms", 0.0), s.get("sync_ms", 0.0),
                                          int(s.get("bytes_sent", 0)), int(s.get("bytes_received", 0))))
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

    def _lost(self, suspect: Worker | None, reason: str) -> ClusterError:
        """Name the failed worker: one whose connection closed without a word, else the suspect."""
        words: list[str] = []
        silent_dead: list[Worker] = []
        for w in self._workers:
            try:
                msg = w.link.poll(0.2)
            except (LinkClosed, ProtocolError):
                silent_dead.append(w)
                continue
            if isinstance(msg, Error):
                words.append(msg.message)
        self._release()
        culprit = suspect if suspect in silent_dead or not silent_dead else silent_dead[0]
        who = culprit.name if culprit else "a node"
        said = f"; the other nodes said: {'; '.join(words)}" if words else ""
        return ClusterError(f"{who} was lost during generation ({reason}){said}")


# --- set-up (trio) --------------------------------------------------------------------------------


async def start(model: Any, options: ClusterOptions, ctx: int, threads: int, tp: Any, events: Sink = ignore, *,
                node_id: str | None = None, epoch: int = ROOT_EPOCH,
                slices: Callable[[Any, Plan, int], dict[str, Any]] | None = None) -> ClusterEngine:
    """The set-up on the caller's trio loop (ClusterEngine.connect runs it in a trio.run of its own; a
    root daemon on its loop, with its own node id and the request's number as the plan's epoch). `events`
    gets the set-up's progress (progress.py); `slices`: tp.node_tensors, or a slices.PlanSlices over it."""
    t0 = time.perf_counter()
    t = options.timeouts
    config: ModelConfig = model.config
    ctx = min(ctx, config.context_length)
    root = Hello(PROTOCOL_VERSION, node_id or f"root-{secrets.token_hex(4)}", "root", threads, float(threads))
    workers: list[Worker] = []
    peers: list[socket.socket | None] = []
    node = None
    try:
        hello = partial(_hello_or_skip, events=events) if options.skip_unreachable else _hello
        slices = slices or tp.node_tensors
        workers = [w for w in await _gather([partial(hello, a, root, t, options.key) for a in options.workers])
                   if w is not None]
        the_plan = plan(config, [root.peer("")] + [w.hello.peer(w.address) for w in workers], epoch,
                        options.policy, exchange=options.exchange, block=tp.split_block(model))
        for w in workers:
            w.index = next((n.index for n in the_plan.nodes if n.node_id == w.hello.node_id), -1)
        for w in [w for w in workers if w.index < 0]:
            events(Note(f"{w.name} is not needed by the {options.policy} plan of {the_plan.n_nodes} nodes"))
            await w.link.aclose()
        workers = sorted((w for w in workers if w.index > 0), key=lambda w: w.index)

        own = await trio.to_thread.run_sync(slices, model, the_plan, 0)
        await _gather([partial(_push, w, model, the_plan, ctx, options.max_seqs, t, slices, events) for w in workers])

        for w in workers:
            await w.link.send(Mesh(the_plan.epoch))
        dialed = await _gather([partial(_dial, w, the_plan, root.node_id, t, options.key) for w in workers])
        peers = [None, *(sock for sock, _ in dialed)]
        keys = exchange_keys([None, *(exporter for _, exporter in dialed)], 0)  # None: plain (no cluster key)

        async def build() -> Any:
            events(Progress(BUILD, "root", 0, 1))
            extra: dict[str, Any] = {} if options.cache_dir is None else {"cache_dir": options.cache_dir}
            if options.max_seqs > 1:
                extra["max_seqs"] = options.max_seqs
            if keys is not None:
                extra["exchange_keys"] = keys
            node = await run_in_thread(lambda: tp.TPNode(config, the_plan, 0, own, peers, ctx, threads, **extra),
                                       lambda: [shutdown(s) for s in peers])
            events(Progress(BUILD, "root", 1, 1))
            return node

        async def ready(w: Worker) -> None:
            events(Progress(BUILD, w.name, 0, 1))
            await _expect(w, Ready, t.build)
            events(Progress(BUILD, w.name, 1, 1))

        built = await _gather([build, *(partial(ready, w) for w in workers)])
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
                         sum(w.cached for w in workers), time.perf_counter() - t0)
    return ClusterEngine(config, ctx, the_plan, node, peers, workers, tp, stats)


async def _gather(fns: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run fns concurrently; -> their results in order. The first failure cancels the rest and is raised."""
    results: list[Any] = [None] * len(fns)

    async def one(i: int) -> None:
        results[i] = await fns[i]()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(fns)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return results


async def _hello_or_skip(address: str, root: Hello, t: Timeouts, key: ClusterKey | None, *,
                         events: Sink) -> Worker | None:
    try:
        return await _hello(address, root, t, key)
    except ClusterError as e:
        events(Note(f"{e}; planning without it"))
        return None


async def _hello(address: str, root: Hello, t: Timeouts, key: ClusterKey | None = None) -> Worker:
    try:
        link = await open_link(address, t.hello, key)
    except (LinkClosed, LinkTimeout, HandshakeFailed) as e:
        raise ClusterError(f"worker {address}: {_said(address, e)}") from None
    try:
        await link.send(root)
        reply = await link.receive(t.hello)
        if isinstance(reply, Error):
            raise ClusterError(f"worker {address} refused: {reply.message}")
        if not isinstance(reply, Hello) or reply.role != "worker":
            raise ClusterError(f"worker {address} answered {type(reply).__name__} {getattr(reply, 'role', '')}, "
                               f"not a worker's Hello")
    except (LinkClosed, LinkTimeout, ProtocolError) as e:
        await link.aclose()
        hint = " (it may hold a cluster key: give this side one, --key-file)" if key is None and isinstance(
            e, LinkClosed) else ""
        raise ClusterError(f"worker {address}: {_said(address, e)}{hint}") from None
    except BaseException:
        await link.aclose()
        raise
    return Worker(address, reply, link)


async def _expect(w: Worker, cls: type, timeout: float) -> Any:
    try:
        msg = await w.link.receive(timeout)
    except (LinkClosed, LinkTimeout, ProtocolError) as e:
        raise ClusterError(f"{w.name}: {_said(w.address, e)}") from None
    if isinstance(msg, Error):
        code = ErrorCode.parse(str(msg.code))  # passed on only where the root acts on it (a full disk)
        raise ClusterError(f"{w.name}: {msg.message}", code if code == ErrorCode.DISK_FULL else None,
                           w.address, w.hello.node_id)
    if not isinstance(msg, cls):
        raise ClusterError(f"{w.name} sent {type(msg).__name__} where {cls.__name__} was expected")
    return msg


async def _push(w: Worker, model: Any, the_plan: Plan, ctx: int, max_seqs: int, t: Timeouts, slices: Callable,
                events: Sink) -> None:
    """Session -> Need -> the missing slices -> WeightsReady."""
    tensors = await trio.to_thread.run_sync(slices, model, the_plan, w.index)
    slices = tuple(SliceInfo(name, name, int(x.qtype), tuple(x.shape), x.sha256) for name, x in tensors.items())
    try:
        await w.link.send(Session(the_plan, model.config, ctx, slices, max_seqs))
        need: Need = await _expect(w, Need, t.transfer)
        by_hash = {x.sha256: x for x in tensors.values()}
        unknown = [h for h in need.sha256s if h not in by_hash]
        if unknown:
            raise ClusterError(f"{w.name} asked for a slice it was not given ({unknown[0][:16]}..)")
        total, done = sum(by_hash[h].data.nbytes for h in need.sha256s), 0
        if total:
            events(Progress(PUSH, w.name, 0, total))
        for h in need.sha256s:
            x = by_hash[h]
            data = np.ascontiguousarray(x.data)
            for chunk in weight_chunks(the_plan.epoch, x.name, x.name, x.qtype, tuple(x.shape), data, h):
                await w.link.send(chunk)
                done += len(chunk.data)
                events(Progress(PUSH, w.name, done, total))
        ready: WeightsReady = await _expect(w, WeightsReady, t.transfer)
    except (LinkClosed, LinkTimeout) as e:
        raise ClusterError(f"{w.name}: {_said(w.address, e)}") from None
    w.received_bytes, w.cached = ready.received_bytes, ready.cached


async def _dial(w: Worker, the_plan: Plan, root_id: str, t: Timeouts,
                key: ClusterKey | None = None) -> tuple[socket.socket, bytes | None]:
    hello = MeshHello(the_plan.epoch, root_id, 0, w.index)
    try:
        return await dial_mesh(w.address, hello, t.mesh, t.socket, key)
    except (LinkClosed, LinkTimeout, MeshRefused, ProtocolError) as e:
        raise ClusterError(f"{w.name}: mesh connection failed: {_said(w.address, e)}") from None


def _said(address: str, e: BaseException) -> str:
    """e's message without the address it starts with (the worker is named already)."""
    return str(e).removeprefix(f"{address}: ").removeprefix(f"{address} ")
