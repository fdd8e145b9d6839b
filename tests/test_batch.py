"""Many sequences per step (issue 18): SoloBatch, the slow twin, against separate solo engines; the JIT
engine's forward_batch against SoloBatch, bit for bit (rows joining and leaving, prompt chunks mixed with
decode tokens, rewinds, copy_prefix, ContextFull)."""

from __future__ import annotations

import numpy as np
import pytest

from dllp2p.engine import BatchRow, ContextFull, SoloBatch, kv_bytes_per_position
from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.reference import ReferenceEngine


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = SyntheticSpec(qtype=QType.Q4_0, n_kv_heads=2, n_layers=2, dim=128, n_heads=4, ffn_dim=256,
                         vocab_size=320)
    return load_model(write_random_llama(tmp_path_factory.mktemp("batch-model") / "random.gguf", spec))


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def test_solo_batch_is_solo_engines(small_model):
    """Each row's logits are what a fresh engine of its own gives; copy_prefix replays exactly."""
    make = lambda: ReferenceEngine(small_model, 32, keep_weights=True, numerics="jit")  # noqa: E731
    vocab = small_model.config.vocab_size
    a, b = _prompt(1, 7, vocab), _prompt(2, 4, vocab)
    batch = SoloBatch(make, 3)
    assert batch.kv_bytes_per_position == kv_bytes_per_position(small_model.config) == 2 * 2 * 2 * 32 * 2
    got = batch.forward_batch([BatchRow(0, tuple(a), 0), BatchRow(2, tuple(b), 0)])
    solo_a, solo_b = make(), make()
    assert np.array_equal(got[0], solo_a.forward(a, 0)) and np.array_equal(got[1], solo_b.forward(b, 0))
    got = batch.forward_batch([BatchRow(2, (5,), 4), BatchRow(0, (9,), 7)])
    assert np.array_equal(got[0], solo_b.forward([5], 4)) and np.array_equal(got[1], solo_a.forward([9], 7))
    batch.copy_prefix(0, 1, 5)  # slot 1 := a[:5], then continues differently
    got = batch.forward_batch([BatchRow(1, (3, 4), 5)])
    fresh = make()
    fresh.forward(a[:5], 0)  # the reference is not bit-identical across chunkings: chunk as the replay does
    assert np.array_equal(got[0], fresh.forward([3, 4], 5))
    with pytest.raises(ContextFull):
        batch.forward_batch([BatchRow(1, (1,) * 26, 7)])
    with pytest.raises(ValueError):
        batch.forward_batch([BatchRow(1, (1,), 8)])  # beyond the 7 positions slot 1 holds
    with pytest.raises(ValueError):
        batch.forward_batch([BatchRow(1, (1,), 0), BatchRow(1, (2,), 0)])
    batch.close()


def test_step_frames_carry_a_batch():
    """A Step's rows: (slot, start_pos, count) over the concatenated tokens; bad ones are refused on decode."""
    from dllp2p.wire.messages import Step

    step = Step(1, 0, (4, 5, 6, 7), 0, 0, rows=((3, 10, 1), (0, 0, 3)), copies=((1, 3, 10),))
    assert step.batch() == (BatchRow(3, (4,), 10), BatchRow(0, (5, 6, 7), 0))
    assert Step(1, 0, (4, 5), 9).batch() == (BatchRow(0, (4, 5), 9),)
    for rows in (((0, 0, 3),), ((0, 0, 2), (0, 5, 2)), ((1, 0, 0), (0, 0, 4)), ((-1, 0, 4),)):
        with pytest.raises(ValueError):
            Step(1, 0, (4, 5, 6, 7), 0, rows=rows)


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("batch-jit-cache")


def _script(vocab: int) -> list[list[BatchRow]]:
    """Steps of a continuous batch over 4 slots: prompts split across steps (max_chunk 8) mixed with decode
    tokens, sequences joining and leaving, a prompt past one attention span (128 positions), a rewind."""
    p = lambda seed, n: tuple(_prompt(seed, n, vocab))  # noqa: E731
    return [
        [BatchRow(0, p(10, 11), 0), BatchRow(2, p(11, 3), 0)],
        [BatchRow(2, (7,), 3), BatchRow(0, (8,), 11), BatchRow(1, p(12, 5), 0)],
        [BatchRow(1, (9,), 5), BatchRow(2, (10,), 4)],                                  # 0 pauses
        [BatchRow(3, p(13, 140), 0), BatchRow(0, (11,), 12)],                           # 3 joins, long
        [BatchRow(0, (12, 13), 4), BatchRow(3, (14,), 140), BatchRow(1, (15,), 6)],     # 0 rewinds to 4
        [BatchRow(3, (16,), 141)],
        [BatchRow(2, (17,), 5), BatchRow(3, (18,), 142), BatchRow(0, (19,), 6), BatchRow(1, (20,), 7)],
    ]


