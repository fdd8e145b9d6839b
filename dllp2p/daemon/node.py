"""`dllp2p daemon`: the long-running process every device runs: a worker of one root's session at a time,
and the cluster's root when the election makes it one.

One TCP port takes four kinds of connection, told apart by their first frame:

    Hello      a root's control connection: session.worker.Worker runs its sessions
    MeshHello  a peer node's connection for the activation exchange of a session (handed to the Worker)
    Status     anyone asking what this daemon knows: StatusReply (probes.py), again for every further Status
    Generate   a prompt (`dllp2p run`, `dllp2p chat`): prompts.PromptSlot serves it as the cluster's root
               (session.service.RootService), or forwards it to the root and relays the tokens back (and
               resubmits it to the next root if that one is lost or stops: prompts.py)
    Goodbye    a member stopping (SIGTERM): out of the membership at once (Membership.heard_goodbye)

SIGTERM (systemctl stop/restart): Daemon.leave refuses new prompts (draining), says Goodbye to every
member, gives the requests it has taken (as root, or forwarded) up to drain_s to finish, then exits.

With a cluster key (config key_file, clusterkey.py) every connection first passes wire/secure.py's
handshake (within the hello timeout) and then travels sealed; a peer without the key is dropped without a
byte of answer beyond the handshake. Without a key the daemon serves this machine only: it listens on
loopback, polls only loopback peers, and neither advertises nor browses mDNS (it says so at start-up).

A second port (config `api`, loopback by default) serves the OpenAI-compatible HTTP API (api.py), which
hands its prompts to the prompt slot in this process as Generates (their context: config `api_ctx`).

The daemon is split by responsibility: this module listens and dispatches and owns every lifetime (one
nursery); membership.py keeps the membership table and elects; probes.py answers Status; prompts.py holds
the prompt slot; the session package does the work (worker sessions, the root's cluster, slices).

Error handling: whatever a peer sends, the daemon stays up. A bad frame (ProtocolError: bad magic,
another protocol version, oversized, malformed, unexpected) gets an Error frame when the connection
still allows one, then the connection is closed. (LinkClosed, LinkTimeout) end their connection
quietly. Anything else a connection raises (a bug) is logged with its traceback and closes that
connection only.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

from .. import api, election
from ..clusterkey import ClusterKey
from ..config import DEFAULT_CLUSTER, DEFAULT_PORT, Timeouts
from ..discovery import StaticOptions
from ..models import DEFAULT_FILE
from ..session.busy import Polled
from ..session.rates import RateMeter
from ..session.batcher import BatchConfig
from ..session.service import RootService
from ..session.slices import SliceCache, node_id
from ..session.worker import Worker
from ..wire.codec import ProtocolError, UnexpectedMessage, encode, error_code
from ..wire.link import (
    LinkClosed,
    LinkTimeout,
    TrioLink,
    first_error,
    format_address,
    parse_address,
    receive_one_frame,
    secure_accept,
)
from ..wire.messages import Error, Generate, Goodbye, Hello, MeshHello
from ..wire.reports import Status, StatusReply
from ..wire.secure import Channel, HandshakeFailed, SecureError
from ..session.autoplan import Assume, NodeFacts
from . import figures
from .membership import Membership
from .probes import status_reply
from .prompts import PromptSlot

log = logging.getLogger("dllp2p.daemon")

MAX_CONNECTIONS = 512  # open control-port connections at once (systemd's LimitNOFILE leaves room for more)
MAX_PER_HOST = 64  # of them from one peer address (a root's session uses 1 + the mesh's 1 per node)

__all__ = ["DEFAULT_PORT", "Daemon", "DaemonConfig", "Timeouts", "main"]


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
    policy: str = "pow2"  # of the plans it makes as root: "auto" (the cost model; measures this machine), "pow2", "weighted"
    exchange: str = "exact"  # and their exchange (scheduler.EXCHANGES)
    api: str | None = None  # "host:port" of the OpenAI-compatible HTTP API (api.py); None: off
    api_ctx: int = 2048  # the context (KV positions) of the API's requests
    api_hosts: tuple[str, ...] = ()  # Host names the API answers to besides IPs, localhost, its listen host
    cache_dir: Path | None = None  # compiled kernels and packed weights; None: the engine's default
    cache_mb: int = 4096  # size budget of the slice cache (state dir) and of the packed slices (cache dir)
    key: ClusterKey | None = None  # the cluster key; None: this machine only (loopback, no peers, no mDNS)
    drain_s: float = 30.0  # SIGTERM: how long the requests it has taken may take to finish before handover
    threads_why: str = ""  # how `threads` was chosen (jit/cpus.py), logged at start-up
    threads_auto: bool = False  # not configured: chosen again (the load now) for every session's engine
    batch: BatchConfig = field(default_factory=BatchConfig)  # requests served together as root (max_batch, queue, KV)
    # as root: plan without a worker while its CPU wait costs more than its share saves (session/busy.py); the
    # CLI's default is on, this one off, so tests' in-process daemons keep their planned node counts
    drop_busy: bool = False
    plan_figures: tuple[tuple[str, float], ...] = ()  # (config.PLAN_FIGURES name, value) stated for "auto" plans
    mem_limit: int | None = None  # bytes its engines may use (--mem-limit); a share beyond it streams from disk
    mem_limit_why: str = ""  # where mem_limit came from, logged at start-up

    def __post_init__(self) -> None:
        if not election.CLUSTER.fullmatch(self.cluster):
            raise ValueError(f"cluster name {self.cluster!r} is not 1-63 of letters, digits, '.', '_', '-'")
        for address in self.peers:
            parse_address(address)
        if self.api is not None:
            parse_address(self.api, listen=True)
        if self.api_ctx < 2:
            raise ValueError(f"api_ctx {self.api_ctx} < 2")


class Daemon:
    """A node. `tp`: the compute module (dllp2p.tp by default; tests pass a stand-in)."""

    def __init__(self, config: DaemonConfig, tp: ModuleType | Any | None = None):
        self.config = config
        self._threads_now = config.threads  # the count _pick_threads chose last
        self.t = config.timeouts
        self.tp = tp
        self.node_id = node_id(config.state_dir)
        self.address = ""
        self.api_address = ""  # where the HTTP API listens, once it does
        self.started_at = time.time()
        slot = trio.Lock()  # one worker session or one prompt at a time
        self.key = config.key
        self._refused: set[str] = set()  # hosts whose failed handshakes were logged
        self._open: dict[str, int] = {}  # open connections by peer host
        self._open_total = 0
        self._capped: set[str] = set()  # hosts whose connections over the cap were logged
        cluster = config.cluster if config.key is None else config.key.bind(config.cluster)
        self.membership = Membership(self.node_id, cluster, self.started_at, config.static, config.key, self._new_id)
        meter = RateMeter()  # this node's compute rate, from its steps as worker and as root
        pick = self._pick_threads if config.threads_auto else None
        self.worker = Worker(self.node_id, config.threads, float(config.capacity or config.threads), self.t,
                             SliceCache(config.state_dir / "slices", config.cache_mb << 20), self._tp, slot, config.cache_dir,
                             config.key, known=self._member_addresses, meter=meter, pick_threads=pick,
                             mem_limit=config.mem_limit)
        self.root_service = RootService(config.model, self.node_id, config.threads, config.policy, self.t, self._tp,
                                        exchange=config.exchange, cache_dir=config.cache_dir, key=config.key,
                                        on_lost=self.membership.mark_dead, meter=meter,
                                        rates=lambda: dict(self.membership.rates), pick_threads=pick,
                                        batch=config.batch, slot=slot, polled=self._polled,
                                        drop_busy=config.drop_busy, mem_limit=config.mem_limit)
        self.root_service.assume = Assume.of(config.plan_figures)  # in place of the measured figures ("auto")
        self.figures: figures.Measured | None = None  # measured by _measure ("auto" plans)
        self.prompts = PromptSlot(self.node_id, self.membership, self.root_service, slot, self.t, config.key)

    def _new_id(self) -> str:
        """A new node id, stored in the state dir and used from now on (membership found this node to be
        a copy of another: a cloned state dir). Sessions under the old id fail and are planned afresh."""
        (self.config.state_dir / "node_id").unlink(missing_ok=True)
        self.node_id = node_id(self.config.state_dir)
        self.worker.node_id = self.root_service.node_id = self.prompts.node_id = self.node_id
        return self.node_id

    def _pick_threads(self) -> int:
        """(blocking, 0.1 s) The default thread count now (jit/cpus.py: the load as a session starts, not only as
        the daemon did, e.g. at boot); logged when it differs from the last."""
        from ..jit.engine import default_thread_choice  # llvmlite, as the engines: loaded by the first session

        choice = default_thread_choice()
        if choice.threads != self._threads_now:
            log.info("compute threads now: %s", choice.reason)
            self._threads_now = choice.threads
        return choice.threads

    def _polled(self) -> list[Polled]:
        """The other members' rates, CPU waits and round trips as their latest Status polls said (busy.py)."""
        m = self.membership
        return [Polled(x.node_id, x.address, m.rates.get(x.node_id, 0.0), m.waits.get(x.node_id, 0.0),
                       m.link_rtt[x.node_id].rtt_ms if x.node_id in m.link_rtt else 0.0)
                for x in election.members(m.members) if x.node_id != self.node_id]

    def _member_addresses(self) -> set[str]:
        return {m.address for m in election.members(self.membership.members)}

    def _tp(self) -> Any:
        if self.tp is None:
            from .. import pipeline_node as tp  # the compute (llvmlite, numpy kernels): by the first session or prompt

            self.tp = tp
        return self.tp

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; task_status gets the bound "host:port"."""
        c = this_machine_only(self.config) if self.key is None else self.config
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(partial(trio.serve_tcp, self._connection, c.port, host=c.host or None))
            except OSError as e:  # "Address already in use" names the address
                named = OSError(f"cannot listen on {format_address(c.host or '0.0.0.0', c.port)}: {e.strerror or e}")
                named.errno = e.errno
                raise named from None
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = format_address(host, port)
            model = c.model.name if c.model else "none (start it with --model PATH to serve prompts as root)"
            log.info("node %s listening on %s (cluster %s, %d threads, state in %s); model %s", self.node_id,
                     self.address, self.membership.cluster, c.threads, c.state_dir, model)
            if c.threads_why:
                log.info("compute threads: %s", c.threads_why)
            if c.plan_figures and c.policy == "auto":
                log.info("plan auto: stated figures for every node in place of the measured ones: %s",
                         ", ".join(f"{k}={v:g}" for k, v in c.plan_figures))
            if c.mem_limit_why:
                log.info("memory budget: %s", c.mem_limit_why)
            if self.key is None:
                dropped = sorted(set(self.config.peers) - set(c.peers))
                log.warning("no cluster key: serving this machine only (loopback, no mDNS, no LAN peers%s). To make "
                            "a cluster: `dllp2p key new` here, then `dllp2p key show`, and `dllp2p key set` on each "
                            "other device; restart the daemons", f"; ignored {', '.join(dropped)}" if dropped else "")
            await self.membership.start(nursery, host, port, discovery=c.discovery, interfaces=c.interfaces,
                                        peers=c.peers)
            e = self.membership.election()
            log.info("this node is %s", e.role(self.node_id) if e.root is not None else "alone")
            nursery.start_soon(self.root_service.keep_warm)
            if c.policy == "auto":
                nursery.start_soon(self._measure)
            nursery.start_soon(self.root_service.batching.run)
            if c.api is not None:
                await self._start_api(nursery)
            task_status.started(self.address)

    async def _measure(self) -> None:
        """(a task) This machine's figures for the cost model, once (figures.py; cached on disk): the
        worker's Hellos carry them, the root service plans with them, Status shows them."""
        c = self.config
        m = figures.cached(c.threads, c.cache_dir, c.state_dir)
        if m is None:  # in a child process: the JIT and its test matrix stay out of this one's memory
            cmd = [sys.executable, "-m", "dllp2p.daemon.figures", "--threads", str(c.threads), "--state-dir",
                   str(c.state_dir), *(["--cache-dir", str(c.cache_dir)] if c.cache_dir else [])]
            try:
                done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True)
                m = figures.Measured(**json.loads(done.stdout))
            except (OSError, subprocess.CalledProcessError, ValueError, TypeError) as e:
                log.warning("could not measure this machine's figures (the planner assumes them): %s", e)
                return
        self.figures = m
        self.worker.figures = m
        try:
            await trio.to_thread.run_sync(self.root_service.learn_shape)
        except (OSError, ValueError) as e:  # the model is checked again (and refused) by the first prompt
            log.warning("no plan preview: %s", e)
        self.root_service.figures = NodeFacts(self.node_id, float(c.capacity or c.threads), m.gbps, m.disk_gbps, m.ram)
        log.info("measured: %.1f GB/s of Q4_0 weights on %d threads, disk %.2f GB/s, %.1f GB for weights",
                 m.gbps, c.threads, m.disk_gbps, m.ram / 1e9)

    async def _start_api(self, nursery: trio.Nursery) -> None:
        """The HTTP API (api.py) in nursery; it hands its prompts to the prompt slot in this process (a sink
        with .peer and async .send in place of the link), as if `dllp2p run` had sent them."""
        model = (self.config.model.name if self.config.model else DEFAULT_FILE).removesuffix(".gguf")
        limits = api.Limits(ctx=self.config.api_ctx)
        token = None if self.key is None else self.key.api_token
        self.api_address = await api.start(nursery, self.config.api, self.prompts.generate, model, limits,
                                           token, self.config.api_hosts) or ""

    def election(self) -> election.Election:
        return self.membership.election()

    async def leave(self, reason: str) -> None:
        """A graceful stop (SIGTERM): refuse new prompts (draining, retryable), tell every member this node
        is leaving (the next root is elected at once), then give the requests taken here (served as root,
        or forwarded) up to drain_s to finish; what is left ends with 'draining', which whoever sent it
        resumes elsewhere (prompts.py)."""
        log.info("%s: leaving the cluster (the requests in flight get up to %.0f s)", reason, self.config.drain_s)
        self.prompts.draining = True
        await self.membership.goodbye(reason, self.t.hello)
        await self.prompts.drain(self.config.drain_s)

    def status(self, seq: int) -> StatusReply:
        return status_reply(seq, self.membership, self.worker, self.root_service, self.figures)

    # --- one connection ---

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        host = peer.rpartition(":")[0]
        if self._open_total >= MAX_CONNECTIONS or self._open.get(host, 0) >= MAX_PER_HOST:
            log.log(logging.DEBUG if host in self._capped else logging.WARNING,
                    "%s: over the cap of %d connections (%d from one host); closed", peer, MAX_CONNECTIONS, MAX_PER_HOST)
            self._capped.add(host)
            await trio.aclose_forcefully(stream)
            return
        self._open_total += 1
        self._open[host] = self._open.get(host, 0) + 1
        try:
            await self._serve_connection(stream, peer)
        finally:
            self._open_total -= 1
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]

    async def _serve_connection(self, stream: trio.SocketStream, peer: str) -> None:
        channel = None
        try:
            if self.key is not None:
                channel = await secure_accept(stream, self.key, peer, self.t.hello)
            first = await receive_one_frame(stream, peer, self.t.hello, channel)
            link = TrioLink(stream, peer, channel=channel)
            link.send_timeout = self.t.send
            if isinstance(first, Hello):
                await self.worker.control(link, first)
            elif isinstance(first, MeshHello):
                await self.worker.mesh_accept(stream, peer, first, channel)
            elif isinstance(first, Status):
                await self._status(link, first)
            elif isinstance(first, Generate):
                await self.prompts.generate(link, first)
            elif isinstance(first, Goodbye):
                await self.membership.heard_goodbye(first, peer)
            else:
                raise UnexpectedMessage(f"a connection must start with Hello, MeshHello, Status, Generate or "
                                        f"Goodbye, not {type(first).__name__}")
        except HandshakeFailed as e:  # no answer at all: a peer without the key learns nothing
            host = peer.rpartition(":")[0]  # logged once per host (a scanner does not flood the log)
            log.log(logging.DEBUG if host in self._refused else logging.WARNING, "%s: %s; dropped", peer, e)
            self._refused.add(host)
        except SecureError as e:  # a sealed record that does not open: the stream cannot be trusted
            log.error("%s: %s; dropped the connection", peer, e)
        except ProtocolError as e:
            log.warning("%s: %s; closing the connection", peer, e)
            await _send_quietly(stream, Error(error_code(e), f"node {self.node_id}: {e}"), channel)
        except (LinkClosed, LinkTimeout) as e:
            log.info("%s", e)
        except Exception:
            log.exception("%s: unexpected failure; closing the connection", peer)

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


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return format_address(host, port)
    except OSError:
        return "a peer"


