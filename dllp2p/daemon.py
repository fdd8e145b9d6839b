"""`dllp2p daemon`: the long-running worker every device runs. It serves one root's session at a time.

One TCP port takes four kinds of connection, told apart by their first frame:

    Hello      a root's control connection (both sides send Hello: version, node id, threads, capacity)
    MeshHello  a peer node's connection for the activation exchange of a session (see below)
    Status     anyone asking what this daemon knows: StatusReply, again for every further Status (with
               its RSS, RAM and load average read when it answers, the round-trip of its latest
               Status poll of every member it polls, and its latest session's weight-push progress)
    Generate   a prompt (`dllp2p run`, `dllp2p chat`, the HTTP API): the root serves it as the cluster's
               root, any other daemon forwards it to the root and relays the tokens back (serve.py)

A second port (config `api`, 127.0.0.1:7341 by default) serves the OpenAI-compatible HTTP API (api.py),
whose requests are handed to _generate in this process as Generates (context: config `api_ctx`).

Membership: the daemon knows itself, the daemons mDNS finds (discovery.run_mdns, unless disabled) and
the --peer daemons it polls with Status (discovery.poll_static; mDNS-found members are polled the same
way while they answer, so one killed without a goodbye leaves in seconds). Their events go through one bounded
channel to one task that applies them (election.apply) and logs every change of root or of who is
excluded (another protocol version or cluster name never joins). Roles are election.elect of that table.

A control connection then carries sessions, one after another:

    root -> Session(plan, model config, ctx, slice list)   checked against the scheduler's rules
    worker -> Need(sha256s)                                the slices its cache (state dir) lacks
    root -> WeightChunk ...                                exactly those; each slice is verified
    worker -> WeightsReady(received bytes, cached slices)
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

Weight cache: `<state dir>/slices/<sha256>`, each file one slice's raw ggml bytes, written atomically
(temporary file, fsync, rename), verified again when read; a file that fails is deleted and asked for.
The node id is `<state dir>/node_id`, made once.

Error handling: whatever a peer sends, the daemon stays up. A bad frame (ProtocolError: bad magic,
another protocol version, oversized, malformed, unexpected) gets an Error frame when the connection
still allows one, then the connection is closed. A plan that does not fit, a busy node or a slice with
a wrong hash get an Error frame and the connection goes on (the worker stays ready). A root that
disconnects or falls silent past a timeout, a lost peer or a failing engine end the session: the
worker frees it and is idle again. Anything else a connection raises (a bug) is logged with its
traceback and closes that connection only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import trio

from . import election
from .discovery import DEFAULT_CLUSTER, MdnsOptions, StaticOptions, advertised_addresses, local_facts, poll_static, run_mdns
from .election import Member, Seen
from .error_codes import ErrorCode
from .formats import QType
from .formats.quant import TRAITS
from .link import (
    BlockingLink,
    LinkClosed,
    LinkTimeout,
    MeshRefused,
    TrioLink,
    dial_mesh,
    first_error,
    format_address,
    mesh_socket,
    open_link,
    parse_address,
    receive_one_frame,
    run_in_thread,
    shutdown,
)
from .protocol import (
    PROTOCOL_VERSION,
    AssembledSlice,
    ChunkError,
    Error,
    Generate,
    Hello,
    LinkRtt,
    Mesh,
    MeshHello,
    Need,
    NodeStatus,
    ProtocolError,
    PushStatus,
    Ready,
    Resources,
    Session,
    SliceAssembler,
    SliceInfo,
    Status,
    StatusReply,
    Step,
    StepStatus,
    Stop,
    UnexpectedMessage,
    WeightChunk,
    WeightsReady,
    encode,
    error_code,
)
from .scheduler import Plan, PlanError, check_plan_fits

log = logging.getLogger("dllp2p.daemon")

DEFAULT_PORT = 7340


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Every wait of the daemon and of the root has one."""

    hello: float = 10.0  # the first frame of a connection; connecting
    idle: float = 600.0  # a control connection with nothing to do: between sessions, between Steps
    transfer: float = 60.0  # between frames of a weight push; the answers around it
    mesh: float = 30.0  # connecting the mesh
    build: float = 600.0  # every node building its engine (JIT compile) until Ready
    socket: float = 30.0  # SO_RCVTIMEO / SO_SNDTIMEO of mesh sockets: a silent peer fails a step after this
    slot: float = 10.0  # a new session waiting for the previous one to wind down


