"""A daemon's membership: itself, the daemons mDNS finds (discovery.run_mdns, unless disabled) and the
--peer daemons it polls with Status (discovery.poll_static; mDNS-found members are polled the same way
while they answer, so one killed without a goodbye leaves in seconds). Their events go through one
bounded channel to one task that applies them (election.apply) and logs every change of root or of who
is excluded (another protocol version or cluster name never joins). Roles are election.elect of that
table.

A node id that is not unique (a cloned SD image's state dir; an impostor): a record of this node's id from
elsewhere never changes its own entry (election.apply). If it started earlier at another address
(election.newer_twin), this node is the copy: `renew` (the daemon's) makes and stores a new id, and this
node announces that from the next Status and a re-registered mDNS service on, within one poll round.
An mDNS service name already taken at start (zeroconf's NonUniqueNameException) means the same.
Otherwise the claim is logged once per address and ignored: when the claimant leaves, nothing of it
stays in this node's view of itself.

A death the root learns of first (a worker lost mid-request: session/service.py's on_lost) is applied at
once (mark_dead), not after the polls' misses: the member leaves the table, and records of that same
incarnation (a poll answered just before the death, a lingering mDNS record) are ignored for DEAD_HOLD_S.
A restarted daemon (a later started_at) joins again at once; a node marked dead by mistake (a long stall)
comes back at its first poll after the hold."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

import trio

from .. import election
from ..clusterkey import ClusterKey
from ..discovery import MdnsOptions, StaticOptions, advertised_addresses, local_facts, poll_static, run_mdns
from ..election import Left, Member, Seen
from ..wire.client import ask_status_timed, say_goodbye
from ..wire.codec import UnexpectedMessage
from ..wire.link import format_address
from ..wire.messages import PROTOCOL_VERSION, Goodbye
from ..wire.reports import LinkRtt

log = logging.getLogger("dllp2p.daemon")

DEAD_HOLD_S = 15.0  # a member marked dead: its incarnation's records are ignored this long (> the polls' misses)


class Membership:
    """The membership table of the daemon `node_id` and the tasks that feed it."""

    def __init__(self, node_id: str, cluster: str, started_at: float, static: StaticOptions,
                 key: ClusterKey | None = None, renew: Callable[[], str] | None = None):
        self.node_id = node_id
        self.renew = renew  # makes, stores and hands out a new node id (when this node is the copy)
        self.key = key  # mDNS records MACed under it; peers polled through the secure channel
        self.cluster = cluster
        self.started_at = started_at
        self.static = static
        self.me: Member | None = None  # once listening
        self.members: dict[str, election.Entry] = {}  # node id -> entry, this node included
        self.link_rtt: dict[str, LinkRtt] = {}  # node id -> the latest Status poll's round-trip to it
        self.rates: dict[str, float] = {}  # node id -> the compute rate its latest Status reply said (0: none)
        self.waits: dict[str, float] = {}  # node id -> the CPU wait per exchange its latest Status reply said
        self._claims_logged: set[str] = set()  # addresses whose claim of this node's id was logged
        self._twins_logged: set[tuple[str, str, str]] = set()  # (node id, address, address) logged
        self._mdns: tuple[trio.Nursery, trio.MemorySendChannel, str, int, MdnsOptions] | None = None
        self._mdns_scope: trio.CancelScope | None = None
        self._events: trio.MemorySendChannel | None = None  # into _apply, for what this node learns itself
        self._gone: set[tuple[str, float]] = set()  # (node id, started_at) of members that said goodbye
        self._dead: dict[str, tuple[float, float]] = {}  # node id -> (its dead incarnation's started_at, until)

    async def start(self, nursery: trio.Nursery, host: str, port: int, *, discovery: bool,
                    interfaces: tuple[str, ...], peers: tuple[str, ...]) -> None:
        """This node in the table; mDNS and static peers feeding it (their tasks in nursery)."""
        cores, ram, features = local_facts()
        shown = advertised_addresses(host, interfaces)[0] if host in ("0.0.0.0", "::", "") else host
        self.me = Member(self.node_id, format_address(shown, port), self.started_at, PROTOCOL_VERSION, self.cluster,
                         cores, ram, features)
        self.members = election.apply({}, Seen(self.me, "self", time.time()))
        send, recv = trio.open_memory_channel[election.Event](64)
        nursery.start_soon(self._apply, recv, (nursery, send.clone()) if discovery else None)
        self._events = send.clone()
        if discovery:
            # mDNS where the daemon listens: the chosen interfaces, else a specific listening address's
            interfaces = interfaces or (() if host in ("0.0.0.0", "::", "") else (host,))
            mac_key = None if self.key is None else self.key.mdns_key
            self._mdns = (nursery, send.clone(), host, port, MdnsOptions(interfaces, mac_key=mac_key))
            await self._start_mdns()
        for address in peers:
            nursery.start_soon(poll_static, address, self._fetch_member, send.clone(), self.static)
        send.close()

    async def _start_mdns(self, retry: bool = True) -> None:
        """mDNS for this node's current record (in start's nursery); once more under a new id if the
        service name (the node id) is already taken on the network."""
        from zeroconf import Error as ZeroconfError, NonUniqueNameException  # optional: only mDNS needs it

        assert self._mdns is not None and self.me is not None
        nursery, send, host, port, options = self._mdns
        try:
            await nursery.start(self._run_mdns, self.me, host, port, send, options)
        except NonUniqueNameException:
            if not (retry and self.renew is not None):
                raise
            log.warning("mDNS: another daemon already announces node id %s (a copied state dir?): this node "
                        "takes a new id", self.node_id)
            await self._rename(self.renew(), restart_mdns=False)
            await self._start_mdns(retry=False)
        except (OSError, ZeroconfError) as e:  # no usable multicast interface: static peers still work
            log.warning("mDNS discovery is off: %s: %s", type(e).__name__, e)

    async def _run_mdns(self, me: Member, host: str, port: int, send: trio.MemorySendChannel, options: MdnsOptions,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._mdns_scope = scope
            await run_mdns(me, host, port, send.clone(), options, task_status=task_status)

    async def _rename(self, new_id: str, restart_mdns: bool = True) -> None:
        """This node under new_id from now on: its own entry, its Status replies, its mDNS service."""
        old = self.node_id
        assert self.me is not None
        self.node_id, self.me = new_id, replace(self.me, node_id=new_id)
        self.members = {k: e for k, e in self.members.items() if k != old}
        self.members = election.apply(self.members, Seen(self.me, "self", time.time()))
        self._claims_logged.clear()
        log.warning("node id %s -> %s (stored in the state dir)", old, new_id)
        if restart_mdns and self._mdns_scope is not None:
            self._mdns_scope.cancel()  # its goodbye withdraws the old name
            await self._start_mdns(retry=False)

    async def _claim(self, member: Member) -> None:
        """Another daemon's record of this node's id: this node takes a new id if it is the copy, else
        the claim is logged once per address and ignored."""
        assert self.me is not None
        if self.renew is not None and election.newer_twin(self.me, member):
            log.warning("node id %s is also held by the daemon at %s, started earlier (a copied state dir?): "
                        "this node takes a new id", self.node_id, member.address)
            await self._rename(self.renew())
        elif member.address != self.me.address and member.address not in self._claims_logged:
            self._claims_logged.add(member.address)
            how = "with this node's start time" if member.started_at == self.me.started_at else "started later"
            log.warning("node id %s is also claimed by the daemon at %s (%s): ignored; this node keeps its id",
                        self.node_id, member.address, how)

    def _note_twin(self, member: Member) -> None:
        """Logs (once per pair of addresses) another node's id answering at two addresses: one daemon
        reached two ways, or two sharing an id (a copy takes a new id itself; an impostor does not)."""
        old = self.members.get(member.node_id)
        if old is None or old.member.address == member.address or "self" in old.sources:
            return
        pair = (member.node_id, *sorted((old.member.address, member.address)))
        if pair not in self._twins_logged:
            self._twins_logged.add(pair)
            log.warning("node %s answers at both %s and %s (started %.3f and %.3f): one daemon reached two ways, "
                        "or two sharing a node id", member.node_id, old.member.address, member.address,
                        old.member.started_at, member.started_at)

    async def _apply(self, events: trio.MemoryReceiveChannel,
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
                    await poll_static(member.address, self._fetch_member, send, self.static,
                                      source="mdns", until_gone=True)
            finally:
                probed.discard(member.node_id)

        async with events:
            async for event in events:
                if isinstance(event, Seen) and (event.member.node_id, event.member.started_at) in self._gone:
                    continue  # a poll or mDNS record of a member that said goodbye: it is on its way out
                if (probes is not None and isinstance(event, Seen) and event.source == "mdns"
                        and event.member.node_id not in probed and event.member.node_id != self.node_id):
                    probed.add(event.member.node_id)
                    probes[0].start_soon(probe, event.member)
                if self._dead_record(event):
                    continue
                if isinstance(event, Seen) and event.source != "self" and event.member.node_id == self.node_id:
                    await self._claim(event.member)
                elif isinstance(event, Seen):
                    self._note_twin(event.member)
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

    # --- leaving: a goodbye heard or said, a root found dead (handover) ---

    async def heard_goodbye(self, bye: Goodbye, peer: str) -> None:
        """A member is stopping (SIGTERM): out of the table at once, and this incarnation for good (its polls
        and mDNS records are ignored until it restarts), so the next root is elected now. Only from the host
        the member is known at (`peer`: "host:port" of the connection): no member says goodbye for another."""
        entry = self.members.get(bye.node_id)
        if bye.node_id == self.node_id or entry is None:
            return
        if entry.member.address.rpartition(":")[0] != peer.rpartition(":")[0]:
            log.warning("%s: a goodbye for node %s, which is at %s: ignored", peer, bye.node_id, entry.member.address)
            return
        log.info("node %s says goodbye (%s)", bye.node_id, bye.reason)
        self._gone.add((bye.node_id, bye.started_at))
        await self._learn(Left(bye.node_id, bye.started_at))

    async def root_lost(self, root: Member, *, left: bool, limit: float) -> None:
        """The root went away in the middle of a request forwarded to it: out of the table at once if it said
        so (left: it answered draining) or if it does not answer a Status now (a link closed by a kill, a
        silent one); then wait, at most `limit` seconds, for the election to name another root."""
        if left:
            self._gone.add((root.node_id, root.started_at))
            await self._learn(Left(root.node_id, root.started_at))
        elif not await self._answers(root.address):
            self.mark_dead(root.address, "the root does not answer after its link to a request failed")
        with trio.move_on_after(limit):
            while (e := self.election()).root is not None and e.root.node_id == root.node_id:
                await trio.sleep(0.02)

    async def goodbye(self, reason: str, limit: float) -> None:
        """Tell every other member that this node is leaving (a Goodbye each, all at once, within limit)."""
        assert self.me is not None
        bye = Goodbye(self.node_id, self.me.started_at, reason)
        others = [m.address for m in election.members(self.members) if m.node_id != self.node_id]
        async with trio.open_nursery() as nursery:
            for address in others:
                nursery.start_soon(say_goodbye, address, bye, limit, self.key)

    async def _learn(self, event: election.Event) -> None:
        """An event this node found out itself, applied by _apply like the others."""
        if self._events is not None:
            await self._events.send(event)

    async def _answers(self, address: str) -> bool:
        with trio.move_on_after(self.static.timeout):
            try:
                await self._fetch_member(address)
                return True
            except (OSError, ValueError):  # LinkClosed, LinkTimeout, ProtocolError
                pass
        return False

    def mark_dead(self, address: str, cause: str) -> None:
        """The member at address died (the root lost it mid-request): out of the table now, its incarnation
        ignored for DEAD_HOLD_S (see the module docstring). Called on the trio thread, between the
        events `_apply` applies."""
        now = time.time()
        for node, entry in list(self.members.items()):
            if entry.member.address == address and "self" not in entry.sources:
                self._dead[node] = (entry.member.started_at, now + DEAD_HOLD_S)
                self.members = {k: v for k, v in self.members.items() if k != node}
                log.warning("node %s at %s marked dead: %s", node, address, cause)

    def _dead_record(self, event: election.Event) -> bool:
        """Whether event is a Seen of an incarnation marked dead, within its hold."""
        if not isinstance(event, Seen) or event.member.node_id not in self._dead:
            return False
        started_at, until = self._dead[event.member.node_id]
        if event.member.started_at > started_at or time.time() >= until:
            del self._dead[event.member.node_id]  # restarted, or the hold is over
            return False
        return True

    def election(self) -> election.Election:
        return election.elect(election.members(self.members), version=PROTOCOL_VERSION, cluster=self.cluster)

    async def _fetch_member(self, address: str) -> Member:
        """A --peer daemon's own record, with the address it was reached at; the round-trip is kept."""
        reply, rtt = await ask_status_timed(address, self.static.timeout, key=self.key)
        me = next((n.member for n in reply.nodes if n.member.node_id == reply.node_id), None)
        if me is None:
            raise UnexpectedMessage(f"{address}: its StatusReply does not list node {reply.node_id} itself")
        if reply.node_id != self.node_id:
            self.link_rtt[reply.node_id] = LinkRtt(reply.node_id, rtt * 1e3, time.time())
            self.rates[reply.node_id] = reply.rate
            self.waits[reply.node_id] = reply.wait_ms
        return replace(me, address=address)
