"""Election and membership (dllp2p/election.py): table-driven cases, and hypothesis for order independence."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p.election import Entry, Gone, Member, Seen, apply, elect, members, newer_twin

V, C = 1, "home"


def m(node_id: str, started_at: float, *, version: int = V, cluster: str = C, address: str = "") -> Member:
    return Member(node_id, address or f"10.0.0.{len(node_id)}:7340", started_at, version, cluster)


@pytest.mark.parametrize("membership, root, order, excluded", [
    ([], None, [], []),
    ([m("a", 5)], "a", ["a"], []),
    ([m("b", 2), m("a", 1), m("c", 3)], "a", ["a", "b", "c"], []),
    ([m("b", 1), m("a", 1), m("c", 0.5)], "c", ["c", "a", "b"], []),  # tie on start time: node id decides
    ([m("x", 1, version=2), m("y", 3)], "y", ["y"], ["x"]),  # another protocol version never counts
    ([m("x", 1, cluster="lab"), m("y", 3)], "y", ["y"], ["x"]),  # nor another cluster
    ([m("x", 1, cluster="lab")], None, [], ["x"]),
    ([m("a", 1), m("a", 9), m("b", 5)], "b", ["b", "a"], []),  # "a" restarted at 9: its latest start counts
])
def test_election_table(membership, root, order, excluded):
    e = elect(membership, version=V, cluster=C)
    assert (e.root.node_id if e.root else None) == root
    assert [x.node_id for x in e.succession] == order
    assert [x.node_id for x, _ in e.excluded] == excluded


def test_reasons_and_roles():
    e = elect([m("a", 1), m("b", 2), m("x", 0, version=9), m("y", 0, cluster="lab")], version=V, cluster=C)
    reasons = dict((x.node_id, why) for x, why in e.excluded)
    assert "protocol version 9" in reasons["x"] and "cluster 'lab'" in reasons["y"]
    assert [e.role(n) for n in "abxyz"] == ["root", "worker", "excluded", "excluded", "excluded"]
    assert e.next_root().node_id == "b"


def test_root_leaves_next_oldest_takes_over():
    table: dict[str, Entry] = {}
    for node, t in (("c", 3), ("a", 1), ("b", 2)):
        table = apply(table, Seen(m(node, t), "mdns", at=t))
    assert elect(members(table), version=V, cluster=C).root.node_id == "a"
    table = apply(table, Gone("a", "mdns"))
    assert elect(members(table), version=V, cluster=C).root.node_id == "b"


def test_membership_sources():
    table = apply({}, Seen(m("a", 1), "mdns", at=10))
    table = apply(table, Seen(m("a", 1), "static", at=11))
    assert table["a"].sources == {"mdns", "static"} and table["a"].last_seen == 11
    table = apply(table, Gone("a", "mdns"))
    assert table["a"].sources == {"static"}  # still vouched for by the static poll
    assert apply(table, Gone("a", "static")) == {}
    assert apply(table, Gone("nobody", "mdns")) == table


def test_gone_from_one_address_leaves_the_node_held_at_another():
    table = apply({}, Seen(m("a", 1, address="10.0.0.1:1"), "static", at=1))
    assert apply(table, Gone("a", "static", "10.0.0.66:1")) == table  # the impostor's poll stopped answering
    assert apply(table, Gone("a", "static", "10.0.0.1:1")) == {}
    assert apply(table, Gone("a", "static")) == {}  # mDNS goodbyes name no address


def test_late_record_of_an_older_incarnation_keeps_the_new_details():
    table = apply({}, Seen(m("a", 9, address="10.0.0.9:1"), "static", at=20))
    table = apply(table, Seen(m("a", 1, address="10.0.0.1:1"), "mdns", at=21))
    assert table["a"].member.started_at == 9 and table["a"].member.address == "10.0.0.9:1"
    assert table["a"].sources == {"mdns", "static"}


@pytest.mark.parametrize("started_at, address", [(9, "10.0.0.2:1"), (0.5, "10.0.0.2:1"), (1, "10.0.0.2:1"),
                                                 (1, "10.0.0.1:1")])
def test_what_others_say_of_this_nodes_id_never_changes_its_own_entry(started_at, address):
    """A copy of this node (later or earlier), an impostor with its start time, itself reached elsewhere."""
    me = m("a", 1, address="10.0.0.1:1")
    table = apply({}, Seen(me, "self", at=1))
    for source in ("static", "mdns"):
        assert apply(table, Seen(m("a", started_at, address=address), source, at=5)) == table
    assert apply(table, Seen(replace(me, cores=4), "self", at=6))["a"].member.cores == 4  # itself: yes


@pytest.mark.parametrize("started_at, address, twin", [
    (0.5, "10.0.0.2:1", True),  # a copy that started earlier: me takes a new id
    (9, "10.0.0.2:1", False),  # a copy that started later takes one, not me
    (1, "10.0.0.2:1", False),  # same start time elsewhere: an impostor; me keeps its id
    (0.5, "10.0.0.1:1", False),  # an earlier record at my own address: my own previous incarnation
])
def test_newer_twin(started_at, address, twin):
    me = m("a", 1, address="10.0.0.1:1")
    assert newer_twin(me, m("a", started_at, address=address)) is twin
    assert not newer_twin(me, m("b", started_at, address=address))


def test_unknown_source_is_a_bug():
    with pytest.raises(ValueError, match="source"):
        apply({}, Seen(m("a", 1), "carrier-pigeon", at=0))


# --- every node computes the same answer from the same membership ---

ids = st.sampled_from(["a", "b", "c", "d", "e", "pi-1", "pi-2"])
member_st = st.builds(
    Member,
    node_id=ids,
    address=st.sampled_from(["10.0.0.1:7340", "10.0.0.2:7340", "[fe80::1]:7340"]),
    started_at=st.sampled_from([0.0, 1.0, 1.5, 2.0, 1e9]),  # few values: ties happen
    version=st.sampled_from([V, V, V, 2]),
    cluster=st.sampled_from([C, C, "lab"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(member_st, max_size=8), st.randoms(use_true_random=False))
def test_same_membership_same_answer_in_any_order(membership, rnd):
    shuffled = list(membership)
    rnd.shuffle(shuffled)
    assert elect(membership, version=V, cluster=C) == elect(shuffled, version=V, cluster=C)
    # the same through the membership table, events applied in either order (one record per node:
    # conflicting records of one incarnation are resolved by time, newest wins)
    one = list({x.node_id: x for x in membership}.values())
    t1: dict[str, Entry] = {}
    t2: dict[str, Entry] = {}
    for x in one:
        t1 = apply(t1, Seen(x, "mdns", at=0))
    for x in rnd.sample(one, len(one)):
        t2 = apply(t2, Seen(x, "mdns", at=0))
    e1 = elect(members(t1), version=V, cluster=C)
    assert e1 == elect(members(t2), version=V, cluster=C)
    assert e1 == elect(one, version=V, cluster=C)


@settings(max_examples=200, deadline=None)
@given(st.lists(member_st, min_size=1, max_size=8))
def test_succession_invariants(membership):
    e = elect(membership, version=V, cluster=C)
    ranks = [x.rank for x in e.succession]
    assert ranks == sorted(ranks) and len({x.node_id for x in e.succession}) == len(ranks)
    assert e.root == (e.succession[0] if e.succession else None)
    assert {x.node_id for x in e.succession}.isdisjoint(x.node_id for x, _ in e.excluded)
    # removing the root promotes exactly the next in line
    if e.root is not None:
        rest = [x for x in membership if x.node_id != e.root.node_id]
        assert elect(rest, version=V, cluster=C).root == e.next_root()
