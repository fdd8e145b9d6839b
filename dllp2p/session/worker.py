"""The worker side of sessions: a root's control connection, one session at a time.

    root -> Session(plan, model config, ctx, slice list)   checked against the scheduler's rules
    worker -> Need(sha256s)                                the slices its cache (slices.SliceCache) lacks
    root -> WeightChunk ...                                exactly those; each slice is verified
    worker -> WeightsReady(received bytes, cached slices)  or Error(disk_full): its disk filled while it
                                                           stored them (the root plans without it)
    root -> Mesh                                           dial nodes k > own index, take i < own index
    worker -> Ready                                        the engine (TPNode) is built
    root -> Step ... Step                                  node.forward(tokens, start_pos, top) each
    root -> Stop                                           free everything, idle, ready for a Session

Threads: everything up to the mesh runs on trio. Then one call to trio.to_thread.run_sync runs the
whole rest of the session in one thread: it builds the TPNode, and for every Step reads the frame off
the control socket itself (a blocking dup of the fd, sharing the trio link's decoder) and calls
node.forward, whose exchanges with the other nodes happen natively on the mesh sockets. So a token
costs no hand-off between trio and a thread: one hand-off per session. If trio cancels the session
(daemon shutting down), the sockets are shut down, which wakes the thread, and its return is awaited.

Leaving (SIGTERM of the daemon: leave()): the session in progress is abandoned cleanly before the
daemon exits. The session thread is woken (the control socket's read side and the mesh sockets shut
down: a step in progress fails at once for every node), tells the root Error(leaving) on the control
connection, and ends; the root re-plans without this node at once (root.py names it from that Error).

State others read (the daemon's Status): `active` (the session's plan), `last_step`, `push` (the weight
push's progress), `sessions` (ended, however they ended).

Error handling: a plan that does not fit, a busy node or a slice with a wrong hash get an Error frame
and the connection goes on (the worker stays ready). A root that disconnects or falls silent past a
timeout, a lost peer or a failing engine end the session: the worker frees it and is idle again.
Protocol errors propagate to the daemon's connection handler, which answers and closes.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..memlimit import engine_options
from ..diskcache import disk_full
from ..error_codes import ErrorCode
from ..formats import QType
from ..memory import trim
from ..pipeline import check_fits, plan_share
from ..scheduler import Plan, PlanError, check_plan_fits
from ..wire.chunks import AssembledSlice, SliceAssembler
from ..wire.codec import ChunkError, ProtocolError, UnexpectedMessage, error_code
from ..wire.link import (
    BlockingLink,
    LinkClosed,
    LinkTimeout,
    MeshRefused,
    TrioLink,
    dial_mesh,
    first_error,
    mesh_socket,
    run_in_thread,
    shutdown,
)
from ..wire.secure import Channel, exchange_keys
from ..wire.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Mesh,
    MeshHello,
    Need,
    Ready,
    Session,
    Step,
    Stop,
    WeightChunk,
    WeightsReady,
)
from ..wire.reports import PushStatus, StepStatus
from .rates import RateMeter, plan_exchanges, run_delay_ms
from . import admission
from .checks import allowed_hosts, check_addresses, check_config, check_shapes, dialed_hosts
from .recovery import StepClock
from .slices import SliceCache, check_slices, storage_array

log = logging.getLogger("dllp2p.daemon")


@dataclass
class _Active:
    """The session in progress: what incoming mesh connections are checked against and handed to."""

    session: Session
    index: int
    incoming_send: trio.MemorySendChannel
    incoming_recv: trio.MemoryReceiveChannel

    @property
    def plan(self) -> Plan:
        return self.session.plan

    def close(self) -> None:
        self.incoming_send.close()
        while True:
            try:
                _, sock, _ = self.incoming_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            sock.close()
        self.incoming_recv.close()


class Worker:
    """Sessions for roots, one at a time: `slot` is shared with the daemon's prompts (a root serving a
    prompt is no worker meanwhile). `tp`: a getter of the compute module (dllp2p.tp; tests pass a fake)."""

    def __init__(self, node_id: str, threads: int, capacity: float, timeouts: Timeouts, cache: SliceCache,
                 tp: Callable[[], Any], slot: trio.Lock, cache_dir: Any = None, key: ClusterKey | None = None,
                 known: Callable[[], set[str]] = set, memory: Callable[[], int | None] = admission.meminfo,
                 meter: RateMeter | None = None, pick_threads: Callable[[], int] | None = None, mem_limit: int | None = None):
        self.node_id, self.mem_limit = node_id, mem_limit  # mem_limit: its engines' budget, bytes (ir_stream.py)
        self.pick_threads = pick_threads  # (blocking) the thread count for a session's engine; None: `threads`
        self.meter = meter or RateMeter()  # this node's compute rate, from its steps (sent in Hello)
        self.known = known  # the addresses of the cluster's members: the only ones a plan may make it dial
        self.memory = memory  # bytes this node has available now (None: unknown)
        self.key = key  # the cluster key the mesh connections it dials are made with
        self.threads = threads
        self.capacity = capacity
        self.t = timeouts
        self.cache = cache
        self._tp = tp
        self._slot = slot
        self.cache_dir = cache_dir  # the engine's (packed weights, kernels); None: the engine's default
        self.active: _Active | None = None
        self.last_step: StepStatus | None = None  # written by the session thread, read by Status
        self.push: PushStatus | None = None  # the weight push of the latest session
        self.sessions = 0  # sessions ended, however they ended
        self.figures: Any = None  # daemon/figures.Measured, once measured: its Hellos carry them
        self.leaving = ""  # why this worker leaves its sessions (set by leave: "SIGTERM"); "" while it serves
        self._wake: Callable[[], None] | None = None  # wakes the session thread (shuts its sockets' reading down)
        self._ended: trio.Event | None = None  # set when the session thread has ended

    async def leave(self, reason: str, limit: float = 5.0) -> None:
        """Leave the session in progress, if any, telling its root (see the module docstring); returns once
        the session thread has ended, or after `limit` seconds."""
        self.leaving = reason
        wake, ended = self._wake, self._ended
        if wake is None or ended is None:
            return
        log.info("leaving the session of epoch %s: %s", self.active.plan.epoch if self.active else "?", reason)
        wake()
        with trio.move_on_after(limit):
            await ended.wait()

    async def control(self, link: TrioLink, hello: Hello) -> None:
        if hello.role != "root":
            raise UnexpectedMessage(f"a control connection comes from a root, this Hello is from a {hello.role}")
        f = self.figures
        await link.send(Hello(PROTOCOL_VERSION, self.node_id, "worker", self.threads, self.capacity,
                              gbps=f.gbps if f else 0.0, disk_gbps=f.disk_gbps if f else 0.0, ram=f.ram if f else 0,
                              rate=self.meter.rate, wait_ms=self.meter.wait_ms))
        log.info("root %s (node %s) connected", link.peer, hello.node_id)
        while True:
            try:
                msg = await link.receive(self.t.idle)
            except LinkClosed:
                log.info("root %s disconnected", link.peer)
                return
            if isinstance(msg, Session):
                if not await self._session(link, msg):
                    return
            elif not isinstance(msg, Stop):  # a Stop while idle is harmless
                raise UnexpectedMessage(f"{type(msg).__name__} while no session is running")

    # --- a session ---

    async def _session(self, link: TrioLink, s: Session) -> bool:
        """Serve one session; -> whether the control connection goes on (False: close it)."""
        try:
            check_plan_fits(s.plan, s.config)
            check_fits(s.plan, s.config)  # a pipeline plan's layers
            index = s.plan.node(self.node_id).index
            if index == 0:
                raise PlanError(f"node {self.node_id} is the root of this plan, not a worker")
            check_slices(s.slices)
            check_config(s, index, await trio.to_thread.run_sync(self.memory))
            check_shapes(s, index)
            await self._check_addresses(s.plan, index, link.peer.rpartition(":")[0].strip("[]"))
        except (PlanError, ValueError) as e:
            log.warning("refused the plan of epoch %d: %s", s.epoch, e)
            await link.send(Error(ErrorCode.PLAN, f"node {self.node_id}: {e}"))
            return True
        with trio.move_on_after(self.t.slot) as waited:
            await self._slot.acquire()
        if waited.cancelled_caught:
            await link.send(Error(ErrorCode.BUSY, f"node {self.node_id} is serving another root"))
            return True
        send, recv = trio.open_memory_channel(max(1, index))
        active = _Active(s, index, send, recv)
        self.active = active
        try:
            log.info("session of epoch %d: node %d of %d", s.epoch, index, s.plan.n_nodes)
            tensors = await self._weights(link, s)
            if tensors is None:
                return True
            msg = await link.receive(self.t.transfer)
            if isinstance(msg, Stop):
                return True
            if not isinstance(msg, Mesh) or msg.epoch != s.epoch:
                raise UnexpectedMessage(f"expected Mesh of epoch {s.epoch}, got {type(msg).__name__}")
            try:
                peers, exporters = await self._mesh(active)
            except (LinkClosed, LinkTimeout, MeshRefused, ProtocolError) as e:
                log.warning("mesh of epoch %d failed: %s", s.epoch, e)
                await link.send(Error(ErrorCode.MESH, f"node {self.node_id}: {e}"))
                return False
            return await self._steps(link, s, index, tensors, peers, exchange_keys(exporters, index))
        finally:
            self.active = None
            active.close()
            self._slot.release()
            self.sessions += 1
            tensors = None  # the received slices, the engine and its KV cache go back to the system
            trim()

    async def _check_addresses(self, plan: Plan, index: int, root_host: str) -> None:
        """check_addresses; hosts named otherwise than the members (a name, an IP) are compared resolved."""
        allowed = allowed_hosts(self.known(), root_host)
        try:
            check_addresses(plan, index, allowed)
            return
        except ValueError:
            pass
        ips: dict[str, set[str]] = {}
        for host in allowed | dialed_hosts(plan, index):
            with trio.move_on_after(2.0):
                try:
                    ips[host] = {a[4][0] for a in await trio.socket.getaddrinfo(host, None)}
                except OSError:
                    pass
        check_addresses(plan, index, allowed, ips)

    async def _weights(self, link: TrioLink, s: Session) -> dict[str, Any] | None:
        """Need -> WeightChunks -> WeightsReady. -> the node's tensors, or None if the root stopped."""
        sizes = {si.sha256: si.nbytes for si in s.slices}
        have: dict[str, Any] = await trio.to_thread.run_sync(self._lookup, sizes)
        cached = len(have)
        want = set(sizes) - set(have)
        total = sum(sizes[sha] for sha in want)
        done, partial = 0, dict[str, int]()  # bytes of finished slices; of unfinished ones, by sha256
        self.push = PushStatus(s.epoch, 0, total, time.time(), not want)
        await link.send(Need(s.epoch, tuple(sorted(want))))
        assembler = SliceAssembler()
        full: list[OSError] = []  # a full disk while storing: the slices still come (and are dropped)
        while want:
            msg = await link.receive(self.t.transfer)
            if isinstance(msg, Stop):
                return None
            if not isinstance(msg, WeightChunk) or msg.epoch != s.epoch or msg.sha256 not in want:
                raise UnexpectedMessage(f"expected a WeightChunk of a needed slice, got {_describe(msg)}")
            try:
                took = await trio.to_thread.run_sync(self._take_chunk, assembler, msg, sizes[msg.sha256], full)
            except ChunkError as e:  # SliceHashMismatch included: the slice is dropped, may come again
                log.warning("dropped a weight slice: %s", e)
                partial.pop(msg.sha256, None)
                self.push = replace(self.push, done=min(total, done + sum(partial.values())))
                await link.send(Error(error_code(e), f"node {self.node_id}: {e}"))
                continue
            if took is not None:
                part, data = took
                have[part.sha256] = data  # the cache's file, mapped, where it was stored: the bytes go
                want.discard(part.sha256)
                partial.pop(part.sha256, None)
                done += sizes[part.sha256]
            else:
                partial[msg.sha256] = msg.offset + len(msg.data)
            self.push = replace(self.push, done=min(total, done + sum(partial.values())), finished=not want)
        if full:  # answered instead of WeightsReady: the root plans without this node
            log.warning("session of epoch %d refused: the slice cache's disk is full (%s)", s.epoch, full[0])
            await link.send(Error(ErrorCode.DISK_FULL, f"node {self.node_id}: its disk is full ({full[0].strerror})"))
            return None
        log.info("weights of epoch %d: %d bytes received, %d slices from the cache",
                 s.epoch, assembler.received_bytes, cached)
        await link.send(WeightsReady(s.epoch, assembler.received_bytes, cached))
        tp = self._tp()
        return {
            si.tensor: tp.NodeTensor(si.tensor, QType(si.qtype), si.shape,
                                     storage_array(QType(si.qtype), si.shape, have[si.sha256]), si.sha256)
            for si in s.slices
        }

    def _lookup(self, sizes: dict[str, int]) -> dict[str, Any]:  # (thread) cached slices, mapped
        found = {sha: self.cache.mapped(sha, nbytes) for sha, nbytes in sizes.items()}
        return {sha: data for sha, data in found.items() if data is not None}

    def _take_chunk(self, assembler: SliceAssembler, chunk: WeightChunk, nbytes: int,
                    full: list[OSError]) -> tuple[AssembledSlice, Any] | None:
        """(thread) Add a chunk; a finished slice is verified and stored. -> (the slice, its data: a map of its
        stored file, else its bytes) when finished. A full disk goes to `full` (nothing more is stored)."""
        if chunk.total != nbytes:
            raise ChunkError(f"{chunk.tensor}: {chunk.total} bytes announced, the session says {nbytes}")
        part = assembler.add(chunk)
        if part is None:
            return None
        if not full:
            try:
                self.cache.store(part.sha256, part.data, keep=self._session_slices())
                stored = self.cache.mapped(part.sha256, nbytes, verify=False)  # just written from verified bytes
                return part, part.data if stored is None else stored
            except OSError as e:
                if disk_full(e):
                    full.append(e)
                else:
                    log.warning("slice %s not cached: %s", part.sha256[:16], e)
        return part, part.data

    def _session_slices(self) -> frozenset[str]:
        a = self.active
        return frozenset(si.sha256 for si in a.session.slices) if a is not None else frozenset()

    async def _mesh(self, active: _Active) -> tuple[list[socket.socket | None], list[bytes | None]]:
        """Connections to every other node of the plan: dial k > index, take i < index (incoming).
        -> (sockets, their secure channels' exporters: None without a key), None at this node's index."""
        plan, me = active.plan, active.index
        peers: list[socket.socket | None] = [None] * plan.n_nodes
        exporters: list[bytes | None] = [None] * plan.n_nodes

        async def dial(k: int) -> None:
            hello = MeshHello(plan.epoch, self.node_id, me, k)
            peers[k], exporters[k] = await dial_mesh(plan.nodes[k].address, hello, self.t.mesh, self.t.socket,
                                                     self.key)

        try:
            with trio.move_on_after(self.t.mesh) as scope:
                try:
                    async with trio.open_nursery() as nursery:
                        for k in range(me + 1, plan.n_nodes):
                            nursery.start_soon(dial, k)
                        while any(peers[i] is None for i in range(me)):
                            src, sock, exporter = await active.incoming_recv.receive()
                            if peers[src] is not None:
                                sock.close()
                            else:
                                peers[src], exporters[src] = sock, exporter
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
            if scope.cancelled_caught:
                missing = [plan.nodes[i].node_id for i, p in enumerate(peers) if p is None and i != me]
                raise LinkTimeout(f"mesh not connected within {self.t.mesh:g} s (missing: {', '.join(missing)})")
        except BaseException:
            for sock in peers:
                if sock is not None:
                    sock.close()
            raise
        return peers, exporters

    async def mesh_accept(self, stream: trio.SocketStream, peer: str, hello: MeshHello,
                          channel: Channel | None = None) -> None:
        """A mesh connection a peer dialed (its MeshHello read, inside `channel` if the cluster has a key):
        the answer, then the socket goes to the session."""
        a = self.active
        problem = None
        if a is None:
            problem = "no session is running"
        elif hello.epoch != a.plan.epoch:
            problem = f"epoch {hello.epoch}, the session's is {a.plan.epoch}"
        elif hello.dst != a.index or not 0 <= hello.src < a.index:
            problem = f"node {hello.src} does not dial node {hello.dst} (this node is {a.index})"
        elif a.plan.nodes[hello.src].node_id != hello.node_id:
            problem = f"node {hello.src} of the plan is {a.plan.nodes[hello.src].node_id}, not {hello.node_id}"
        if a is None or problem is not None:
            raise UnexpectedMessage(f"refused a mesh connection from {peer}: {problem}")
        await TrioLink(stream, peer, channel=channel).send(MeshHello(a.plan.epoch, self.node_id, a.index, hello.src))
        sock = mesh_socket(stream, self.t.socket)
        try:
            a.incoming_send.send_nowait((hello.src, sock, None if channel is None else channel.exporter))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            sock.close()
            log.warning("%s: mesh connection from node %d came too late or twice; closed", peer, hello.src)

    async def _steps(self, link: TrioLink, s: Session, index: int, tensors: dict[str, Any],
                     peers: list[socket.socket | None], keys: list[tuple[bytes, bytes] | None] | None = None) -> bool:
        """Build the engine and serve Steps, in one thread. -> whether the control connection goes on."""
        ctl = link.blocking(self.t.send)  # its sends; each receive waits up to t.idle

        def interrupt() -> None:
            ctl.shutdown()
            for sock in peers:
                shutdown(sock)

        def wake() -> None:  # leave(): the thread still sends its Error(leaving) on ctl
            try:
                ctl.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            for sock in peers:
                shutdown(sock)

        self._wake, self._ended = wake, trio.Event()
        try:
            keep, why = await run_in_thread(partial(self._serve_steps, ctl, s, index, tensors, peers, keys), interrupt)
        finally:
            self._ended.set()
            self._wake = self._ended = None
            ctl.close()
            for sock in peers:
                if sock is not None:
                    sock.close()
        log.info("session of epoch %d ended: %s", s.epoch, why)
        return keep

    def _serve_steps(self, ctl: BlockingLink, s: Session, index: int, tensors: dict[str, Any],
                     peers: list[socket.socket | None],
                     keys: list[tuple[bytes, bytes] | None] | None = None) -> tuple[bool, str]:
        """(thread) The rest of the session. -> (keep the control connection, why it ended). keys: the
        sealed exchange's per-peer keys (with a cluster key), None for the plain exchange."""
        tp = self._tp()
        node = None
        try:
            extra = engine_options(mem_limit=self.mem_limit, cache_dir=self.cache_dir, max_seqs=s.max_seqs if s.max_seqs > 1 else None,
                                   cache_budget=None if self.cache_dir is None else self.cache.budget)
            if keys is not None:
                extra["exchange_keys"] = keys
            threads = self.pick_threads() if self.pick_threads else self.threads
            node = tp.plan_node(s.config, s.plan, index, tensors, peers, s.ctx, threads, **extra)
            tensors.clear()  # the engine holds its own packed copy
            trim()  # what the build allocated and freed goes back to the system (memory.trim)
            ctl.send(Ready(s.epoch, self.node_id))
            share = plan_share(s.plan, index, s.config.n_layers)
            exchanges = plan_exchanges(s.plan, index, s.config.n_layers)
            seq = 0
            clock = StepClock(self.t.socket)  # a silent peer fails the step within about a second, as at the root
            while True:
                msg = ctl.receive(self.t.idle)
                if isinstance(msg, Stop):
                    return True, f"stopped by the root ({msg.reason})"
                if not isinstance(msg, Step) or msg.epoch != s.epoch or msg.seq != seq:
                    raise UnexpectedMessage(f"expected Step {seq} of epoch {s.epoch}, got {_describe(msg)}")
                rows = msg.batch()
                if (any(r.start_pos + len(r.tokens) > s.ctx or r.seq >= s.max_seqs for r in rows)
                        or max(msg.tokens) >= s.config.vocab_size
                        or any(max(c[:2]) >= s.max_seqs for c in msg.copies)):
                    raise UnexpectedMessage(f"Step {seq} does not fit the context ({s.ctx}), slots or vocabulary")
                clock.arm(peers, len(msg.tokens))
                t0, d0 = time.perf_counter(), run_delay_ms()
                for src, dst, n in msg.copies:
                    node.copy_prefix(src, dst, n)
                if msg.rows:
                    node.forward_batch(rows, msg.top)
                else:
                    node.forward(msg.tokens, msg.start_pos, msg.top)
                delay = run_delay_ms() - d0
                clock.measured(len(msg.tokens), time.perf_counter() - t0)
                stats = getattr(node, "stats", None) or {}
                self.last_step = StepStatus(len(msg.tokens), stats.get("step_ms", (time.perf_counter() - t0) * 1e3),
                                            stats.get("sync_ms", 0.0), time.time())
                self.meter.add_step(share, stats.get("compute_ms", 0.0) + delay, len(msg.tokens), delay, exchanges)
                seq += 1
        except (tp.PeerLost, LinkClosed) as e:
            if self.leaving:
                _send_blocking_quietly(ctl, Error(ErrorCode.LEAVING, f"node {self.node_id} is leaving the cluster "
                                                                     f"({self.leaving})"))
                return False, f"left the session ({self.leaving})"
            if isinstance(e, LinkClosed):
                return False, str(e)
            lost = s.plan.nodes[e.node] if 0 <= e.node < s.plan.n_nodes else None
            who = f"node {e.node} ({lost.node_id}, {lost.address or 'root'})" if lost else f"node {e.node}"
            _send_blocking_quietly(ctl, Error(ErrorCode.PEER_LOST, f"node {self.node_id} lost {who}: {e}", max(-1, e.node)))
            if isinstance(e, tp.ExchangeAuthFailed):  # altered in flight or another key: worth more than info
                log.error("session of epoch %d: %s from %s", s.epoch, str(e).removeprefix(f"node {e.node}: "), who)
            return False, f"lost {who}"
        except LinkTimeout as e:
            return False, str(e)
        except ProtocolError as e:
            _send_blocking_quietly(ctl, Error(error_code(e), f"node {self.node_id}: {e}"))
            return False, str(e)
        except Exception as e:  # the engine failed: tell the root, stay up
            log.exception("the engine failed")
            _send_blocking_quietly(ctl, Error(ErrorCode.ENGINE, f"node {self.node_id}: {type(e).__name__}: {e}"))
            return False, f"engine failure: {e}"
        finally:
            if node is not None:
                node.close()


def _describe(msg: object) -> str:
    epoch = f" of epoch {msg.epoch}" if isinstance(msg, (Step, WeightChunk, Mesh, Stop)) else ""
    return type(msg).__name__ + epoch


def _send_blocking_quietly(link: BlockingLink, msg: Error) -> None:
    try:
        link.send(msg)
    except (LinkClosed, LinkTimeout):
        pass

