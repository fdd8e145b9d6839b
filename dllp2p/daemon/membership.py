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
stays in this node's view of itself."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

import trio

from .. import election
from ..clusterkey import ClusterKey
from ..discovery import MdnsOptions, StaticOptions, advertised_addresses, local_facts, poll_static, run_mdns
from ..election import Member, Seen
from ..wire.client import ask_status_timed
from ..wire.codec import UnexpectedMessage
from ..wire.link import format_address
from ..wire.messages import PROTOCOL_VERSION
from ..wire.reports import LinkRtt

log = logging.getLogger("dllp2p.daemon")


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
        self._claims_logged: set[str] = set()  # addresses whose claim of this node's id was logged
        self._twins_logged: set[tuple[str, str, str]] = set()  # (node id, address, address) logged
        self._mdns: tuple[trio.Nursery, trio.MemorySendChannel, str, int, MdnsOptions] | None = None
        self._mdns_scope: trio.CancelScope | None = None

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
                if (probes is not None and isinstance(event, Seen) and event.source == "mdns"
                        and event.member.node_id not in probed and event.member.node_id != self.node_id):
                    probed.add(event.member.node_id)
                    probes[0].start_soon(probe, event.member)
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
        return replace(me, address=address)
