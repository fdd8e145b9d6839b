"""Pipeline and hybrid plans run (dllp2p/pipeline_node.py, jit/tp_stage.py) against the single-node JIT
engine: with the exact exchange inside every stage's group, the logits must be bit-identical, so greedy
tokens are too. Nodes run in one process (each forward in its own thread), every pair connected by a
socket pair, as tests/test_tp.py runs tensor-parallel nodes; the daemons' plumbing: test_pipeline_live.py.
"""

from __future__ import annotations


import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit.engine import JITEngine
from dllp2p.pipeline import PipelinePlan, stage_plan
from dllp2p.pipeline_node import StageNode, plan_node, plan_tensors
from dllp2p.scheduler import Peer
from dllp2p.tp import PeerLost

from test_tp import Cluster, mesh

PROMPT = [1, 504, 357, 282, 469, 314, 17, 99, 5]  # 9 tokens: chunks of 4, 4 and 1


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipe-cache")


class PipelineCluster(Cluster):
    """test_tp's Cluster (every node in a thread of this process, meshed over loopback) for any plan."""

    def __init__(self, model, plan: PipelinePlan, cache_dir, ctx: int = 64, max_chunk: int = 4, timeout: float = 20.0):
        self.plan = plan
        self.socks = mesh(plan.n_nodes, timeout)
        self.nodes = [plan_node(model.config, plan, i, plan_tensors(model, plan, i), self.socks[i], ctx, 1,
                                cache_dir=cache_dir, recv_spins=0, max_chunk=max_chunk) for i in range(plan.n_nodes)]


def _peers(n: int) -> list[Peer]:
    return [Peer(f"node{i}", f"127.0.0.1:{7000 + i}", 1, 1.0 + (i % 2) / 2) for i in range(n)]


def greedy_identical(cluster, single, prompt, steps: int, top: int = 0) -> list[int]:
    got, want = cluster.forward(prompt, 0, top), single.forward(prompt, 0)
    _same(got, want, top)
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(want)))
        got = cluster.forward([tokens[-1]], len(prompt) + i, top)
        want = single.forward([tokens[-1]], len(prompt) + i)
        _same(got, want, top, f"step {i}")
    return tokens


def _same(got, want, top, where=""):
    if not top:
        assert np.array_equal(got, want), where
        return
    best = np.argsort(-want, kind="stable")[:top]
    assert np.array_equal(got[best], want[best]), where
    assert int(np.argmax(got)) == int(np.argmax(want)), where


@pytest.fixture(scope="module")
def kv8_4layers(tmp_path_factory):
    """test_tp's random 8-KV model with 4 layers, so that 4 stages get a layer each."""
    spec = SyntheticSpec(dim=512, n_layers=4, n_heads=16, n_kv_heads=8, ffn_dim=1024, vocab_size=1024,
                         qtype=QType.Q4_0, embed_qtype=QType.Q8_0)
    return load_model(write_random_llama(tmp_path_factory.mktemp("m") / "random-kv8-4l.gguf", spec))


# node programs are compiled per stage and group position (~1 s each on a quiet core): the cases are chosen
# to cover 2, 3 and 4 nodes, middle stages, a one-node stage handing to a group (SmolLM2 below and
# test_pipeline_live.py) and a group handing to a group, with few programs
STAGES = {("pipeline", 2): [1, 1], ("pipeline", 4): [1, 1, 1, 1], ("hybrid", 4): [2, 2]}


@pytest.mark.parametrize("policy,n", list(STAGES))
def test_kv8_bit_identical(kv8_4layers, cache_dir, policy, n):
    p = stage_plan(kv8_4layers.config, _peers(n), epoch=1, policy=policy)
    assert [s.plan.n_nodes for s in p.stages] == STAGES[policy, n]
    single = JITEngine(kv8_4layers, 64, threads=1, cache_dir=cache_dir, max_chunk=4)
    cluster = PipelineCluster(kv8_4layers, p, cache_dir)
    try:
        greedy_identical(cluster, single, PROMPT, 4, top=8 if n == 4 else 0)
    finally:
        cluster.close()
        single.close()


@pytest.mark.slow
def test_smollm2_hybrid_bit_identical(real_model, cache_dir):
    """3 nodes: a one-node stage of 11 layers (capacity 1), then the root and a worker (KV heads 1 + 2;
    capacities 1 + 1.5) for 19 and the output projection (8 layers' worth: 11 : 19 + 8 is about 1 : 2.5)."""
    p = stage_plan(real_model.config, _peers(3), epoch=1, policy="hybrid")
    assert [(s.layers, s.plan.n_nodes) for s in p.stages] == [((0, 11), 1), ((11, 30), 2)]
    single = JITEngine(real_model, 64, threads=1, cache_dir=cache_dir, max_chunk=4)
    cluster = PipelineCluster(real_model, p, cache_dir)
    try:
        tokens = greedy_identical(cluster, single, [1, 504, 3575, 282, 4649, 314], 4)
        assert tokens[0] == 7042  # " Paris"
    finally:
        cluster.close()
        single.close()


def test_stage_holds_only_its_layers(kv8_4layers):
    p = stage_plan(kv8_4layers.config, _peers(2), epoch=1, policy="pipeline")
    first, last = plan_tensors(kv8_4layers, p, 1), plan_tensors(kv8_4layers, p, 0)  # node 1 is stage 0
    (a, b), (c, d) = (s.layers for s in p.stages)
    assert a == 0 and b == c and d == 4 and 0 < b < 4
    assert {n.split(".")[1] for n in first if n.startswith("blk.")} == {str(i) for i in range(b)}
    assert {n.split(".")[1] for n in last if n.startswith("blk.")} == {str(i) for i in range(b, 4)}
    assert "token_embd.weight" in first and "output.weight" not in first and "output_norm.weight" not in first
    assert "output.weight" in last and "output_norm.weight" in last and "token_embd.weight" not in last


def test_lost_stage_names_the_node(kv8_4layers, cache_dir):
    p = stage_plan(kv8_4layers.config, _peers(2), epoch=1, policy="pipeline")  # test_kv8's programs
    cluster = PipelineCluster(kv8_4layers, p, cache_dir, timeout=5.0)
    try:
        assert isinstance(cluster.nodes[0], StageNode)
        cluster.socks[1][0].close()  # stage 0 (node 1) goes away: the root, stage 1, waits on it in vain
        with pytest.raises(PeerLost) as e:
            cluster.nodes[0].forward([1, 2], 0)
        assert e.value.node == 1
    finally:
        cluster.close()
