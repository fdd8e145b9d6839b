"""`--plan auto` choosing pipeline and hybrid plans (session/autoplan.py, planner.choose's handicap): pure
choices on figures derived from the model's own shape (a node too small for the model, links slow or fast),
the plan the root builds being the one priced, the 10 % margin, the stated figures (`plan_figures`), and
live daemons: a root that runs the pipeline it chose, its text equal to one node's, and re-plans around a
worker lost from it."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess

import msgpack
import pytest

from dllp2p import config
from dllp2p.commands import plan as plan_command
from dllp2p.commands import status as status_command
from dllp2p.costmodel import Candidate, ModelShape, Prediction
from dllp2p.formats import ModelConfig
from dllp2p.pipeline import PipelinePlan, build_plan
from dllp2p.planner import PIPELINE_MARGIN, candidate_of, choose, why
from dllp2p.scheduler import Peer
from dllp2p.session import autoplan
from dllp2p.wire.codec import HEADER, MsgType, decode_body, encode
from dllp2p.wire.reports import PlanEstimate, StatusReply

Q4_0 = 18 / 32  # bytes per weight
STEPS = 40  # greedy tokens of the live test's requests


def _config(n_layers: int, n_heads: int, n_kv_heads: int) -> ModelConfig:
    return ModelConfig("llama", 256, n_layers, n_heads, n_kv_heads, 256 // n_heads, 512, 512, 2048, 10000.0,
                       256 // n_heads, 1e-5, False)


def _nodes(n: int, **figures) -> list[autoplan.NodeFacts]:
    """n alike nodes (node 0 the root: its own link is its port too, so it gets the same rtt)."""
    return [autoplan.NodeFacts("root" if i == 0 else f"w{i}", 1.0, **figures) for i in range(n)]


def _choose(cfg: ModelConfig, nodes: list[autoplan.NodeFacts]):
    shape = ModelShape.uniform(cfg, Q4_0, max_nodes=max(k for k in range(1, 65) if autoplan.allowed_nodes(cfg, k)))
    choice, order = autoplan.choose_for(shape, cfg, nodes, "exact")
    return shape, choice, order


def _best(choice, kind: str) -> Prediction:
    return min((p for p in choice.ranked if (p.candidate.kind == "tp") == (kind == "tp") and p.feasible),
               key=lambda p: p.total_ms)


def _rebuilt(cfg: ModelConfig, order: list[autoplan.NodeFacts], cand: Candidate) -> Candidate:
    """The plan root.py builds for a chosen candidate (autoplan.recipe: capacities = the GB/s priced), as a
    Candidate again."""
    devices, _ = autoplan.figures(order)
    peers = [Peer(n.node_id, f"h{i}:1", 1, d.gbps) for i, (n, d) in enumerate(zip(order, devices))]
    policy, k, extra = autoplan.recipe(cand)
    p = build_plan(cfg, peers, 3, policy, max_nodes=k, **extra)
    return candidate_of(p, [n.node_id for n in order], cfg.n_layers)


def test_a_model_bigger_than_one_node_on_slow_links_runs_as_a_pipeline():
    """Each node holds 60 % of the model: one node streams 40 % of it from a slow disk every token; two
    tensor-parallel nodes fit but pay 4 exchanges a layer (+1) on a 20 ms link; a 2-stage pipeline fits and
    pays one hand-off. So the pipeline, by far more than the margin."""
    cfg = _config(4, 8, 8)
    shape = ModelShape.uniform(cfg, Q4_0)
    nodes = _nodes(2, gbps=5.0, disk_gbps=0.01, ram=int(0.6 * shape.weight_bytes), rtt_ms=20.0, mbps=100.0)
    shape, choice, order = _choose(cfg, nodes)
    c = choice.chosen
    assert c.candidate.kind == "pipeline" and c.candidate.n_nodes == 2, autoplan.reason(choice)
    assert c.stream_ms == 0 and c.total_ms * (1 + PIPELINE_MARGIN) <= _best(choice, "tp").total_ms
    assert c.candidate.stages[-1] == (0,)  # priced as built: the root's stage is the last
    assert _rebuilt(cfg, order, c.candidate) == c.candidate
    line = autoplan.reason(choice)
    assert line.startswith("chose pipeline 1+1: predicted ") and "for the best tensor-parallel plan (tp " in line
    # the same nodes with memory for the whole model: one node (a pipeline's stages run one after another)
    roomy = _nodes(2, gbps=5.0, disk_gbps=0.01, ram=int(2 * shape.weight_bytes), rtt_ms=20.0, mbps=100.0)
    assert _choose(cfg, roomy)[1].chosen.candidate.label == "tp 1 exact"


def test_heads_that_allow_two_nodes_and_a_model_of_four_nodes_memory_run_as_a_hybrid():
    """2 KV heads and 2 query heads: tensor parallelism over 2 nodes at most, which would stream (each node
    holds 30 % of the model); 4 nodes hold it as a 4-stage pipeline or as 2 stages of 2-node groups. The
    compute (1 GB/s) outweighs the group's exchanges (0.1 ms links): the hybrid halves it."""
    cfg = _config(4, 2, 2)
    shape = ModelShape.uniform(cfg, Q4_0)
    nodes = _nodes(4, gbps=0.001, disk_gbps=0.0001, ram=int(0.3 * shape.weight_bytes), rtt_ms=0.1, mbps=1000.0)
    shape, choice, order = _choose(cfg, nodes)
    assert shape.max_nodes == 2
    c = choice.chosen
    assert c.candidate.kind == "hybrid" and [len(s) for s in c.candidate.stages] == [2, 2], autoplan.reason(choice)
    assert c.stream_ms == 0 and c.total_ms * (1 + PIPELINE_MARGIN) <= _best(choice, "tp").total_ms
    pipe4 = next(p for p in choice.ranked if p.candidate.label == "pipeline 1+1+1+1")
    assert c.total_ms < pipe4.total_ms
    assert _rebuilt(cfg, order, c.candidate) == c.candidate


