"""Sampler: each filter against a hand-worked distribution; seeds reproduce; greedy is argmax."""

from __future__ import annotations

import numpy as np
import pytest

from dllp2p.sampler import Sampler, SamplerConfig, apply_repeat_penalty, candidate_probs

LOGITS = np.log(np.array([0.05, 0.5, 0.2, 0.15, 0.1], dtype=np.float64)).astype(np.float32)


def cfg(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    return SamplerConfig(**{**base, **kw})


def test_no_filters_keeps_the_softmax():
    ids, p = candidate_probs(LOGITS, cfg())
    assert ids.tolist() == [1, 2, 3, 4, 0]
    np.testing.assert_allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-6)


def test_top_k():
    ids, p = candidate_probs(LOGITS, cfg(top_k=2))
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7], rtol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    ids, _ = candidate_probs(LOGITS, cfg(top_p=0.7))  # 0.5 + 0.2 reaches 0.7
    assert ids.tolist() == [1, 2]
    ids, _ = candidate_probs(LOGITS, cfg(top_p=0.71))
    assert ids.tolist() == [1, 2, 3]


def test_min_p():
    ids, _ = candidate_probs(LOGITS, cfg(min_p=0.29))  # keep p >= 0.145
    assert ids.tolist() == [1, 2, 3]
    ids, _ = candidate_probs(LOGITS, cfg(min_p=0.31))  # keep p >= 0.155
    assert ids.tolist() == [1, 2]


def test_temperature_sharpens():
    _, p1 = candidate_probs(LOGITS, cfg(temperature=1.0))
    _, p05 = candidate_probs(LOGITS, cfg(temperature=0.5))
    assert p05[0] > p1[0]
    np.testing.assert_allclose(p05, np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2 / np.sum(np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2), rtol=1e-5)


def test_greedy_is_argmax_and_ignores_seed():
    assert Sampler(SamplerConfig(temperature=0, seed=1))(LOGITS) == 1
    assert Sampler(SamplerConfig(temperature=0, seed=2))(LOGITS) == 1


def test_same_seed_same_tokens_other_seed_differs():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(1000).astype(np.float32) for _ in range(50)]
    run = lambda seed: [Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))(l) for l in logits]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_frequencies_follow_the_distribution():
    s = Sampler(cfg(seed=3))
    counts = np.bincount([s(LOGITS) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.5, 0.2, 0.15, 0.1], atol=0.03)


def test_repeat_penalty():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    assert Sampler(SamplerConfig(temperature=0, repeat_penalty=3.0))(logits, [0]) == 2


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1.0), dict(top_k=-1), dict(repeat_penalty=0)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplerConfig(**bad)
