"""Pure membership and election: who is in the cluster, who is root, who comes next. No I/O, no clocks.

    Member        what a daemon announces about itself (mDNS TXT record, or its Status reply)
    Membership    node id -> Entry(member, sources, last_seen); changed only by apply(table, event):
                  Seen, Gone (of one source), Left (of the node: a goodbye, or found dead)
    elect         members -> Election(root, succession, excluded)

Rules:
    compatible    same protocol version and same cluster name as the node judging; anything else is
                  excluded, with the reason, and never takes part
    root          the compatible member started first (lowest started_at), node id breaking ties
    succession    every compatible member in that same order: when the root goes away, the next one
                  in line is the new root, because it is the first of what remains

The answer depends only on the set of members, never on the order they were discovered in, so every
node that sees the same membership elects the same root. A node id seen twice (a daemon restarted
before its old record expired) counts once: its latest incarnation (highest started_at).

Identity: a node id must be unique, but two devices booted from one cloned SD image share the state dir
and so the id, and a key holder can announce another's id and start time. The entry a node holds of
itself (source "self") is never changed by what others say about its id (apply); a record of its id
from another address that started earlier makes it the copy (newer_twin): the daemon takes a new id and
announces that (daemon/membership.py). The earlier one keeps its id and only logs the claim.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Union

SOURCES = ("self", "mdns", "static")  # how a member came to be known
NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # as daemon.node_id makes them
CLUSTER = re.compile(r"[A-Za-z0-9._-]{1,63}")


@dataclass(frozen=True)
class Member:
    node_id: str
    address: str  # "host:port" of its daemon's control port
    started_at: float  # unix seconds when its daemon started
    version: int  # protocol version it speaks
    cluster: str  # cluster name; daemons only join their own
    cores: int = 1
    ram: int = 0  # bytes
    features: tuple[str, ...] = ()  # CPU features the JIT cares about, e.g. ("avx2", "avx512_vnni")

    def __post_init__(self) -> None:
        """Checks what the election relies on; a ValueError names the field (a record from the wire)."""
        if not NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"node id {self.node_id!r} is not 1-64 of [A-Za-z0-9._-]")
        if not CLUSTER.fullmatch(self.cluster):
            raise ValueError(f"cluster name {self.cluster!r} is not 1-63 of [A-Za-z0-9._-]")
        if not math.isfinite(self.started_at) or self.started_at < 0:
            raise ValueError(f"start time {self.started_at!r} is not a finite time >= 0")
        if self.version < 0 or self.cores < 1 or self.ram < 0:
            raise ValueError(f"version {self.version}, cores {self.cores} or RAM {self.ram} out of range")

    @property
    def rank(self) -> tuple[float, str]:
        """Sort key of the succession: earliest start first, node id breaking ties."""
        return (self.started_at, self.node_id)


@dataclass(frozen=True)
class Election:
    root: Member | None  # None only when no member is compatible
    succession: tuple[Member, ...]  # compatible members, root first
    excluded: tuple[tuple[Member, str], ...]  # (member, why), by node id

    def role(self, node_id: str) -> str:
        """'root', 'worker' (compatible, not root) or 'excluded' (incompatible or unknown)."""
        if self.root is not None and self.root.node_id == node_id:
            return "root"
        return "worker" if any(m.node_id == node_id for m in self.succession) else "excluded"

    def next_root(self) -> Member | None:
        """Who takes over if the root goes away now."""
        return self.succession[1] if len(self.succession) > 1 else None


def incompatibility(member: Member, version: int, cluster: str) -> str | None:
    """Why member cannot join a cluster named `cluster` speaking `version`; None if it can."""
    if member.version != version:
        return f"protocol version {member.version}, this node speaks {version}"
    if member.cluster != cluster:
        return f"cluster {member.cluster!r}, this node is in {cluster!r}"
    return None


def latest(members: Iterable[Member]) -> list[Member]:
    """One member per node id: its latest incarnation (highest started_at; conflicting records of one
    incarnation are ordered by all their fields, so the choice never depends on the input order)."""
    best: dict[str, Member] = {}
    for m in members:
        old = best.get(m.node_id)
        if old is None or _total_key(m) > _total_key(old):
            best[m.node_id] = m
    return list(best.values())


def _total_key(m: Member) -> tuple:
    return (m.started_at, m.address, m.version, m.cluster, m.cores, m.ram, m.features)


def elect(members: Iterable[Member], *, version: int, cluster: str) -> Election:
    """The root, the succession and the excluded members of this membership."""
    ok: list[Member] = []
    excluded: list[tuple[Member, str]] = []
    for m in latest(members):
        why = incompatibility(m, version, cluster)
        if why is None:
            ok.append(m)
        else:
            excluded.append((m, why))
    ok.sort(key=lambda m: m.rank)
    excluded.sort(key=lambda e: e[0].node_id)
    return Election(ok[0] if ok else None, tuple(ok), tuple(excluded))


# --- membership table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    member: Member
    sources: frozenset[str]  # of SOURCES: it stays while any source still vouches for it
    last_seen: float  # the event time of its latest Seen


@dataclass(frozen=True)
class Seen:
    """A source saw this member (new, or with new details)."""

    member: Member
    source: str
    at: float


@dataclass(frozen=True)
class Gone:
    """A source no longer sees this node (mDNS goodbye or expiry, a static peer that stopped answering)."""

    node_id: str
    source: str
    address: str = ""  # where the source last saw it (a static poll's address); "" = wherever it is


@dataclass(frozen=True)
class Left:
    """This incarnation of a node is gone, whatever source still vouches for it: it said goodbye (SIGTERM),
    or it was found dead (the root's link closed mid-request and a probe failed). Removes the entry of
    that start (or an older one); a later incarnation (a restart) is kept."""

    node_id: str
    started_at: float


Event = Union[Seen, Gone, Left]
Membership = Mapping[str, Entry]


def apply(table: Membership, event: Event) -> dict[str, Entry]:
    """The membership after event (a new dict; table is not changed). A record of the same incarnation
    (same started_at) replaces the details held: the newest news of a node wins (a new address)."""
    out = dict(table)
    if isinstance(event, Seen):
        if event.source not in SOURCES:
            raise ValueError(f"unknown membership source {event.source!r}")
        old = out.get(event.member.node_id)
        if old is not None and "self" in old.sources and event.source != "self":
            # another source's record of this node's own id (a copy of it, an impostor, or itself reached
            # at another address): this node knows itself best
            return out
        if old is not None and old.member.started_at > event.member.started_at:
            # an older incarnation's record arriving late: it vouches for the node, its details do not
            out[old.member.node_id] = replace(old, sources=old.sources | {event.source})
        else:
            sources = (old.sources if old else frozenset()) | {event.source}
            out[event.member.node_id] = Entry(event.member, sources, max(event.at, old.last_seen if old else event.at))
    elif isinstance(event, Left):
        old = out.get(event.node_id)
        if old is not None and "self" not in old.sources and old.member.started_at <= event.started_at:
            del out[event.node_id]
    else:
        old = out.get(event.node_id)
        # a poll of one address that stopped answering says nothing of the node held at another: a
        # claimant of its id leaving (an impostor, a copy) does not take the node with it
        if old is not None and (not event.address or event.address == old.member.address):
            sources = old.sources - {event.source}
            if sources:
                out[event.node_id] = replace(old, sources=sources)
            else:
                del out[event.node_id]
    return out


def newer_twin(me: Member, other: Member) -> bool:
    """Whether `other`, a record of me's node id from elsewhere, makes me the copy that must take a new
    id: it is at another address and started earlier (an equal start time at another address is an
    impostor or this node reached another way: me keeps its id)."""
    return other.node_id == me.node_id and other.address != me.address and other.started_at < me.started_at


def members(table: Membership) -> list[Member]:
    return [e.member for e in table.values()]