@dataclass(frozen=True)
class DaemonConfig:
    host: str
    port: int
    threads: int
    state_dir: Path
    capacity: float | None = None  # relative speed for the scheduler; None: the thread count
    timeouts: Timeouts = field(default_factory=Timeouts)
    cluster: str = DEFAULT_CLUSTER  # only daemons of the same cluster name join
    discovery: bool = False  # advertise and browse with mDNS (the CLI turns it on)
    interfaces: tuple[str, ...] = ()  # IPv4 addresses of the interfaces mDNS uses; () = all
    peers: tuple[str, ...] = ()  # "host:port" of daemons polled with Status (where multicast is blocked)
    static: StaticOptions = field(default_factory=StaticOptions)
    model: Path | None = None  # the GGUF this daemon serves prompts with when it is root
    policy: str = "pow2"  # scheduler policy of the plans it makes as root
    exchange: str = "exact"  # and their exchange (scheduler.EXCHANGES)
    api: str | None = None  # "host:port" of the OpenAI-compatible HTTP API (api.py); None: off
    api_ctx: int = 2048  # the context (KV positions) of the API's requests

    def __post_init__(self) -> None:
        if not election.CLUSTER.fullmatch(self.cluster):
            raise ValueError(f"cluster name {self.cluster!r} is not 1-63 of letters, digits, '.', '_', '-'")
        for address in self.peers:
            parse_address(address)
        if self.api is not None:
            parse_address(self.api, listen=True)
        if self.api_ctx < 2:
            raise ValueError(f"api_ctx {self.api_ctx} < 2")


# --- state dir: node id and slice cache -----------------------------------------------------------


def node_id(state_dir: Path) -> str:
    """This node's stable id: read from state_dir/node_id, made (hostname + random) the first time."""
    path = state_dir / "node_id"
    if path.is_file():
        text = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
            return text
        log.warning("%s holds no valid node id; making a new one", path)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40].strip("-") or "node"
    ident = f"{host}-{secrets.token_hex(4)}"
    _write_atomically(path, ident.encode() + b"\n")
    return ident


