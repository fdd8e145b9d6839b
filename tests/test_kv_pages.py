"""The KV caches' memory follows what their slots hold (issue 18: "the KV budget is never exceeded").

The JIT engine's KV slots take pages from the OS as rows are written (layout.lazy_zeros). A slot that comes
to hold less (a rewind, a cache entry taken over by a request that shares only its first tokens, an entry
evicted or a request cancelled: BatchCore's copy of nothing into the slot) gives the pages past what it
holds back (JITEngine._holds, layout.drop_pages), so what the caches take in memory is what the batcher's
KV budget counts, give or take a few pages a head's run. Measured with mincore(2), as tests/test_memory.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from dllp2p.engine import BatchRow
from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit.layout import drop_pages, lazy_zeros
from dllp2p.session.batcher import BatchConfig, BatchCore, Seq
from pages import PAGE, resident_bytes

# head_dim 32: a head's run takes 64 bytes a position, a page every 64 positions
SPEC = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=384, seed=5,
                      context_length=4096)


def _kv_resident(engine, slot: int | None = None) -> int:  # noqa: ANN001
    return sum(resident_bytes(c if slot is None else c[slot]) for c in engine._kv)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_llama(tmp_path_factory.mktemp("m") / "kv.gguf", SPEC))


@pytest.fixture
def make(model, tmp_path):
    from dllp2p.jit.engine import JITEngine

    engines = []

    def make_(max_seqs: int, ctx: int = 4096):
        engines.append(JITEngine(model, ctx, threads=1, cache_dir=tmp_path, max_seqs=max_seqs, max_chunk=512))
        return engines[-1]

    yield make_
    for e in engines:
        e.close()


def test_drop_pages_gives_back_whole_pages_only():
    a = lazy_zeros((4, PAGE), np.uint8)  # 4 pages
    a[...] = 7
    assert resident_bytes(a) == 4 * PAGE
    assert drop_pages(a.reshape(-1)[PAGE // 2: 3 * PAGE + 10]) == 2 * PAGE  # pages 1 and 2; 0 and 3 are shared
    assert resident_bytes(a) == 2 * PAGE
    assert np.all(a[0] == 7) and np.all(a[3] == 7) and not a[1:3].any()  # dropped pages read as zeros
    assert drop_pages(a[0, 1:10]) == 0
    with pytest.raises(ValueError, match="C-contiguous"):
        drop_pages(a[:, :8])


def test_a_slot_that_holds_less_gives_its_pages_back(make):
    """A rewind from 1000 positions to 11 leaves about a page a head's run, and the slot goes on as a fresh
    engine given the same 11 tokens would; a rewind of fewer than DROP_PAGES pages keeps them; a copy of
    nothing into a slot leaves it no page at all."""
    from dllp2p.jit.engine import DROP_PAGES

    engine, fresh = make(2), make(1)
    runs = sum(c.shape[1] for c in engine._kv)  # (layer, K or V, head) runs a slot has
    prompt = tuple(int(t) for t in np.random.default_rng(1).integers(0, SPEC.vocab_size, 1000))
    engine.forward_batch([BatchRow(0, prompt, 0)])
    per_position = engine.kv_bytes_per_position
    assert 1000 * per_position <= _kv_resident(engine, 0) <= 1000 * per_position + runs * PAGE

    got = engine.forward_batch([BatchRow(0, (7,), 10)])  # holds prompt[:10] + (7,)
    assert _kv_resident(engine, 0) <= runs * PAGE
    want = fresh.forward_batch([BatchRow(0, prompt[:10] + (7,), 0)])
    assert np.array_equal(got, want)
    for token in (9, 4, 1):  # and on, from pages it writes anew
        assert np.array_equal(engine.forward_batch([BatchRow(0, (token,), engine.seq_lengths[0])]),
                              fresh.forward_batch([BatchRow(0, (token,), fresh.seq_lengths[0])]))

    engine.forward_batch([BatchRow(1, prompt[:700], 0)])
    held = _kv_resident(engine, 1)
    back = 700 - (DROP_PAGES * PAGE // (SPEC.dim // SPEC.n_heads * 2)) + 1  # under DROP_PAGES pages a run
    engine.forward_batch([BatchRow(1, (3,), back - 1)])
    assert _kv_resident(engine, 1) == held  # too little to give back: kept
    engine.copy_prefix(1, 1, 0)
    assert _kv_resident(engine, 1) == 0 and engine.seq_lengths[1] == 0


def _drive(core: BatchCore, engine, seqs: dict[str, Seq], script, check) -> dict[str, list[int]]:  # noqa: ANN001
    """Run the core's steps on the engine, as batching.py does: at step i, submit or cancel what
    script[i] says; check() after every step. -> each sequence's generated tokens."""
    i = 0
    while True:
        for verb, name in script.get(i, ()):
            core.submit(seqs[name]) if verb == "submit" else core.cancel(seqs[name])
        step = core.plan()
        if step is None and i > max(script):
            break
        if step is not None:
            for c in step.copies:
                engine.copy_prefix(c.src, c.dst, c.n)
            logits = engine.forward_batch(step.rows)
            core.advance(step)
            for k, (seq, sample) in enumerate(zip(step.seqs, step.sample)):
                if sample:
                    core.push(seq, int(np.argmax(logits[k])))
            check()
        i += 1
    return {name: s.tokens[len(s.prompt):] for name, s in seqs.items()}