@pytest.mark.parametrize("family,threads", [("llama", 1), ("llama", 2), ("gemma3", 2), ("qwen2", 2)])
def test_jit_batch_is_solo(small_model, jit_cache, tmp_path, family, threads):
    """Every row's logits bit-identical to its sequence run alone by the single-sequence engine (gemma3:
    sliding windows of 16 positions on 2 of 3 layers, a second RoPE table, one KV head, q/k norms; qwen2: QKV
    biases, NEOX RoPE)."""
    from dllp2p.jit.engine import JITEngine
    from family_models import FAMILIES, random_model

    model = small_model if family == "llama" else random_model(tmp_path, family, FAMILIES[family])
    make = lambda **kw: JITEngine(model, 160, threads=threads, cache_dir=jit_cache, max_chunk=8, **kw)  # noqa: E731
    solo, fast = SoloBatch(make, 4), make(max_seqs=4)
    try:
        assert fast.kv_bytes_per_position == solo.kv_bytes_per_position
        kept = []  # every step's result, and a copy: a later step must not write into an earlier one's array
        for step, rows in enumerate(_script(model.config.vocab_size)):
            want, got = solo.forward_batch(rows), fast.forward_batch(rows)
            assert got.shape == (len(rows), model.config.vocab_size)
            assert np.array_equal(got, want), f"step {step}"
            kept.append((got, got.copy()))
        solo.copy_prefix(3, 1, 100)
        fast.copy_prefix(3, 1, 100)
        rows = [BatchRow(1, (21, 22), 100), BatchRow(3, (23,), 143)]
        assert np.array_equal(fast.forward_batch(rows), solo.forward_batch(rows))
        assert all(np.array_equal(got, copy) for got, copy in kept)
        with pytest.raises(ContextFull):
            fast.forward_batch([BatchRow(0, (1,), 7), BatchRow(3, (1,) * 17, 144)])
        with pytest.raises(ValueError):
            fast.copy_prefix(2, 0, 7)  # slot 2 holds 6 positions
        with pytest.raises(ValueError):
            fast.forward_batch([BatchRow(4, (1,), 0)])
    finally:
        solo.close()
        fast.close()


