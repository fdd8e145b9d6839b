"""Pipeline and hybrid plans (dllp2p/pipeline.py): layers covered once in order, the root leading the last
stage, layers by capacity, flattened node order, validation of plans built wrong, the wire round trip,
and candidate_plans' enumeration."""

from __future__ import annotations

import dataclasses

import pytest

from dllp2p.pipeline import PipelinePlan, Stage, build_plan, candidate_plans, check_fits, stage_plan, with_epoch
from dllp2p.formats import QType
from dllp2p.scheduler import Peer, Plan, PlanError, check_plan_fits
from dllp2p.session.checks import SessionRefused, check_config, check_shapes, kv_bytes
from dllp2p.wire.messages import Session, SliceInfo
import msgpack

from dllp2p.wire.codec import _from_wire, _to_wire
from dllp2p.wire.limits import unpack

from test_scheduler import LLAMA_8KV, SMOLLM2


def _peers(*capacities: float) -> list[Peer]:
    return [Peer(f"n{i}", f"10.0.0.{i}:9999", 2, c) for i, c in enumerate(capacities)]


# SmolLM2's output projection (49152 x 576) weighs as much as 8 of its layers (pipeline.output_layers), and
# the root's stage, the last, holds it: every stage streams (its layers + 8 if last) in proportion to its
# capacity, T = (30 + 8) / sum(capacities) layers per unit.
@pytest.mark.parametrize("n,caps,want_layers", [
    (2, (1, 1), [(0, 19), (19, 30)]),  # T = 19: 19 and 19 - 8
    (3, (1, 1, 1), [(0, 13), (13, 26), (26, 30)]),  # T = 12.67: 12.67, 12.67, 4.67 -> 13, 13, 4
    (2, (1, 2), [(0, 25), (25, 30)]),  # n1 (capacity 2) is stage 0, the root the last: 25.3 and 12.67 - 8
])
def test_pipeline_layers_by_capacity_output_counted_root_last(n, caps, want_layers):
    p = stage_plan(SMOLLM2, _peers(*caps), epoch=3, policy="pipeline")
    assert [s.layers for s in p.stages] == want_layers
    assert all(s.plan.n_nodes == 1 for s in p.stages)
    assert p.stages[-1].plan.nodes[0].node_id == "n0"
    assert p.nodes[0].node_id == "n0" and [x.index for x in p.nodes] == list(range(n))
    assert p.n_nodes == n and p.epoch == 3
    check_plan_fits(p, SMOLLM2)
    check_fits(p, SMOLLM2)


def test_hybrid_groups_and_locate():
    p = stage_plan(LLAMA_8KV, _peers(4, 3, 2, 1), epoch=0, policy="hybrid", group=2)
    assert [[n.node_id for n in s.plan.nodes] for s in p.stages] == [["n2", "n3"], ["n0", "n1"]]
    assert [s.layers for s in p.stages] == [(0, 9), (9, 30)]  # capacities 3 : 7
    assert [n.node_id for n in p.nodes] == ["n0", "n2", "n3", "n1"]
    assert [p.locate(i) for i in range(4)] == [(1, 0), (0, 0), (0, 1), (1, 1)]
    assert [p.index_of(*p.locate(i)) for i in range(4)] == [0, 1, 2, 3]
    # three nodes in groups of two: the root's pair last, a one-node first stage
    p3 = stage_plan(LLAMA_8KV, _peers(1, 1, 1), epoch=0, policy="hybrid")
    assert [s.plan.n_nodes for s in p3.stages] == [1, 2]


def test_wire_round_trip():
    p = stage_plan(LLAMA_8KV, _peers(1, 1, 1, 1), epoch=2, policy="hybrid")
    body = msgpack.packb(_to_wire(p, PipelinePlan, "plan"), use_bin_type=True)
    assert _from_wire(unpack(body), PipelinePlan, "plan") == p


def _two_stages(**change) -> dict:
    p = stage_plan(SMOLLM2, _peers(1, 1), epoch=0, policy="pipeline")
    fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    return {**fields, **change}