def test_fast_links_and_ample_memory_run_tensor_parallel_over_every_node():
    cfg = _config(4, 8, 8)
    nodes = _nodes(4, gbps=0.001, disk_gbps=1.0, rtt_ms=0.01, mbps=10000.0)  # compute-bound: split it 4 ways
    _, choice, _ = _choose(cfg, nodes)
    assert choice.chosen.candidate.label == "tp 4 exact"
    assert {"pipeline", "hybrid"} <= {p.candidate.kind for p in choice.ranked}  # priced, not chosen
    assert autoplan.reason(choice).startswith("chose tp 4 exact: predicted ")


def _pred(kind: str, nodes: int, ms: float) -> Prediction:
    stages = ((0, 1),) if kind == "tp" else ((1,), (0,))
    return Prediction(Candidate(kind, stages[: 1 if kind == "tp" else 2], (4,) if kind == "tp" else (2, 2)),
                      ms, 0.0, 0.0, 0.0, 0, 0.0)


def test_a_pipeline_needs_the_margin_over_tensor_parallelism():
    tp = _pred("tp", 2, 100.0)
    near, far = _pred("pipeline", 2, 100.0 / (1 + PIPELINE_MARGIN) + 0.5), _pred("pipeline", 2, 100.0 / 1.2)
    assert choose([tp, near], handicap=PIPELINE_MARGIN) is tp
    assert choose([tp, near]) is near  # the cost model alone (calibration) has no handicap
    assert choose([tp, far], handicap=PIPELINE_MARGIN) is far
    rows = [("tp", "tp 2 exact", 100.0, True), ("pipeline", "pipeline 1+1", near.total_ms, False)]
    assert "pipeline 1+1 predicted 91.4, not 10 % faster" in why(rows)
    assert why([("tp", "tp 2 exact", 100.0, False)]) == ""


