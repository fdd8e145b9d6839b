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
