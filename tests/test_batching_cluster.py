"""Concurrent API requests through 2 daemons (issue 18). By default a root with a worker serves them one at
a time through its prompt slot (the path that recovers a lost worker mid-request); with --cluster-batch it
batches them over the tensor-parallel cluster (ClusterEngine.forward_batch, every node holding max_batch
KV slots). Either way each request gets the greedy text it gets when sent alone to the same daemons, and a
worker killed under batched requests costs them a pause, not their answers. A random-weight model keeps the
weight push and the compile small."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from test_batching_api import complete
from test_serve import Daemons, free_port, wait_members

CTX = 64
SPEC = SyntheticSpec(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, vocab_size=300, seed=11)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The daemons' compiled programs and packed weights: this module's own, shared by its tests."""
    return tmp_path_factory.mktemp("batching-cluster-cache")


@pytest.mark.parametrize("batched", [False, True], ids=["in-turn", "cluster-batch"])
def test_concurrent_requests_through_two_daemons_get_their_solo_text(tmp_path, batched, cache_dir, monkeypatch):
    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(cache_dir))  # the daemons inherit it
    path = write_random_llama(tmp_path / "random.gguf", SPEC)
    d = Daemons(tmp_path, 2, model=path)
    api_port = free_port()
    try:
        root = d.start(0, "--api", f"127.0.0.1:{api_port}", "--api-ctx", str(CTX), *(["--cluster-batch"] if batched else []))
        d.start(1)
        wait_members(root, 2)
        reqs = [((40, 41, 42, 43, 44), 12), ((50, 51, 52), 6), ((60, 61, 62, 63, 64, 65, 66), 9)]
        alone = [complete(api_port, ids, steps) for ids, steps in reqs]
        with ThreadPoolExecutor(len(reqs)) as pool:
            answers = list(pool.map(lambda r: complete(api_port, r[0], r[1]), reqs))
    finally:
        d.stop_all()
    assert any("on 2 nodes" in line for line in d.logs[0]), "".join(d.logs[0])
    assert any(re.search(r"on 2 nodes, \d+ generated, batched \([1-9]", line) for line in d.logs[0]) == batched
    for (status, _, got), (_, _, solo) in zip(answers, alone):
        assert status == 200, json.dumps(got)
        assert got["choices"][0]["text"] == solo["choices"][0]["text"]
        assert got["usage"]["completion_tokens"] == solo["usage"]["completion_tokens"]  # (cached_tokens may differ:
        # the solo runs left their prompts in the batcher's prefix cache)


def test_2_4_and_8_requests_joining_and_leaving_at_different_times_through_two_daemons(tmp_path, cache_dir,
                                                                                      monkeypatch):
    """--cluster-batch over a tensor-parallel pair: 2, 4 and 8 concurrent API requests of different prompt and
    answer lengths, joining 4 ms apart (so they join and leave a running batch at different steps), each get the
    greedy text of the same request sent alone, and of one node (the JIT engine in this process)."""
    from test_pipeline_batching_live import CTX as LONG_CTX, one_node_text

    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(cache_dir))
    path = write_random_llama(tmp_path / "random.gguf", SPEC)
    d = Daemons(tmp_path, 2, model=path)
    api_port = free_port()
    reqs = [(tuple(range(30 + 7 * i, 33 + 8 * i)), 5 + 4 * i) for i in range(8)]  # prompts of 3-10 ids, 5-33 tokens
    got: dict[int, list] = {}
    try:
        root = d.start(0, "--api", f"127.0.0.1:{api_port}", "--api-ctx", str(LONG_CTX), "--cluster-batch")
        d.start(1)
        wait_members(root, 2)
        alone = [complete(api_port, ids, steps) for ids, steps in reqs]
        for n in (2, 4, 8):
            with ThreadPoolExecutor(n) as pool:
                got[n] = list(pool.map(lambda a: complete(api_port, *a[1], delay=0.004 * a[0]), enumerate(reqs[:n])))
    finally:
        d.stop_all()
    log = "".join(d.logs[0])
    assert re.search(r"on 2 nodes, \d+ generated, batched \([2-7] running\)", log), log
    for (ids, steps), (code, _, solo) in zip(reqs, alone):
        assert code == 200 and solo["choices"][0]["text"] == one_node_text(path, cache_dir, ids, steps)
    for n, answers in got.items():
        for (code, _, answer), (_, _, solo) in zip(answers, alone):
            assert code == 200, (n, answer)
            assert answer["choices"][0]["text"] == solo["choices"][0]["text"], n
            assert answer["usage"]["completion_tokens"] == solo["usage"]["completion_tokens"], n

def test_a_worker_killed_under_batched_requests_costs_a_pause_not_the_answers(tmp_path, cache_dir, monkeypatch):
    """--cluster-batch over a tensor-parallel pair: the worker is killed (-9) while two long greedy requests run
    together; the root goes on alone, computing each running request's KV again, and each gets the text of one
    node (the same as an undisturbed run: tensor parallelism is bit-identical to one node); Status counts the
    two recoveries, and the next request is served by the root alone."""
    from test_pipeline_batching_live import CTX as LONG_CTX, LONG, SPEC as LONG_SPEC, one_node_text
    from test_serve import status

    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(cache_dir))
    path = write_random_llama(tmp_path / "random.gguf", LONG_SPEC)
    reqs = [(40, 41, 42, 43, 44), (50, 51, 52), (60, 61, 62, 63, 64, 65, 66)]
    d = Daemons(tmp_path, 2, model=path)
    api_port = free_port()
    try:
        root = d.start(0, "--api", f"127.0.0.1:{api_port}", "--api-ctx", str(LONG_CTX), "--cluster-batch")
        d.start(1)
        wait_members(root, 2)
        with ThreadPoolExecutor(2) as pool:
            long = [pool.submit(complete, api_port, reqs[i], 480) for i in LONG]
            deadline = time.monotonic() + 20
            while status(root).serving.batch < 2:  # both in a step: the engine is made, they generate
                assert time.monotonic() < deadline and not any(f.done() for f in long), [f.result() for f in long]
                time.sleep(0.01)
            d.kill(1)
            answers = [f.result() for f in long]
        after = complete(api_port, reqs[1], 20)
        recoveries = status(root).recoveries
    finally:
        d.stop_all()
    log = "".join(d.logs[0])
    assert [code for code, _, _ in answers] == [200, 200], (answers, log)
    for i, (_, _, got) in zip(LONG, answers):
        assert got["choices"][0]["text"] == one_node_text(path, cache_dir, reqs[i], 480)
    assert recoveries == 2, log
    assert re.search(r"batched request recovered: worker \S+ \(node \S+\) lost; re-planned 2 -> 1 nodes", log), log
    assert after[0] == 200 and after[2]["choices"][0]["text"] == one_node_text(path, cache_dir, reqs[1], 20)