def test_random_clusters_choose_by_the_margin_and_build_what_they_priced():
    """Any figures: a pipeline or hybrid chosen is PIPELINE_MARGIN faster than every tensor-parallel plan
    (within the fewer-nodes margin), a tensor-parallel one is not beaten by that much; every staged
    candidate priced is the plan build_plan makes for it."""
    rng = random.Random(20)
    kinds = set()
    for trial in range(40):
        cfg = _config(rng.choice([2, 3, 4, 6]), 8, rng.choice([1, 2, 8]))
        shape = ModelShape.uniform(cfg, Q4_0)
        nodes = [autoplan.NodeFacts(f"n{i}", 1.0, gbps=rng.uniform(0.001, 10), disk_gbps=rng.uniform(0.0001, 1),
                                    ram=int(shape.weight_bytes * rng.choice([0.2, 0.4, 0.7, 2.0])),
                                    rtt_ms=rng.choice([0.01, 1.0, 30.0]), mbps=rng.choice([10.0, 1000.0]))
                 for i in range(rng.randint(1, 5))]
        shape, choice, order = _choose(cfg, nodes)
        c, tp = choice.chosen, _best(choice, "tp")
        kinds.add(c.candidate.kind)
        if c.candidate.kind == "tp":
            assert all(p.total_ms * (1 + PIPELINE_MARGIN) >= c.total_ms / 1.02 for p in choice.ranked), trial
        else:
            assert c.total_ms * (1 + PIPELINE_MARGIN) <= tp.total_ms * 1.02, trial
        for p in choice.ranked:
            if p.candidate.kind != "tp":
                assert _rebuilt(cfg, order, p.candidate) == p.candidate, (trial, p.candidate)
    assert {"tp", "pipeline"} <= kinds  # the figures reach both kinds of choice


def test_stated_figures_parse_and_replace_the_measured_ones():
    assert config.parse_plan_figures("rtt_ms=20, ram_mb=1.5 gbps=2") == {"rtt_ms": 20.0, "ram_mb": 1.5, "gbps": 2.0}
    assert config.parse_plan_figures("") == {}
    for bad in ("rtt=1", "rtt_ms", "rtt_ms=-1", "mbps=inf", "gbps=x"):
        with pytest.raises(config.ConfigError, match="plan_figures"):
            config.parse_plan_figures(bad)
    with pytest.raises(config.ConfigError, match="DLLP2P_PLAN_FIGURES|environment"):
        config.from_env({"DLLP2P_PLAN_FIGURES": "ram_mb=0"})
    a = autoplan.Assume.of(tuple(config.parse_plan_figures("ram_mb=2 rtt_ms=5").items()))
    n = autoplan.NodeFacts("w", 1.0, gbps=3.0, ram=1 << 40, rtt_ms=0.1, mbps=50.0)
    assert a.apply(n) == autoplan.NodeFacts("w", 1.0, gbps=3.0, ram=2 << 20, rtt_ms=5.0, mbps=50.0)
    assert autoplan.Assume().apply(n) == n


def test_plan_and_status_say_which_kind_was_chosen_and_why():
    est = [PlanEstimate("pipeline 1+1", 2, 5.0, 4.0, 1.0, 0.0, 0.0, 6.0, True, True, "pipeline"),
           PlanEstimate("tp 1 exact", 1, 40.0, 4.0, 0.0, 0.0, 36.0, 0.0, False, True, "tp"),
           PlanEstimate("tp 2 exact", 2, 30.0, 2.0, 28.0, 0.0, 0.0, 0.0, False, True, "tp")]
    reply = StatusReply(0, "root-1", (), None, None, 0, plans=tuple(est))
    assert decode_body(MsgType.STATUS_REPLY, encode(reply)[HEADER.size:]) == reply
    old = msgpack.unpackb(encode(reply)[HEADER.size:])  # a root before PlanEstimate.kind: decoded as "tp"
    for row in old["plans"]:
        del row["kind"]
    assert decode_body(MsgType.STATUS_REPLY, msgpack.packb(old)).plans[1] == est[1]
    doc = plan_command.to_json(reply)
    assert doc["why"] == "chose pipeline 1+1: predicted 5.0 ms/token against 30.0 for the best tensor-parallel " \
                         "plan (tp 2 exact)"
    assert doc["why"] in plan_command.render(doc)
    survey = status_command.Survey("127.0.0.1:1", dataclasses.replace(reply, plan=_pipeline_plan()))
    assert status_command.to_json(survey)["plan"]["why"] == doc["why"]
    assert f"plan pipeline ({doc['why']})" in str(status_command.table(survey).caption)