def test_cluster_batch_through_a_worker_daemon(small_model, jit_cache, tmp_path):
    """ClusterEngine over a worker daemon (real TP compute, the exact exchange): Step frames carry the
    batch's rows and the copy_prefix calls; every row's logits are the single node's, bit for bit."""
    import threading

    import trio

    import fake_tp
    from dllp2p.config import Timeouts
    from dllp2p.daemon import Daemon, DaemonConfig
    from dllp2p.jit.engine import JITEngine
    from dllp2p.session.root import ClusterEngine, ClusterOptions

    t = Timeouts(hello=5, idle=30, transfer=10, mesh=5, build=60, socket=30, slot=2)
    daemon = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "w", timeouts=t, cluster=fake_tp.TEST_CLUSTER,
                                 key=fake_tp.TEST_KEY, cache_dir=jit_cache))
    ready, state = threading.Event(), {}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            state["address"] = await nursery.start(daemon.serve)
            state["cancel"], state["token"] = nursery.cancel_scope.cancel, trio.lowlevel.current_trio_token()
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(10), "daemon did not start"
    single = JITEngine(small_model, 160, threads=1, cache_dir=jit_cache, max_seqs=4)
    cluster = None
    try:
        options = ClusterOptions((state["address"],), timeouts=t, cache_dir=jit_cache, key=fake_tp.TEST_KEY,
                                 max_seqs=4)
        cluster = ClusterEngine.connect(small_model, options, 160, 1)
        assert cluster.plan.n_nodes == 2 and cluster.max_seqs == 4
        for step, rows in enumerate(_script(small_model.config.vocab_size)):
            assert np.array_equal(cluster.forward_batch(rows), single.forward_batch(rows)), f"step {step}"
        for engine in (cluster, single):
            engine.copy_prefix(3, 2, 100)
        rows = [BatchRow(2, (21, 22), 100), BatchRow(0, (23,), 7)]
        got, want = cluster.forward_batch(rows, top=2), single.forward_batch(rows)
        for g, w in zip(got, want):
            best = np.argsort(-w, kind="stable")[:2]
            assert np.array_equal(g[best], w[best]) and set(np.argsort(-g, kind="stable")[:2]) == set(best)
        assert np.array_equal(cluster.forward([5], 8), single.forward_batch([BatchRow(0, (5,), 8)])[0])
        for engine in (cluster, single):  # slot 3 dropped on every node (BatchCore: an entry evicted), then new
            engine.copy_prefix(3, 3, 0)
        assert cluster._node.seq_lengths[3] == single.seq_lengths[3] == 0
        rows = [BatchRow(3, (30, 31, 32), 0)]
        assert np.array_equal(cluster.forward_batch(rows), single.forward_batch(rows))
        from dllp2p.jit.batchbench import decode_throughput  # what `bench --concurrency` runs over a cluster

        assert set(decode_throughput(cluster, [1, 4], tokens=2, prompt_len=4, rounds=1, top=1)) == {1, 4}
    finally:
        if cluster is not None:
            cluster.close()
        single.close()
        trio.from_thread.run_sync(state["cancel"], trio_token=state["token"])
        thread.join(10)


def test_decode_throughput_bench_runs(small_model, jit_cache):
    """The benchmark `bench --concurrency` calls: its figures hang together (speed itself is not tested)."""
    from dllp2p.jit.batchbench import decode_throughput, fill_memory, in_cache_steps
    from dllp2p.jit.engine import JITEngine

    engine = JITEngine(small_model, 64, threads=1, cache_dir=jit_cache, max_chunk=8, max_seqs=2)
    try:
        r = decode_throughput(engine, [1, 2], tokens=2, prompt_len=4, rounds=1)
        assert r[1]["vs_first"] == 1.0 and set(r) == {1, 2}
        for n, f in r.items():
            assert f["aggregate_tok_s"] == pytest.approx(n * f["per_stream_tok_s"]) and f["ms_per_step"] > 0
        with pytest.raises(ValueError):
            decode_throughput(engine, [3], tokens=2, prompt_len=4)  # more streams than slots
        before = engine.forward_batch([BatchRow(0, (5,), 4)])
        c = in_cache_steps(engine, [1, 2], tokens=2, prompt_len=4, rounds=1)
        assert set(c) == {1, 2} and all(f["ms_streamed"] > 0 and f["ms_in_cache"] > 0 for f in c.values())
        assert np.array_equal(engine.forward_batch([BatchRow(0, (5,), 4)]), before)  # its real weights are back
        m = fill_memory(engine, 2, 20, chunk=8)
        assert engine.seq_lengths == (20, 20) and m["kv_mb"] == 2 * 20 * engine.kv_bytes_per_position / 2**20
    finally:
        engine.close()


def test_ab_throughput_takes_turns(small_model, jit_cache):
    """batchbench --old's core on two engines (here of the same build): figures per engine and N, the paired
    ratio against the first engine, and each engine parked and restarted between turns computes as before."""
    from dllp2p.jit.batchbench import ab_throughput
    from dllp2p.jit.engine import JITEngine

    engines = {name: JITEngine(small_model, 64, threads=2, cache_dir=jit_cache, max_chunk=8, max_seqs=2)
               for name in ("old", "new")}
    try:
        r = ab_throughput(engines, [1, 2], tokens=2, prompt_len=4, rounds=2)
        assert set(r) == {"old", "new"} and all(set(f) == {1, 2} for f in r.values())
        assert r["old"][2]["vs_old"] == 1.0 and r["new"][1]["vs_first"] == 1.0 and r["new"][2]["vs_old"] > 0
        a, b = (e.forward_batch([BatchRow(0, (5,), 4), BatchRow(1, (6,), 4)]) for e in engines.values())
        assert np.array_equal(a, b)  # both engines' threads run again and agree
    finally:
        for e in engines.values():
            e.close()