class SliceCache:
    """Weight slices on disk, content-addressed: <directory>/<sha256> holds the slice's raw bytes."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.directory / sha256

    def load(self, sha256: str, nbytes: int) -> bytes | None:
        """The slice's bytes, or None if absent or damaged (a damaged file is deleted)."""
        path = self.path(sha256)
        try:
            if path.stat().st_size != nbytes:
                raise ValueError(f"{path.stat().st_size} bytes, expected {nbytes}")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError("content does not match its hash")
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("cache file %s is damaged (%s); dropping it", path, e)
            path.unlink(missing_ok=True)
            return None

    def store(self, sha256: str, data: bytes) -> None:
        _write_atomically(self.path(sha256), data)

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def storage_array(qtype: QType, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """A slice's raw bytes -> its ggml storage array: u8[..., row_bytes] for block types, else f32/f16/u16."""
    if TRAITS[qtype].block_values > 1:
        return np.frombuffer(data, np.uint8).reshape(*shape[:-1], TRAITS[qtype].row_bytes(shape[-1]))
    dtype = {QType.F32: np.float32, QType.F16: np.float16, QType.BF16: np.uint16}[qtype]
    return np.frombuffer(data, dtype).reshape(shape)


# --- the daemon -----------------------------------------------------------------------------------


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
                _, sock = self.incoming_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            sock.close()
        self.incoming_recv.close()


class Daemon:
    """A worker node. `tp`: the compute module (dllp2p.tp by default; tests pass a stand-in)."""

    def __init__(self, config: DaemonConfig, tp: ModuleType | Any | None = None):
        self.config = config
        self.t = config.timeouts
        self.tp = tp
        self.node_id = node_id(config.state_dir)
        self.cache = SliceCache(config.state_dir / "slices")
        self.capacity = float(config.capacity or config.threads)
        self.address = ""
        self.api_address = ""  # where the HTTP API listens, once it does
        self.sessions = 0  # sessions ended, however they ended
        self.started_at = time.time()
        self.me: Member | None = None  # once listening
        self.members: dict[str, election.Entry] = {}  # node id -> entry, this node included
        self.last_step: StepStatus | None = None  # written by the session thread, read by Status
        self.link_rtt: dict[str, LinkRtt] = {}  # node id -> the latest Status poll's round-trip to it
        self.push: PushStatus | None = None  # the weight push of the latest session
        self._slot = trio.Lock()
        self._active: _Active | None = None
        from .serve import RootService

        self.root_service = RootService(config.model, self.node_id, config.threads, config.policy, self.t, self._tp,
                                        exchange=config.exchange)

    def _tp(self) -> Any:
        if self.tp is None:
            from . import tp

            self.tp = tp
        return self.tp

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; task_status gets the bound "host:port"."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._connection, self.config.port, host=self.config.host or None)
            )
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = format_address(host, port)
            log.info("node %s listening on %s (%d threads, state in %s)", self.node_id, self.address,
                     self.config.threads, self.config.state_dir)
            await self._start_membership(nursery, host, port)
            nursery.start_soon(self.root_service.keep_warm)
            if self.config.api is not None:
                await self._start_api(nursery, host, port)
            task_status.started(self.address)

    async def _start_api(self, nursery: trio.Nursery, host: str, port: int) -> None:
        """The HTTP API (api.py) in nursery; it hands its prompts to self._generate in this process (a
        sink with .peer and async .send in place of the link), as if `dllp2p run` had sent them."""
        from . import api
        from .models import DEFAULT_FILE

        model = (self.config.model.name if self.config.model else DEFAULT_FILE).removesuffix(".gguf")
        limits = api.Limits(ctx=self.config.api_ctx)
        self.api_address = await api.start(nursery, self.config.api, self._generate, model, limits) or ""

    # --- membership ---

    async def _start_membership(self, nursery: trio.Nursery, host: str, port: int) -> None:
        """This node in the table; mDNS and static peers feeding it (their tasks in nursery)."""
        c = self.config
        cores, ram, features = local_facts()
        shown = advertised_addresses(host, c.interfaces)[0] if host in ("0.0.0.0", "::", "") else host
        self.me = Member(self.node_id, format_address(shown, port), self.started_at, PROTOCOL_VERSION, c.cluster,
                         cores, ram, features)
        self.members = election.apply({}, Seen(self.me, "self", time.time()))
        send, recv = trio.open_memory_channel[election.Event](64)
        nursery.start_soon(self._membership, recv, (nursery, send.clone()) if c.discovery else None)
        if c.discovery:
            # mDNS where the daemon listens: the chosen interfaces, else a specific listening address's
            interfaces = c.interfaces or (() if host in ("0.0.0.0", "::", "") else (host,))
            from zeroconf import Error as ZeroconfError

            try:
                await nursery.start(run_mdns, self.me, host, port, send.clone(), MdnsOptions(interfaces))
            except (OSError, ZeroconfError) as e:  # no usable multicast interface: static peers still work
                log.warning("mDNS discovery is off: %s: %s", type(e).__name__, e)
        for address in c.peers:
            nursery.start_soon(poll_static, address, self._fetch_member, send.clone(), c.static)
        send.close()

    async def _membership(self, events: trio.MemoryReceiveChannel,
                          probes: tuple[trio.Nursery, trio.MemorySendChannel] | None = None) -> None:
        """The one task that changes the membership table; logs changes of root and of the excluded.

        With `probes` (nursery, events), every member mDNS announces is also polled with Status while it
        answers (discovery.poll_static, source "mdns", until_gone): a daemon killed without an mDNS goodbye
        leaves the table after StaticOptions.misses failed polls, not when its record expires."""
        root, excluded = self.node_id, frozenset[str]()
        probed: set[str] = set()

        async def probe(member: Member) -> None:
            try:
                async with probes[1].clone() as send:
                    await poll_static(member.address, self._fetch_member, send, self.config.static,
                                      source="mdns", until_gone=True)
            finally:
                probed.discard(member.node_id)

        async with events:
            async for event in events:
                if (probes is not None and isinstance(event, Seen) and event.source == "mdns"
                        and event.member.node_id not in probed and event.member.node_id != self.node_id):
                    probed.add(event.member.node_id)
                    probes[0].start_soon(probe, event.member)
                self.members = election.apply(self.members, event)
                e = self.election()
                if e.root is not None and e.root.node_id != root:
                    root = e.root.node_id
                    log.info("root is now %s (%s); this node is %s", root, e.root.address, e.role(self.node_id))
                now = frozenset(m.node_id for m, _ in e.excluded)
                for m, why in e.excluded:
                    if m.node_id not in excluded:
                        log.warning("node %s at %s does not join: %s", m.node_id, m.address, why)
                excluded = now

    def election(self) -> election.Election:
        return election.elect(election.members(self.members), version=PROTOCOL_VERSION, cluster=self.config.cluster)

    def status(self, seq: int) -> StatusReply:
        """What this daemon knows now: compatible members in succession order, root first."""
        e = self.election()
        nodes = tuple(NodeStatus(m, e.role(m.node_id), tuple(sorted(self.members[m.node_id].sources)),
                                 self.members[m.node_id].last_seen) for m in e.succession)
        active = self._active
        the_plan = active.plan if active else self.root_service.last_plan
        listed = {n.member.node_id for n in nodes}
        links = tuple(self.link_rtt[n] for n in sorted(self.link_rtt) if n in listed)
        return StatusReply(seq, self.node_id, nodes, the_plan, self.last_step, self.sessions,
                           resources(self.me.cores if self.me else 1, self.me.ram if self.me else 0), links, self.push)

    async def _fetch_member(self, address: str) -> Member:
        """A --peer daemon's own record, with the address it was reached at; the round-trip is kept."""
        reply, rtt = await ask_status_timed(address, self.config.static.timeout)
        me = next((n.member for n in reply.nodes if n.member.node_id == reply.node_id), None)
        if me is None:
            raise UnexpectedMessage(f"{address}: its StatusReply does not list node {reply.node_id} itself")
        if reply.node_id != self.node_id:
            self.link_rtt[reply.node_id] = LinkRtt(reply.node_id, rtt * 1e3, time.time())
        return replace(me, address=address)

    async def _status(self, link: TrioLink, first: Status) -> None:
        msg: object = first
        while True:
            if not isinstance(msg, Status):
                raise UnexpectedMessage(f"{type(msg).__name__} on a status connection")
            await link.send(self.status(msg.seq))
            try:
                msg = await link.receive(self.t.idle)
            except LinkClosed:
                return

    # --- one connection ---

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        try:
            first = await receive_one_frame(stream, peer, self.t.hello)
            if isinstance(first, Hello):
                await self._control(TrioLink(stream, peer), first)
            elif isinstance(first, MeshHello):
                await self._mesh_accept(stream, peer, first)
            elif isinstance(first, Status):
                await self._status(TrioLink(stream, peer), first)
            elif isinstance(first, Generate):
                await self._generate(TrioLink(stream, peer), first)
            else:
                raise UnexpectedMessage(
                    f"a connection must start with Hello, MeshHello, Status or Generate, not {type(first).__name__}")
        except ProtocolError as e:
            log.warning("%s: %s; closing the connection", peer, e)
            await _send_quietly(stream, Error(error_code(e), f"node {self.node_id}: {e}"))
        except (LinkClosed, LinkTimeout) as e:
            log.info("%s", e)
        except Exception:
            log.exception("%s: unexpected failure; closing the connection", peer)

    async def _generate(self, link: TrioLink, g: Generate) -> None:
        """A prompt: served here if this node is root (one request or session at a time), else forwarded."""
        from . import serve

        e = self.election()
        if e.root is not None and e.root.node_id != self.node_id:
            log.info("request from %s: forwarded to the root %s (%s)", link.peer, e.root.node_id, e.root.address)
            await serve.forward(link, g, e.root.address, self.node_id, self.t)
            return
        with trio.move_on_after(self.t.idle) as waited:
            await self._slot.acquire()
        if waited.cancelled_caught:
            await link.send(Error(ErrorCode.BUSY, f"node {self.node_id} is busy"))
            return
        try:
            workers = [m.address for m in e.succession if m.node_id != self.node_id]
            await self.root_service.serve(link, g, workers)
        finally:
            self._slot.release()

    async def _control(self, link: TrioLink, hello: Hello) -> None:
        if hello.role != "root":
            raise UnexpectedMessage(f"a control connection comes from a root, this Hello is from a {hello.role}")
        await link.send(Hello(PROTOCOL_VERSION, self.node_id, "worker", self.config.threads, self.capacity))
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
            index = s.plan.node(self.node_id).index
            if index == 0:
                raise PlanError(f"node {self.node_id} is the root of this plan, not a worker")
            _check_slices(s.slices)
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
        self._active = active
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
                peers = await self._mesh(active)
            except (LinkClosed, LinkTimeout, MeshRefused, ProtocolError) as e:
                log.warning("mesh of epoch %d failed: %s", s.epoch, e)
                await link.send(Error(ErrorCode.MESH, f"node {self.node_id}: {e}"))
                return False
            return await self._steps(link, s, index, tensors, peers)
        finally:
            self._active = None
            active.close()
            self._slot.release()
            self.sessions += 1

    async def _weights(self, link: TrioLink, s: Session) -> dict[str, Any] | None:
        """Need -> WeightChunks -> WeightsReady. -> the node's tensors, or None if the root stopped."""
        sizes = {si.sha256: si.nbytes for si in s.slices}
        have: dict[str, bytes] = await trio.to_thread.run_sync(self._lookup, sizes)
        cached = len(have)
        want = set(sizes) - set(have)
        total = sum(sizes[sha] for sha in want)
        done, partial = 0, dict[str, int]()  # bytes of finished slices; of unfinished ones, by sha256
        self.push = PushStatus(s.epoch, 0, total, time.time(), not want)
        await link.send(Need(s.epoch, tuple(sorted(want))))
        assembler = SliceAssembler()
        while want:
            msg = await link.receive(self.t.transfer)
            if isinstance(msg, Stop):
                return None
            if not isinstance(msg, WeightChunk) or msg.epoch != s.epoch or msg.sha256 not in want:
                raise UnexpectedMessage(f"expected a WeightChunk of a needed slice, got {_describe(msg)}")
            try:
                part = await trio.to_thread.run_sync(self._take_chunk, assembler, msg, sizes[msg.sha256])
            except ChunkError as e:  # SliceHashMismatch included: the slice is dropped, may come again
                log.warning("dropped a weight slice: %s", e)
                partial.pop(msg.sha256, None)
                self.push = replace(self.push, done=min(total, done + sum(partial.values())))
                await link.send(Error(error_code(e), f"node {self.node_id}: {e}"))
                continue
            if part is not None:
                have[part.sha256] = part.data
                want.discard(part.sha256)
                partial.pop(part.sha256, None)
                done += sizes[part.sha256]
            else:
                partial[msg.sha256] = msg.offset + len(msg.data)
            self.push = replace(self.push, done=min(total, done + sum(partial.values())), finished=not want)
        log.info("weights of epoch %d: %d bytes received, %d slices from the cache",
                 s.epoch, assembler.received_bytes, cached)
        await link.send(WeightsReady(s.epoch, assembler.received_bytes, cached))
        tp = self._tp()
        return {
            si.tensor: tp.NodeTensor(si.tensor, QType(si.qtype), si.shape,
                                     storage_array(QType(si.qtype), si.shape, have[si.sha256]), si.sha256)
            for si in s.slices
        }

    def _lookup(self, sizes: dict[str, int]) -> dict[str, bytes]:
        out = {}
        for sha, nbytes in sizes.items():
            data = self.cache.load(sha, nbytes)
            if data is not None:
                out[sha] = data
        return out

    def _take_chunk(self, assembler: SliceAssembler, chunk: WeightChunk, nbytes: int) -> AssembledSlice | None:
        """(thread) Add a chunk; a finished slice is verified and stored. -> the slice when finished."""
        if chunk.total != nbytes:
            raise ChunkError(f"{chunk.tensor}: {chunk.total} bytes announced, the session says {nbytes}")
        part = assembler.add(chunk)
        if part is not None:
            self.cache.store(part.sha256, part.data)
        return part

    async def _mesh(self, active: _Active) -> list[socket.socket | None]:
        """Connections to every other node of the plan: dial k > index, take i < index (incoming)."""
        plan, me = active.plan, active.index
        peers: list[socket.socket | None] = [None] * plan.n_nodes

        async def dial(k: int) -> None:
            hello = MeshHello(plan.epoch, self.node_id, me, k)
            peers[k] = await dial_mesh(plan.nodes[k].address, hello, self.t.mesh, self.t.socket)

        try:
            with trio.move_on_after(self.t.mesh) as scope:
                try:
                    async with trio.open_nursery() as nursery:
                        for k in range(me + 1, plan.n_nodes):
                            nursery.start_soon(dial, k)
                        while any(peers[i] is None for i in range(me)):
                            src, sock = await active.incoming_recv.receive()
                            if peers[src] is not None:
                                sock.close()
                            else:
                                peers[src] = sock
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
        return peers

    async def _mesh_accept(self, stream: trio.SocketStream, peer: str, hello: MeshHello) -> None:
        a = self._active
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
        await TrioLink(stream, peer).send(MeshHello(a.plan.epoch, self.node_id, a.index, hello.src))
        sock = mesh_socket(stream, self.t.socket)
        try:
            a.incoming_send.send_nowait((hello.src, sock))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            sock.close()
            log.warning("%s: mesh connection from node %d came too late or twice; closed", peer, hello.src)

    async def _steps(self, link: TrioLink, s: Session, index: int, tensors: dict[str, Any],
                     peers: list[socket.socket | None]) -> bool:
        """Build the engine and serve Steps, in one thread. -> whether the control connection goes on."""
        ctl = link.blocking(self.t.idle)

        def interrupt() -> None:
            ctl.shutdown()
            for sock in peers:
                shutdown(sock)

        try:
            keep, why = await run_in_thread(partial(self._serve_steps, ctl, s, index, tensors, peers), interrupt)
        finally:
            ctl.close()
            for sock in peers:
                if sock is not None:
                    sock.close()
        log.info("session of epoch %d ended: %s", s.epoch, why)
        return keep

    def _serve_steps(self, ctl: BlockingLink, s: Session, index: int, tensors: dict[str, Any],
                     peers: list[socket.socket | None]) -> tuple[bool, str]:
        """(thread) The rest of the session. -> (keep the control connection, why it ended)."""
        tp = self._tp()
        node = None
        try:
            node = tp.TPNode(s.config, s.plan, index, tensors, peers, s.ctx, self.config.threads)
            tensors.clear()  # the engine holds its own packed copy
            ctl.send(Ready(s.epoch, self.node_id))
            seq = 0
            while True:
                msg = ctl.receive(self.t.idle)
                if isinstance(msg, Stop):
                    return True, f"stopped by the root ({msg.reason})"
                if not isinstance(msg, Step) or msg.epoch != s.epoch or msg.seq != seq:
                    raise UnexpectedMessage(f"expected Step {seq} of epoch {s.epoch}, got {_describe(msg)}")
                if msg.start_pos + len(msg.tokens) > s.ctx or max(msg.tokens) >= s.config.vocab_size:
                    raise UnexpectedMessage(f"Step {seq} does not fit the context ({s.ctx}) or vocabulary")
                t0 = time.perf_counter()
                node.forward(msg.tokens, msg.start_pos, msg.top)
                stats = getattr(node, "stats", None) or {}
                self.last_step = StepStatus(len(msg.tokens), stats.get("step_ms", (time.perf_counter() - t0) * 1e3),
                                            stats.get("sync_ms", 0.0), time.time())
                seq += 1
        except tp.PeerLost as e:
            lost = s.plan.nodes[e.node] if 0 <= e.node < s.plan.n_nodes else None
            who = f"node {e.node} ({lost.node_id}, {lost.address or 'root'})" if lost else f"node {e.node}"
            _send_blocking_quietly(ctl, Error(ErrorCode.PEER_LOST, f"node {self.node_id} lost {who}: {e}"))
            return False, f"lost {who}"
        except (LinkClosed, LinkTimeout) as e:
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


