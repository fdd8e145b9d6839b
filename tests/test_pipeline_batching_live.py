"""Pipelined requests through real daemons (issue 20): a root daemon with --cluster-batch and --plan pipeline
over one worker daemon runs a 2-stage pipeline (the worker: layer 0; the root: layer 1 and the logits) and
keeps 2 groups of requests in flight, so the worker computes one group's next step while the root computes
the other's. Concurrent greedy requests of different lengths joining at different times each get the text
they get alone through the same daemons, and the text of one node (the JIT engine in this process); one that
shares its first tokens with a running one gets them by a prefix copy on each stage (a stage's engine holds
only its layers' KV: the copy used to look for all of them, and the step failed with HTTP 500). A worker
killed while groups are in flight costs the running requests a pause, not their answers: the root goes on alone
(the KV of every running request computed again) and each gets the text of an undisturbed run, its Done
reporting the recovery, Status counting it; the next request is served without the worker. The pure grouping
and the driver: tests/test_pipelined_batching.py; the recovery's rules: tests/test_batching_recovery.py."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor


from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.generate import GenerationStats, generate
from dllp2p.sampler import Sampler, SamplerConfig
from dllp2p.tokenizer import StreamDecoder, Tokenizer
from test_batching_api import complete
from test_serve import Daemons, free_port, status, wait_members

CTX = 512  # room for requests long enough to lose the worker in the middle of
SPEC = SyntheticSpec(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, vocab_size=300, seed=11)
SHARED = [((80, 81, 82, 83, 84, 85), 200), ((80, 81, 82, 83, 90), 20)]  # the second joins while the first runs
LONG = (0, 2)  # the requests the worker dies under: their greedy runs go on for 480 tokens (the second's ends at 132)


def one_node_text(path, cache_dir, ids, steps: int) -> str:
    """Greedy text of the compiled engine alone in this process."""
    from dllp2p.jit.engine import JITEngine  # llvmlite

    model = load_model(path)
    tok = Tokenizer.from_metadata(model.metadata)
    engine = JITEngine(model, CTX, 1, cache_dir=cache_dir)
    try:
        dec = StreamDecoder(tok)
        text = "".join(dec.push(t) for t in generate(engine, list(ids), Sampler(SamplerConfig(temperature=0)), steps,
                                                     tok.eos_ids, GenerationStats()))
        return text + dec.flush()
    finally:
        engine.close()


def test_concurrent_requests_through_a_two_stage_pipeline_get_their_solo_text(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(cache_dir))  # the daemons inherit it
    path = write_random_llama(tmp_path / "random.gguf", SPEC)
    d = Daemons(tmp_path, 2, model=path)
    api_port = free_port()
    reqs = [((40, 41, 42, 43, 44), 50), ((50, 51, 52), 24), ((60, 61, 62, 63, 64, 65, 66), 40), ((70, 71), 45)]
    try:
        root = d.start(0, "--api", f"127.0.0.1:{api_port}", "--api-ctx", str(CTX), "--cluster-batch",
                       "--plan", "pipeline")
        d.start(1)
        wait_members(root, 2)
        alone = [complete(api_port, ids, steps) for ids, steps in reqs]
        with ThreadPoolExecutor(len(reqs)) as pool:  # joining 0, 4, 8, 12 ms after the first (a step: ~1 ms)
            answers = list(pool.map(lambda a: complete(api_port, *a[1], delay=0.004 * a[0]), enumerate(reqs)))
        with ThreadPoolExecutor(2) as pool:  # the second shares 4 tokens with the first, running: a prefix copy
            shared = list(pool.map(lambda a: complete(api_port, *a[1], delay=0.02 * a[0]), enumerate(SHARED)))
        with ThreadPoolExecutor(2) as pool:  # two long requests; the worker dies while they run
            long = [pool.submit(complete, api_port, ids, 480) for ids, _ in (reqs[i] for i in LONG)]
            deadline = time.monotonic() + 20
            while status(root).serving.running < 2:  # both run (480 steps: a second or more; the engine is warm)
                assert time.monotonic() < deadline and not any(f.done() for f in long), [f.result() for f in long]
                time.sleep(0.01)
            d.kill(1)
            lost = [f.result() for f in long]
        after = complete(api_port, reqs[1][0], reqs[1][1])
        recoveries = status(root).recoveries
    finally:
        d.stop_all()
    log = "".join(d.logs[0])
    assert re.search(r"on 2 nodes, \d+ generated, batched \(\d+ running\), up to 2 steps in flight", log), log
    for (ids, steps), (code, _, got), (_, _, solo) in zip(reqs, answers, alone):
        assert code == 200, json.dumps(got)
        assert got["choices"][0]["text"] == solo["choices"][0]["text"]
        assert got["usage"]["completion_tokens"] == solo["usage"]["completion_tokens"]
    for (ids, steps), (code, _, got) in zip(SHARED, shared):  # (each stage copied only the layers it holds)
        assert code == 200, json.dumps(got)
        assert got["choices"][0]["text"] == one_node_text(path, cache_dir, ids, steps)
    assert shared[1][2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 4, shared[1][2]["usage"]
    for (ids, steps), (_, _, solo) in list(zip(reqs, alone))[:2]:
        assert solo["choices"][0]["text"] == one_node_text(path, cache_dir, ids, steps)
    assert [code for code, _, _ in lost] == [200, 200], lost
    for (ids, _), (_, _, got) in zip((reqs[i] for i in LONG), lost):
        assert got["choices"][0]["text"] == one_node_text(path, cache_dir, ids, 480)
    assert recoveries == 2 and re.search(r"batched request recovered: worker \S+ \(node \S+\) lost; re-planned 2 -> 1", log), log
    assert after[0] == 200 and after[2]["choices"][0]["text"] == alone[1][2]["choices"][0]["text"], after
