"""The cost model and planner: held to distributed-llama's published Raspberry Pi tables (seed 002), its
byte counts to the compiled program's own, and the planner's choices on clusters whose answer is known.
Pure functions: the whole file runs in well under a second."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from dllp2p import calibration as cal
from dllp2p.costmodel import (Candidate, CostModelError, DeviceFigures, LinkFigures, ModelShape, group_exchange,
                              predict, split_layers)
from dllp2p.formats import ModelConfig
from dllp2p.planner import candidate_of, candidates, choose, plan_for, rank

TOLERANCE = 0.15
# Entries the one set of figures cannot match, and why (calibration.py's docstring): the paper's 7B
# synchronization row is inconsistent with its 13B row (less data took longer), and the 8-device 7B total
# follows its sync. The test fails if any other entry misses, or if one of these starts to match.
KNOWN_MISSES = {("sync", "7B", 2), ("sync", "7B", 4), ("sync", "7B", 8), ("total", "7B", 8)}


def test_star_exchange_bytes_reproduce_figure_6():
    for (model, n), kb in cal.PAPER_KB.items():
        _, nbytes = group_exchange(cal.SHAPES[model], "star", n, cal.SHAPES[model].n_layers, True)
        assert nbytes / 1024 == pytest.approx(kb, rel=0.002), (model, n)


def test_paper_tables_within_15_percent_except_the_named_misses():
    misses = set()
    for (model, n), (total, inference, sync) in cal.PAPER_MS.items():
        p = cal.paper_prediction(model, n)
        assert p.compute_ms == pytest.approx(inference, rel=TOLERANCE), (model, n)  # every Inference entry
        if abs(p.total_ms / total - 1) > TOLERANCE:
            misses.add(("total", model, n))
        if n > 1 and abs(p.sync_ms / sync - 1) > TOLERANCE:  # one device: 1.8 ms of no exchange
            misses.add(("sync", model, n))
    assert misses == KNOWN_MISSES


def test_what_dllp2p_would_choose_on_the_papers_clusters():
    """On 8 Pis dllp2p's q8 all-reduce (2 exchanges a layer, reduce-scattered) beats the star the paper
    measured; the planner takes all 8 and predicts well under the paper's time for every model."""
    for model, paper_total in (("7B", 588.19), ("13B", 1114.88), ("70B", 4842.81)):
        choice = cal.dllp2p_choice(model, 8)
        assert choice.chosen.candidate.n_nodes == 8 and choice.chosen.candidate.exchange == "q8"
        assert choice.chosen.total_ms < 0.75 * paper_total
    # 70B's 38.7 GB do not fit fewer than 8 Pis' RAM: those plans stream from microSD and lose by far
    choice = cal.dllp2p_choice("70B", 8)
    fewer = [p for p in choice.ranked if p.candidate.n_nodes < 6]
    assert fewer and all(p.stream_ms > 0 and p.total_ms > 3 * choice.chosen.total_ms for p in fewer)


