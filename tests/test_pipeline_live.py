"""A hybrid plan through real daemons: `dllp2p daemon --plan hybrid` as root over 3 daemons on loopback makes a
2-stage plan (stage 0: one worker, layer 0; stage 1: the root and a worker, tensor-parallel, layer 1) and
generates the same text as one node (greedy), the hand-off sealed under the cluster key. The plan travels
in the Session and in Status replies (the codec's union of Plan and PipelinePlan); `status` shows each
node's layers. What a stage's node holds: tests/test_pipeline.py."""

from __future__ import annotations

import time

import fake_tp
from dllp2p.commands import status as status_view
from dllp2p.formats.synthetic import write_random_llama
from dllp2p.pipeline import PipelinePlan

from test_serve import SPEC_8KV, Daemons, dllp2p_run, status, wait_members


def test_a_root_daemon_with_the_hybrid_plan_matches_one_node(tmp_path):
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 3, model=model)
    prompt = ["--prompt", "hello there", "--steps", "8"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0, "--plan", "hybrid")
        time.sleep(0.05)
        d.start(1)
        d.start(2)
        wait_members(root, 3)
        got = dllp2p_run(*prompt, "--daemon", d.address(1), "--stats")
        assert got.stdout == want and ", 3 nodes)" in got.stderr, got.stderr
        plan = status(root).plan
        assert isinstance(plan, PipelinePlan) and plan.policy == "hybrid" and plan.n_nodes == 3
        assert [(s.layers, s.plan.n_nodes) for s in plan.stages] == [((0, 1), 1), ((1, 2), 2)]
        assert plan.nodes[0].node_id == plan.stages[-1].plan.nodes[0].node_id  # the root leads the last stage
        rows = status_view.to_json(status_view.survey(root, 2, key=fake_tp.TEST_KEY))["nodes"]
        assert sorted(tuple(r["slice"]["layers"]) for r in rows) == [(0, 1), (1, 2), (1, 2)]
    finally:
        d.stop_all()
