"""`--plan auto` at run time: the figures on the wire (Hello, Status), the root's choice over live workers
(fake compute), a machine's measured figures, and `dllp2p plan` against live daemons (one real prompt)."""

from __future__ import annotations

import json
import subprocess
import time

import msgpack
import pytest

import fake_tp
from dllp2p import wire as P
from dllp2p.commands import plan as plan_command
from dllp2p.daemon import figures
from dllp2p.scheduler import Peer, plan
from dllp2p.session import autoplan
from dllp2p.wire.codec import HEADER, MAGIC, MsgType, decode_body, encode


def test_hello_figures_round_trip_and_an_older_hello_decodes_without_them():
    h = P.Hello(P.PROTOCOL_VERSION, "w1", "worker", 2, 2.0, gbps=7.5, disk_gbps=0.4, ram=3 << 30)
    assert decode_body(MsgType.HELLO, encode(h)[HEADER.size:]) == h
    old = {"protocol_version": P.PROTOCOL_VERSION, "node_id": "w1", "role": "worker", "threads": 2, "capacity": 2.0,
           "cache_keys": []}
    assert decode_body(MsgType.HELLO, msgpack.packb(old)).gbps == 0.0
    with pytest.raises(ValueError):
        P.Hello(P.PROTOCOL_VERSION, "w1", "worker", 2, 2.0, gbps=float("nan"))
    assert MAGIC  # the frame header is the codec's


def test_autoplan_choice_is_the_plan_the_scheduler_makes():
    """The chosen k over nodes in scheduler order gives exactly scheduler.plan(weighted, max_nodes=k)."""
    model = fake_tp.model()
    fast_link = dict(rtt_ms=0.01, mbps=5000.0)
    facts = [autoplan.NodeFacts("root", 1.0, gbps=1.0),  # declared capacities (threads) disagree with GB/s
             autoplan.NodeFacts("b", 5.0, gbps=1.0, **fast_link), autoplan.NodeFacts("a", 1.0, gbps=3.0, **fast_link)]
    choice, order = autoplan.choose(model, facts, "exact")
    assert [n.node_id for n in order] == ["root", "a", "b"]  # GB/s, then node id: scheduler._choose
    k = choice.chosen.candidate.n_nodes
    peers = [Peer(n.node_id, f"h{i}:1", 1, n.gbps) for i, n in enumerate(facts)]  # root.py: capacity = GB/s
    p = plan(model.config, peers, 0, "weighted", max_nodes=k)
    assert [n.node_id for n in p.nodes] == [n.node_id for n in order[:k]]
    # a link 1000x slower per exchange: the root alone
    slow = [facts[0]] + [autoplan.NodeFacts(n.node_id, n.capacity, n.gbps, rtt_ms=50.0, mbps=1.0) for n in facts[1:]]
    assert autoplan.choose(model, slow, "exact")[0].chosen.candidate.n_nodes == 1


def test_a_root_with_plan_auto_over_live_workers(tmp_path):
    """ClusterEngine with policy "auto" over two worker daemons (fake compute): the Hellos' round trips
    are timed, the choice is kept on the engine and the plan has the chosen node count."""
    from test_cluster import DaemonThread, connect, generate

    ds = [DaemonThread(tmp_path / f"w{i}") for i in range(2)]
    try:
        e = connect([d.address for d in ds], policy="auto")
        assert e.choice is not None and e.plan.n_nodes == e.choice.chosen.candidate.n_nodes
        assert e.plan.policy == "weighted"  # fake compute, no memory limit: a pipeline never beats one node
        # tp over 1, 2, 3 nodes; a pipeline of 2 (the model's 2 layers allow no more stages)
        assert sorted(p.candidate.label for p in e.choice.ranked) == ["pipeline 1+1", "tp 1 exact", "tp 2 exact",
                                                                      "tp 3 exact"]
        generate(e, fake_tp.model(), steps=2)
        e.close()
    finally:
        for d in ds:
            d.stop()