def config(dim=256, ffn=768, layers=4, heads=8, kv=8, vocab=512) -> ModelConfig:
    return ModelConfig(arch="llama", dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=dim // heads,
                       ffn_dim=ffn, vocab_size=vocab, context_length=256, rope_base=10000.0,
                       rope_dim=dim // heads, norm_eps=1e-5, tied_output=False)


@pytest.mark.parametrize("exchange,n", [("exact", 2), ("exact", 4), ("q8", 2), ("q8", 4), ("q8", 8)])
def test_exchange_bytes_match_the_compiled_programs_count(exchange, n):
    """group_exchange's formula against jit/tp_partition.bytes_per_step (what the compiled step sends)."""
    from dllp2p.jit.tp_partition import bytes_per_step
    from dllp2p.scheduler import Peer, plan
    from dllp2p.tp import partition_of

    c = config()
    p = plan(c, [Peer(f"n{i}", f"h{i}:1", 1, 1.0) for i in range(n)], 0, "pow2", exchange=exchange)
    spec = SimpleNamespace(config=c, max_chunk=1)
    port = max(max(bytes_per_step(spec, partition_of(p, i), 1, 1)) for i in range(n))
    _, predicted = group_exchange(ModelShape.uniform(c, 1.0), exchange, n, c.n_layers, True)
    assert predicted == pytest.approx(port, rel=0.01)


# Llama 2 7B in Q4_0 fits one 16 GB node: 3.8 GB a token at 10 GB/s is 380 ms on one node
SHAPE = cal.SHAPES["7B"]
FAST = DeviceFigures(gbps=10.0, layer_ms=0.05, ram_bytes=16e9, disk_gbps=1.0)
TEN_GBIT = LinkFigures(rtt_ms=0.05, mbps=1200.0)
SLOW = LinkFigures(rtt_ms=5.0, mbps=11.0)  # 100 Mbit with 5 ms of round trip (a Wi-Fi hop)


def test_fast_links_use_every_node_and_a_slow_link_fewer():
    fast = plan_for(SHAPE, (FAST,) * 4, (TEN_GBIT,) * 4, exchanges=("exact", "q8"))
    assert fast.chosen.candidate.n_nodes == 4
    slow = plan_for(SHAPE, (FAST,) * 4, (SLOW,) * 4, exchanges=("exact", "q8"))
    assert slow.chosen.candidate.n_nodes == 1  # 129 exchanges x 2.5 ms cost more than 3/4 of 380 ms
    # one slow node among fast ones: the planner leaves it out rather than let it pace every exchange
    mixed = plan_for(SHAPE, (FAST,) * 4, (TEN_GBIT,) * 3 + (SLOW,), exchanges=("exact", "q8"))
    assert mixed.chosen.candidate.stages == ((0, 1, 2),)


def test_a_model_over_one_nodes_memory_on_a_slow_link_runs_as_a_pipeline():
    small = DeviceFigures(gbps=10.0, layer_ms=0.05, ram_bytes=1.5e9, disk_gbps=0.2)
    choice = plan_for(SHAPE, (small,) * 4, (SLOW,) * 4, kinds=("tp", "pipeline", "hybrid"), exchanges=("q8",))
    # 3.7 GB: 2 stages would stream 0.4 GB each, 3 fit; a 4th stage adds a hop and saves nothing
    assert choice.chosen.candidate.kind == "pipeline" and choice.chosen.candidate.n_nodes == 3
    assert choice.chosen.stream_ms == 0
    tp1 = next(p for p in choice.ranked if p.candidate.n_nodes == 1)
    assert tp1.stream_ms > 0  # 3.8 GB over a 1.5 GB budget: 2.3 GB a token from disk


def test_never_predicted_slower_than_a_plan_with_fewer_nodes():
    rng = random.Random(20)
    for _ in range(200):
        n = rng.randint(1, 6)
        devices = tuple(DeviceFigures(gbps=rng.uniform(1, 30), layer_ms=rng.uniform(0, 0.5),
                                      ram_bytes=rng.choice([1e9, 4e9, math.inf]), disk_gbps=rng.uniform(0.05, 2))
                        for _ in range(n))
        links = tuple(LinkFigures(rtt_ms=rng.uniform(0.02, 5), mbps=rng.uniform(5, 3000),
                                  crowding=rng.choice([0, 0.15])) for _ in range(n))
        ranked = rank(SHAPE, devices, links, candidates(SHAPE, devices, ("tp", "pipeline", "hybrid"), ("exact", "q8")))
        chosen = choose(ranked)
        k = chosen.candidate.n_nodes
        assert all(chosen.total_ms <= p.total_ms for p in ranked if p.candidate.n_nodes < k)
        assert chosen.total_ms <= ranked[0].total_ms * 1.02


def test_candidates_respect_the_heads_and_the_root():
    shape = cal.SHAPES["70B"]  # 8 KV heads: tensor parallel up to 8 nodes
    devices = (FAST,) * 10
    cands = candidates(shape, devices, ("tp", "pipeline", "hybrid"), ("q8",))
    assert max(c.n_nodes for c in cands if c.kind == "tp") == 8
    assert all(0 in c.stages[0] for c in cands)
    assert {c.label for c in cands if c.kind == "hybrid" and c.n_nodes == 8} == {"hybrid 2+2+2+2 q8", "hybrid 4+4 q8"}


def test_bad_figures_and_candidates_are_named_errors():
    with pytest.raises(CostModelError):
        DeviceFigures(gbps=0)
    with pytest.raises(CostModelError):
        Candidate("tp", ((0, 0),), (32,))
    with pytest.raises(CostModelError):
        predict(SHAPE, (FAST,), (TEN_GBIT,), Candidate("tp", ((0,),), (31,)))
    assert split_layers(32, [1, 1, 2]) == (8, 8, 16)


def test_plans_of_the_scheduler_and_of_pipelines_become_candidates():
    from dllp2p.scheduler import Peer, plan

    c = config()
    ids = ["r", "a", "b"]
    p = plan(c, [Peer(i, f"{i}:1", 1, 1.0) for i in ids], 0, "weighted", exchange="q8")
    assert candidate_of(p, ids, c.n_layers) == Candidate("tp", ((0, 1, 2),), (4,), "q8")
    node = lambda i: SimpleNamespace(node_id=i)  # noqa: E731 - pipeline plans as the pipe branch shapes them
    stage = lambda l0, l1, *who: SimpleNamespace(layers=(l0, l1), plan=SimpleNamespace(nodes=[node(i) for i in who]))  # noqa: E731
    pipe = SimpleNamespace(stages=(stage(0, 1, "a"), stage(1, 4, "r")), exchange="exact")
    assert candidate_of(pipe, ids, 4) == Candidate("pipeline", ((1,), (0,)), (1, 3))
    hybrid = SimpleNamespace(stages=(stage(0, 2, "a", "b"), stage(2, 4, "r")), exchange="exact")
    assert candidate_of(hybrid, ids, 4).kind == "hybrid"