def _check_slices(slices: tuple[SliceInfo, ...]) -> None:
    sizes: dict[str, int] = {}
    for si in slices:
        if sizes.setdefault(si.sha256, si.nbytes) != si.nbytes:
            raise ValueError(f"{si.tensor}: one sha256 for slices of different sizes")


def _describe(msg: object) -> str:
    if isinstance(msg, (Step, WeightChunk, Mesh, Stop)):
        return f"{type(msg).__name__} of epoch {msg.epoch}"
    return type(msg).__name__


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return format_address(host, port)
    except OSError:
        return "a peer"


async def _send_quietly(stream: trio.SocketStream, msg: Error) -> None:
    """Best effort: the connection is about to be closed anyway."""
    with trio.move_on_after(2.0):
        try:
            await stream.send_all(encode(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _send_blocking_quietly(link: BlockingLink, msg: Error) -> None:
    try:
        link.send(msg)
    except (LinkClosed, LinkTimeout):
        pass


async def ask_status(address: str, timeout: float, seq: int = 0) -> StatusReply:
    """One Status -> StatusReply exchange with the daemon at address. Raises LinkClosed, LinkTimeout,
    ProtocolError (an Error answer, or anything else, is UnexpectedMessage)."""
    return (await ask_status_timed(address, timeout, seq))[0]


async def ask_status_timed(address: str, timeout: float, seq: int = 0) -> tuple[StatusReply, float]:
    """ask_status, and its round-trip in seconds: Status sent -> StatusReply received (connecting not
    included)."""
    link = await open_link(address, timeout)
    try:
        t0 = time.perf_counter()
        await link.send(Status(seq))
        reply = await link.receive(timeout)
        rtt = time.perf_counter() - t0
    finally:
        await link.aclose()
    if not isinstance(reply, StatusReply):
        detail = reply.message if isinstance(reply, Error) else type(reply).__name__
        raise UnexpectedMessage(f"{address} answered Status with {detail}")
    return reply, rtt


def resources(cores: int, ram: int) -> Resources:
    """This process's RSS and the machine's available RAM and load, now (0 where /proc cannot tell)."""
    rss = available = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where /proc is missing
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
            available = int(m.group(1)) * 1024 if m else 0
    except OSError:
        pass
    try:
        load = max(0.0, os.getloadavg()[0])
    except OSError:
        load = 0.0
    return Resources(max(0, rss), max(0, ram), available, load, max(1, cores))


def main(config: DaemonConfig) -> int:
    """Run the daemon until interrupted (KeyboardInterrupt comes out as itself, not in a group) or sent
    SIGTERM (systemctl stop): then it shuts down cleanly (mDNS goodbye included) and returns 0."""

    async def serve_until_sigterm() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            await nursery.start(Daemon(config).serve)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    log.info("SIGTERM: shutting down")
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(serve_until_sigterm)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return 0