def test_the_kv_budget_bounds_the_memory_the_caches_take(make):
    """4 slots of 4096 positions, a budget of 6000: requests of ~2900 positions finish (cache entries),
    later ones evict them into slots never used before, one is cancelled mid-answer, one takes over an
    entry it shares 100 tokens with. After every step the caches hold at most the budget's bytes and a few
    pages a run and slot (before, the evicted and cancelled slots kept theirs: ~3 x 2900 positions). Every
    answer is its solo run's."""
    from dllp2p.jit.engine import DROP_PAGES

    engine = make(4)
    per_position = engine.kv_bytes_per_position
    budget = 6000
    core = BatchCore(BatchConfig(max_batch=4, queue=8, kv_budget=budget * per_position, chunk=1024), 4096,
                     per_position)
    rng = np.random.default_rng(2)
    prompts = {name: tuple(int(t) for t in rng.integers(0, SPEC.vocab_size, 2890)) for name in "abcd"}
    prompts["e"] = prompts["c"][:100] + tuple(int(t) for t in rng.integers(0, SPEC.vocab_size, 200))
    seqs = {name: Seq(k, p, 40 if name == "d" else 6, 4096) for k, (name, p) in enumerate(prompts.items())}
    script = {0: [("submit", "a")], 1: [("submit", "b")], 12: [("submit", "c")], 20: [("submit", "d")],
              26: [("cancel", "d")], 30: [("submit", "e")]}
    runs = sum(c.shape[1] for c in engine._kv)
    slack = 4 * runs * (DROP_PAGES + 1) * PAGE  # each slot's run: its last page, and a tail under DROP_PAGES
    seen = []

    def check() -> None:
        held = _kv_resident(engine)
        seen.append(held)
        assert core.reserved() <= budget
        assert held <= budget * per_position + slack, (len(seen), held >> 10, budget * per_position >> 10)

    got = _drive(core, engine, seqs, script, check)
    assert max(seen) > (budget - 400) * per_position  # the budget was nearly full at times
    assert seqs["d"].state == "gone" and 0 < seqs["d"].generated < 40
    solo = make(1)
    for name in "abce":
        want = [int(np.argmax(solo.forward_batch([BatchRow(0, prompts[name], 0)])[0]))]  # its solo run
        while len(want) < 6:
            want.append(int(np.argmax(solo.forward_batch([BatchRow(0, (want[-1],), solo.seq_lengths[0])])[0])))
        assert got[name] == want, name


def test_a_default_budget_takes_no_more_than_the_memory_holds():
    """BatchCore.set_memory: with no kv_budget, the budget is max_batch contexts or the positions the node's
    memory holds, whichever is less, but never under one context or what is reserved already."""
    core = BatchCore(BatchConfig(max_batch=4, queue=4, chunk=64), ctx=100, kv_position=10)
    assert core.budget == 400
    a, b, c = (Seq(i, (i + 1,) * 50, 40, 100) for i in range(3))  # 90 positions each
    core.submit(a)
    core.submit(b)
    core.set_memory(150)  # memory for 150 positions: 180 are reserved already
    assert core.budget == 180 and core.reserved() == 180
    core.submit(c)
    assert c.state == "queued"
    core.set_memory(50)
    assert core.budget == 180  # what is reserved stays within the budget
    core.cancel(a)
    core.cancel(b)
    core.plan()
    assert core.budget == 100 and c.state == "running"  # one context at least
    core.set_memory(10_000)
    assert core.budget == 400
    explicit = BatchCore(BatchConfig(max_batch=4, kv_budget=300 * 10), ctx=100, kv_position=10)
    explicit.set_memory(150)
    assert explicit.budget == 300  # a budget set in the config is the config's


def test_a_root_alone_sizes_its_default_budget_to_its_memory(make, monkeypatch):
    """BatchService measures the memory available as it makes its engine (admission.meminfo): where it holds
    fewer than max_batch contexts of KV, the budget (Status) is what it holds, and a request beyond it waits."""
    import trio

    from dllp2p.session import batching
    from dllp2p.session.batching import BatchService
    from dllp2p.session.checks import MEMORY_SHARE

    engine = make(4, ctx=256)
    per_position = engine.kv_bytes_per_position

    async def engine_for(ctx: int):  # noqa: ANN202
        return engine

    monkeypatch.setattr(batching, "meminfo", lambda: int(600 * per_position / MEMORY_SHARE) + 1)
    svc = BatchService(BatchConfig(max_batch=4, queue=4, chunk=256), "root-test")
    svc.attach(engine_for, None, 256, per_position)
    assert svc.serving().kv_budget == 4 * 256
    trio.run(svc._remake)
    assert svc.serving().kv_budget == 600
    first, second, third = (Seq(i, (i + 1,) * 200, 50, 256) for i in range(3))  # 250 positions each
    for seq in (first, second, third):
        svc.core.submit(seq)
    assert [s.state for s in (first, second, third)] == ["running", "running", "queued"]
