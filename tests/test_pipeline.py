"""Pipeline and hybrid plans run (dllp2p/pipeline_node.py, jit/tp_stage.py) against the single-node JIT
engine: with the exact exchange inside every stage's group, the logits must be bit-identical, so greedy
tokens are too. Nodes run in one process (each forward in its own thread), every pair connected by a
socket pair, as tests/test_tp.py runs tensor-parallel nodes; the daemons' plumbing: test_pipeline_live.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dllp2p.jit.engine import JITEngine
from dllp2p.pipeline import PipelinePlan, stage_plan
from dllp2p.pipeline_node import StageNode, plan_node, plan_tensors
from dllp2p.scheduler import Peer
from dllp2p.tp import PeerLost

from test_tp import kv8_model, mesh  # noqa: F401 - the random 8-KV model fixture

PROMPT = [1, 504, 357, 282, 469, 314, 17, 99, 5]  # 9 tokens: chunks of 4, 4 and 1


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipe-cache")


class PipelineCluster:
    def __init__(self, model, plan: PipelinePlan, cache_dir, ctx: int = 64, max_chunk: int = 4, timeout: float = 20.0):
        self.plan = plan
        self.socks = mesh(plan.n_nodes, timeout)
        self.nodes = [plan_node(model.config, plan, i, plan_tensors(model, plan, i), self.socks[i], ctx, 1,
                                cache_dir=cache_dir, recv_spins=0, max_chunk=max_chunk) for i in range(plan.n_nodes)]

    def forward(self, tokens, pos, top=0):
        out, errors = [None] * len(self.nodes), []

        def run(i):
            try:
                out[i] = self.nodes[i].forward(tokens, pos, top)
            except Exception as e:  # noqa: BLE001 - collected and re-raised by the test
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(self.nodes))]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        assert all(o is None for o in out[1:])
        return out[0]

    def close(self):
        for node in self.nodes:
            node.close()
        for row in self.socks:
            for s in row:
                if s is not None:
                    s.close()


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


@pytest.mark.parametrize("policy,n", [("pipeline", 2), ("pipeline", 3), ("hybrid", 3), ("hybrid", 4)])
def test_kv8_bit_identical(kv8_model, cache_dir, policy, n):  # noqa: F811
    # kv8_model has 2 layers: a 3-stage pipeline gets 2 (one layer each); give it 4 via its own model below
    p = stage_plan(kv8_model.config, _peers(n), epoch=1, policy=policy)
    single = JITEngine(kv8_model, 64, threads=1, cache_dir=cache_dir, max_chunk=4)
    cluster = PipelineCluster(kv8_model, p, cache_dir)
    try:
        assert [s.plan.n_nodes for s in p.stages] == {("pipeline", 2): [1, 1], ("pipeline", 3): [1, 1],
                                                      ("hybrid", 3): [1, 2], ("hybrid", 4): [2, 2]}[policy, n]
        greedy_identical(cluster, single, PROMPT, 4, top=8 if n == 4 else 0)
    finally:
        cluster.close()
        single.close()


def test_stage_holds_only_its_layers(kv8_model):  # noqa: F811
    p = stage_plan(kv8_model.config, _peers(2), epoch=1, policy="pipeline")
    first, last = plan_tensors(kv8_model, p, 1), plan_tensors(kv8_model, p, 0)  # node 1 is stage 0
    assert {n.split(".")[1] for n in first if n.startswith("blk.")} == {"0"}
    assert {n.split(".")[1] for n in last if n.startswith("blk.")} == {"1"}
    assert "token_embd.weight" in first and "output.weight" not in first and "output_norm.weight" not in first
    assert "output.weight" in last and "output_norm.weight" in last and "token_embd.weight" not in last


def test_lost_stage_names_the_node(kv8_model, cache_dir):  # noqa: F811
    p = stage_plan(kv8_model.config, _peers(2), epoch=1, policy="pipeline")
    cluster = PipelineCluster(kv8_model, p, cache_dir, timeout=5.0)
    try:
        assert isinstance(cluster.nodes[0], StageNode)
        cluster.socks[1][0].close()  # stage 0 (node 1) goes away: the root, stage 1, waits on it in vain
        with pytest.raises(PeerLost) as e:
            cluster.nodes[0].forward([1, 2], 0)
        assert e.value.node == 1
    finally:
        cluster.close()