@pytest.mark.parametrize("change,match", [
    (lambda f: {"stages": (Stage((0, 14), f["stages"][0].plan), f["stages"][1])}, "do not follow"),
    (lambda f: {"stages": (f["stages"][0], Stage((f["stages"][1].layers[0], 29), f["stages"][1].plan))},
     "end at layer 29"),
    (lambda f: {"stages": (f["stages"][0], Stage(f["stages"][1].layers, f["stages"][0].plan))}, "two stages"),
    (lambda f: {"stages": ()}, "no stages"),
    (lambda f: {"policy": "pow2"}, "unknown policy"),
    (lambda f: {"epoch": 9}, "epoch 0"),
])
def test_invalid_plans_refused(change, match):
    fields = _two_stages()
    with pytest.raises(PlanError, match=match):
        PipelinePlan(**{**fields, **change(fields)})


def test_layers_must_match_the_model():
    p = stage_plan(SMOLLM2, _peers(1, 1), epoch=0, policy="pipeline")
    with pytest.raises(PlanError, match="30 layers"):
        check_fits(p, dataclasses.replace(SMOLLM2, n_layers=31))


def test_candidate_plans():
    cands = candidate_plans(LLAMA_8KV, _peers(1, 1, 1, 1))
    kinds = sorted((type(p).__name__, p.policy, p.n_nodes) for p in cands)
    assert ("Plan", "pow2", 1) in kinds and ("Plan", "pow2", 4) in kinds and ("Plan", "weighted", 3) in kinds
    assert ("PipelinePlan", "pipeline", 2) in kinds and ("PipelinePlan", "pipeline", 4) in kinds
    assert ("PipelinePlan", "hybrid", 4) in kinds
    assert len(kinds) == len(set(kinds))  # equal capacities: pow2 and weighted of 2 and 4 nodes are one plan
    assert all(p.nodes[0].node_id == "n0" for p in cands)
    assert candidate_plans(LLAMA_8KV, _peers(1, 1, 1, 1)) == cands  # pure
    assert all(isinstance(p, (Plan, PipelinePlan)) for p in cands)


def test_build_plan_dispatches_and_falls_back():
    assert isinstance(build_plan(SMOLLM2, _peers(1, 1), 0, "weighted"), Plan)
    alone = build_plan(SMOLLM2, _peers(1), 0, "pipeline")  # the root alone: a one-node tensor-parallel plan
    # as session/root.start asks for it (max_nodes=None) when the only worker is gone: the same plan
    assert build_plan(SMOLLM2, _peers(1), 0, "pipeline", max_nodes=None) == alone
    assert isinstance(alone, Plan) and alone.n_nodes == 1
    two = build_plan(SMOLLM2, _peers(1, 1), 0, "hybrid")  # one group of 2 would be a single stage
    assert isinstance(two, PipelinePlan) and two.policy == "pipeline" and two.n_nodes == 2
    four = build_plan(LLAMA_8KV, _peers(1, 1, 1, 1), 5, "hybrid")
    assert [s.plan.n_nodes for s in four.stages] == [2, 2] and four.epoch == 5
    moved = with_epoch(four, 9)
    assert moved.epoch == 9 and all(s.plan.epoch == 9 for s in moved.stages) and with_epoch(moved, 5) == four


def test_a_worker_checks_a_stage_session():
    """A stage's node refuses slices of layers outside its stage, and sizes its KV cache by its layers."""
    p = stage_plan(SMOLLM2, [Peer("r", "", 1, 1.0), Peer("w", "127.0.0.1:1", 1, 1.0)], 1, "pipeline")
    assert p.stages[0].layers == (0, 19) and p.nodes[1].node_id == "w"

    def session(*layers: int) -> Session:
        return Session(p, SMOLLM2, 64, tuple(SliceInfo(f"blk.{i}.attn_norm.weight", "n", int(QType.F32), (SMOLLM2.dim,),
                                                       f"{i:064x}") for i in layers))

    check_shapes(session(0, 18), 1)
    with pytest.raises(SessionRefused, match=r"blk.19.attn_norm.weight: not a layer of this node's stage \[0, 19\)"):
        check_shapes(session(0, 19), 1)
    whole = kv_bytes(SMOLLM2, p.nodes[1], 64)
    check_config(session(0), 1, int(whole * 0.75))  # 19 of 30 layers' KV cache fits where all 30 would not
    with pytest.raises(SessionRefused, match="available"):
        check_config(session(0), 1, int(whole * 0.6))