def _pipeline_plan() -> PipelinePlan:
    peers = [Peer("root-1", "", 1, 1.0), Peer("w1", "h:1", 1, 1.0)]
    p = build_plan(_config(2, 8, 8), peers, 0, "pipeline")
    assert isinstance(p, PipelinePlan)
    return p


@pytest.mark.slow
def test_a_worker_lost_from_a_chosen_pipeline_is_planned_around(tmp_path):
    """Three daemons on loopback; a 3-layer model and figures the root's config states for every node
    (plan_figures: 40 % of the model's bytes per node, a slow disk, 5 ms links) under which auto chooses a
    3-stage pipeline over all three, and tensor parallelism over two (derived below from the model's shape).
    The root runs the pipeline, its text equal to its own single-node answer; `plan` and the log say why.
    Then the first stage's worker (not the root's neighbour) killed (-9) mid-generation: the request re-plans
    over the two left (re-priced: a tensor-parallel plan) and its whole text still equals one node's."""
    from test_recover import Tally, _generate
    from test_serve import CLI, KEY_FILE, ROOT_DIR, SPEC_8KV, Daemons, status, wait_members
    from dllp2p.formats import load_model
    from dllp2p.formats.synthetic import write_random_llama

    model = write_random_llama(tmp_path / "kv8x3.gguf", dataclasses.replace(SPEC_8KV, n_layers=3))
    loaded = load_model(model)
    shape = autoplan.model_shape(loaded)
    stated = f"ram_mb={0.4 * shape.weight_bytes / (1 << 20):.4f} disk_gbps=0.001 rtt_ms=5 mbps=100 gbps=5"
    assume = autoplan.Assume.of(tuple(config.parse_plan_figures(stated).items()))
    kinds = [autoplan.choose_for(shape, loaded.config, [assume.apply(n) for n in _nodes(k)], "exact")[0].chosen
             for k in (3, 2)]
    assert [c.candidate.label for c in kinds] == ["pipeline 1+1+1", "tp 2 exact"]  # what the figures make of it
    conf = tmp_path / "root.toml"
    conf.write_text(f'[daemon]\nplan_figures = "{stated}"\n')
    d, tally = Daemons(tmp_path, 3, model=model), Tally()
    prompt = (1, 5, 9, 14)
    try:
        root = d.start(0, "--plan", "auto", "--config", str(conf))
        want, alone = tally.ask(root, _generate(prompt, STEPS))
        assert alone is not None and alone.nodes == 1 and alone.generated_tokens > 20, want
        d.start(1)
        d.start(2)
        wait_members(root, 3)
        text, done = tally.ask(root, _generate(prompt, STEPS))
        assert text == want and done.nodes == 3, done
        plan = status(root).plan
        assert isinstance(plan, PipelinePlan) and [s.layers for s in plan.stages] == [(0, 1), (1, 2), (2, 3)]
        doc = json.loads(subprocess.run([*CLI, "plan", "--port", root.rsplit(":", 1)[1], "--json", "--key-file",
                                         KEY_FILE], capture_output=True, text=True, timeout=30, cwd=ROOT_DIR).stdout)
        assert doc["why"].startswith("chose pipeline 1+1+1: predicted "), doc
        assert any("auto plan: chose pipeline 1+1+1" in line for line in d.logs[0]), d.logs[0]
        first = plan.stages[0].plan.nodes[0].node_id
        victim = next(i for i in (1, 2) if status(d.address(i)).node_id == first)
        at = 10

        def lose(n: int) -> None:
            if n == at:
                d.procs[victim].send_signal(signal.SIGKILL)

        got, done = tally.ask(root, _generate(prompt, STEPS), lose)
        assert done is not None and got == want, got
        assert done.nodes == 2 and any(f"recovered: worker {d.address(victim)} " in line and
                                       "re-planned 3 -> 2 nodes" in line for line in done.stats), done.stats
        assert status(root).plan.policy == "weighted"  # re-priced over the two left: tensor parallel
        assert (tally.sent, tally.completed, tally.failed) == (3, 3, 0)
    finally:
        d.stop_all()
