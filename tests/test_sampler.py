"""Sampler: each filter against a hand-worked distribution; seeds reproduce; greedy is argmax."""

from __future__ import annotations

import numpy as np
import pytest

from dllp2p.sampler import Sampler, SamplerConfig, apply_repeat_penalty, candidate_probs, candidate_probs_sorted

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


def _vocab_logits(rng, n, kind):
    """Logits shaped like a language model's (a few tokens far above a long tail), flat ones, ones in a
    coarse grid (many ties, also at any cut), and ones with -inf (a cluster's rows but their best)."""
    if kind == "peaked":
        x = rng.standard_normal(n) * 2.0
        x[rng.integers(0, n, 30)] += rng.uniform(5, 15, 30)
    elif kind == "flat":
        x = rng.standard_normal(n) * 0.01
    elif kind == "ties":
        x = np.round(rng.standard_normal(n) * 2.0) / 2.0
    else:
        x = np.full(n, -np.inf)
        x[rng.choice(n, 100, replace=False)] = rng.standard_normal(100)
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "inf"])
def test_fast_candidates_match_the_sorted_twin(kind):
    """candidate_probs sorts only the prefix the filters can keep; candidate_probs_sorted sorts everything.
    Same ids in the same order; the same probabilities (to the last bits where top-k is off: the normalizer
    is summed in another order)."""
    rng = np.random.default_rng(11)
    configs = [SamplerConfig(), SamplerConfig(temperature=1.0, top_k=40, top_p=1.0, min_p=0.05),
               SamplerConfig(temperature=0.3, top_k=5, top_p=0.5, min_p=0.0),
               SamplerConfig(temperature=1.5, top_k=0, top_p=0.9, min_p=0.0),
               SamplerConfig(temperature=0.7, top_k=0, top_p=1.0, min_p=0.1),
               SamplerConfig(temperature=2.0, top_k=0, top_p=0.99, min_p=0.01),
               SamplerConfig(temperature=1.0, top_k=64, top_p=0.95, min_p=0.0),
               SamplerConfig(temperature=1.0, top_k=0, top_p=1e-9, min_p=0.0)]
    for trial in range(6):
        logits = _vocab_logits(rng, 5000, kind)
        for c in configs:
            ids, p = candidate_probs(logits, c)
            ids_s, p_s = candidate_probs_sorted(logits, c)
            np.testing.assert_array_equal(ids, ids_s, err_msg=f"{kind} {c}")
            if c.top_k:
                np.testing.assert_array_equal(p, p_s)
            else:
                np.testing.assert_allclose(p, p_s, rtol=1e-12, atol=0)


def test_fast_candidates_fall_back_on_nan_and_small_vocabularies():
    logits = np.array([0.5, np.nan, 2.0, 1.0], np.float32)
    c = SamplerConfig(top_k=2)
    for a, b in zip(candidate_probs(logits, c), candidate_probs_sorted(logits, c)):
        np.testing.assert_array_equal(a, b)
    for c in (SamplerConfig(top_k=4), SamplerConfig(top_k=9)):  # top-k >= the vocabulary
        for a, b in zip(candidate_probs(LOGITS, c), candidate_probs_sorted(LOGITS, c)):
            np.testing.assert_array_equal(a, b)
    few = np.full(1000, -np.inf, np.float32)  # fewer finite logits than top-k: -inf ones fill it, by id
    few[[7, 500, 3]] = [1.0, 2.0, 1.0]
    ids, p = candidate_probs(few, SamplerConfig(top_k=5, top_p=1.0, min_p=0.0))
    assert ids.tolist() == [500, 3, 7, 0, 1] and p[3:].tolist() == [0.0, 0.0]