def test_measured_figures_are_cached(tmp_path):
    """Measured in a child process (as a daemon does), then read back from the cache; measured again
    once the cache is older than MAX_AGE_S."""
    import sys

    assert figures.cached(1, tmp_path / "cache", tmp_path / "state") is None
    out = subprocess.run([sys.executable, "-m", "dllp2p.daemon.figures", "--threads", "1", "--state-dir",
                          str(tmp_path / "state"), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    m = figures.Measured(**json.loads(out))
    assert m.gbps > 0 and m.disk_gbps > 0 and m.ram > 0
    again = figures.cached(1, tmp_path / "cache", tmp_path / "state")
    assert again is not None and (again.gbps, again.at) == (m.gbps, m.at)
    assert figures.cached(2, tmp_path / "cache", tmp_path / "state") is None  # another thread count
    later = figures.measure(1, tmp_path / "cache", tmp_path / "state", now=m.at + figures.MAX_AGE_S + 1)
    assert later.at > m.at


def test_a_corrupt_figures_file_is_measured_again_not_believed(tmp_path):
    """Figures the planner would weigh nodes by: a file with NaN, Infinity, a negative, a string or a bool in
    place of a number is no cache hit (measured again), nor is a file that is not JSON; a sound one is."""
    good = {"gbps": 7.5, "disk_gbps": 0.4, "ram": 1, "threads": 1, "cpu": figures.cpu_name(), "at": 1000.0}
    path = tmp_path / figures.FILE
    for field, bad in (("gbps", "NaN"), ("gbps", "Infinity"), ("disk_gbps", "-Infinity"), ("disk_gbps", "-1"),
                       ("gbps", '"7.5"'), ("disk_gbps", "true"), ("at", "NaN")):
        text = json.dumps(good).replace(f'"{field}": {json.dumps(good[field])}', f'"{field}": {bad}')
        assert bad in text
        path.write_text(text)
        assert figures.cached(1, None, tmp_path, now=2000.0) is None, (field, bad)
    path.write_text(json.dumps(good)[:-5])
    assert figures.cached(1, None, tmp_path, now=2000.0) is None
    path.write_text(json.dumps(good))
    hit = figures.cached(1, None, tmp_path, now=2000.0)
    assert hit is not None and (hit.gbps, hit.disk_gbps) == (7.5, 0.4)


def test_plan_command_renders_what_a_root_reports():
    est = [P.PlanEstimate("tp 2 exact", 2, 10.0, 6.0, 3.0, 1.0, 0.0, 11.0, True, True),
           P.PlanEstimate("tp 1 exact", 1, 12.0, 12.0, 0.0, 0.0, 0.0, 0.0, False, True),
           P.PlanEstimate("pipeline 1+1", 2, float("inf"), 12.0, 0.1, 0.0, 0.0, 0.0, False, False)]
    reply = P.StatusReply(0, "root-1", (), None, None, 0, plans=tuple(est))
    assert decode_body(MsgType.STATUS_REPLY, encode(reply)[HEADER.size:]) == reply
    doc = plan_command.to_json(reply, {"root-1": {"gbps": 7.0, "disk_gbps": 0.5, "ram_available": 8e9}})
    text = plan_command.render(doc, explain=True)
    assert "* tp 2 exact" in text and "11.0" in text and "does not fit" in text and "(priced only)" in text
    assert "7.0 GB/s" in text
    assert plan_command.render({"root": "r", "plans": []}) == plan_command.NO_PLANS


@pytest.mark.slow
def test_plan_command_against_live_daemons(tmp_path):
    """Two `dllp2p daemon` processes, the root with --plan auto and a random 8-KV-head model: `dllp2p plan
    --json` previews the candidates before any prompt; after one prompt (its text equal to one node's) it
    lists those the root priced, the chosen one with its measured ms/token and the plan the root ran, and
    every node's measured figures."""
    from test_serve import CLI, KEY_FILE, ROOT_DIR, SPEC_8KV, Daemons, dllp2p_run, status, wait_members
    from dllp2p.formats.synthetic import write_random_llama

    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 2, model=model)
    prompt = ["--prompt", "hello there"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0, "--plan", "auto")
        time.sleep(0.05)
        d.start(1, "--plan", "auto")
        wait_members(root, 2)
        deadline = time.monotonic() + 30  # both measure their figures once at start (a second or two)
        while not all(status(a).resources.gbps > 0 for a in (root, d.address(1))):
            assert time.monotonic() < deadline, "a daemon did not measure its figures"
            time.sleep(0.3)
        port = root.rsplit(":", 1)[1]

        def plans() -> dict:
            p = subprocess.run([*CLI, "plan", "--port", port, "--json", "--key-file", KEY_FILE], capture_output=True,
                               text=True, timeout=30, cwd=ROOT_DIR)
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout)

        preview = plans()  # before any prompt: predicted from the figures and the polls' round trips
        assert {x["label"] for x in preview["plans"]} == {"tp 1 exact", "tp 2 exact", "pipeline 1+1"}
        assert all(x["measured_ms"] == 0 for x in preview["plans"]) and sum(x["chosen"] for x in preview["plans"]) == 1
        assert dllp2p_run(*prompt, "--daemon", d.address(1)).stdout == want
        doc = plans()
        chosen = [x for x in doc["plans"] if x["chosen"]]
        assert len(chosen) == 1 and chosen[0]["measured_ms"] > 0
        assert chosen[0]["nodes"] == status(root).plan.n_nodes
        assert {x["label"] for x in doc["plans"]} == {"tp 1 exact", "tp 2 exact", "pipeline 1+1"}
        assert doc["why"].startswith(f"chose {chosen[0]['label']}: predicted "), doc
        fewer = [x["predicted_ms"] for x in doc["plans"] if x["nodes"] < chosen[0]["nodes"]]
        assert all(chosen[0]["predicted_ms"] <= f for f in fewer)
        assert len(doc["figures"]) == 2 and all(f["gbps"] > 0 for f in doc["figures"].values())
        text = subprocess.run([*CLI, "plan", "--port", port, "--explain", "--key-file", KEY_FILE],
                              capture_output=True, text=True, timeout=30, cwd=ROOT_DIR).stdout
        assert "* tp " in text and "GB/s of weights" in text, text
    finally:
        d.stop_all()