def this_machine_only(c: DaemonConfig) -> DaemonConfig:
    """A daemon without a cluster key: listening on loopback, no mDNS, only loopback peers."""
    host = c.host if api.is_loopback(c.host) else "127.0.0.1"
    peers = tuple(p for p in c.peers if api.is_loopback(parse_address(p)[0]))
    return replace(c, host=host, peers=peers, discovery=False)


async def _send_quietly(stream: trio.SocketStream, msg: Error, channel: Channel | None = None) -> None:
    """Best effort: the connection is about to be closed anyway."""
    with trio.move_on_after(2.0):
        try:
            frame = encode(msg)
            await stream.send_all(frame if channel is None else channel.seal(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def main(config: DaemonConfig) -> int:
    """Run the daemon until interrupted (KeyboardInterrupt comes out as itself, not in a group) or sent
    SIGTERM (systemctl stop): then it leaves (Daemon.leave: draining, a Goodbye to every member, the
    requests taken here finished or handed back within drain_s), leaves a worker session in
    progress (telling its root, which re-plans without it: Worker.leave), shuts down cleanly (mDNS
    goodbye included) and returns 0."""
    async def serve_until_sigterm() -> None:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(config)
            await nursery.start(daemon.serve)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    with trio.move_on_after(config.drain_s + 2 * config.timeouts.hello):
                        await daemon.leave("SIGTERM")
                    log.info("SIGTERM: shutting down")
                    await daemon.worker.leave("SIGTERM")  # a worker's session: its root re-plans without it
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(serve_until_sigterm)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return 0
