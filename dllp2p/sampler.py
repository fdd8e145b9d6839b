"""Logits -> next token: repetition penalty, then greedy or temperature / top-k / top-p / min-p.

The same SamplerConfig and seed give the same tokens: all randomness comes from one numpy
Generator owned by the Sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off; drop tokens below min_p * p(best)
    repeat_penalty: float = 1.0  # 1 = off; llama.cpp's rule over the last repeat_last_n tokens
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min-p must be in [0, 1)")
        if self.top_k < 0:
            raise ValueError("top-k must be >= 0")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat penalty must be > 0")


    def best_logits(self) -> int:
        """How many of the best logits sampling reads (greedy: 1, top-k: k), 0 for all of them (no top-k,
        or a repeat penalty, which may lift a recent token from anywhere). A cluster whose workers send
        the root only that many per step (Step.top) samples exactly what it would from every logit."""
        if self.repeat_penalty != 1.0:
            return 0
        return 1 if self.temperature == 0.0 else self.top_k


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """Positive logits of recent tokens are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def candidate_probs(logits: np.ndarray, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """f32[vocab] -> (token ids, probabilities summing to 1), most likely first, after all filters: what
    candidate_probs_sorted returns (its test oracle), without sorting the whole vocabulary.

    A stable sort of 49k logits costs ~4.5 ms, more than a decode step of SmolLM2, and every sampled token
    of every stream paid it (2026-12-07: default sampling ran at 121 tok/s where greedy ran at 287). The
    filters only ever keep a prefix of that order, so only the prefix is sorted: top-k's k best; without
    top-k, the tokens min-p can keep or that reach top-p's mass, found by a threshold on the logits. The
    probabilities' normalizer over the whole vocabulary (top-k off) is summed in index order, not sorted
    order: the same values to the last bit or so. A plain temperature draw over everything, a NaN or +inf
    logit, or fewer finite logits than top-k take the sorted way."""
    n, t = len(logits), cfg.temperature
    if n == 0 or (cfg.top_k <= 0 and cfg.top_p >= 1.0 and cfg.min_p <= 0.0):
        return candidate_probs_sorted(logits, cfg)
    hi = float(np.max(logits))
    if not np.isfinite(hi):
        return candidate_probs_sorted(logits, cfg)
    if 0 < cfg.top_k < n:
        order = _best(logits, hi, cfg.top_k)
        if order is None:
            return candidate_probs_sorted(logits, cfg)
        return _cut(order, _softmax(logits, order, t), cfg)
    if cfg.top_k > 0:  # top-k covers everything: the sorted way is as cheap as any
        return candidate_probs_sorted(logits, cfg)
    e_all = np.exp(logits.astype(np.float64) / t - hi / t)  # the normalizer's terms, index order
    total = e_all.sum()
    # min-p keeps p >= min_p * p_best, i.e. logits >= hi + t * ln(min_p): a bound on the prefix (with slack);
    # top-p alone: the floor is lowered until the logits above it hold top-p's mass (counted, not sorted)
    gap = -t * np.log(cfg.min_p) + 1e-3 * (1.0 + abs(hi)) if cfg.min_p > 0.0 else t
    while cfg.min_p <= 0.0 and e_all[logits >= hi - gap].sum() < (cfg.top_p + 1e-9) * total:
        if gap > 1e30:  # the mass is where -inf logits are: nothing to gain
            return candidate_probs_sorted(logits, cfg)
        gap *= 1.5
    order = _prefix(logits, hi - gap)
    return _cut(order, e_all[order] / total, cfg)


def candidate_probs_sorted(logits: np.ndarray, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """candidate_probs the obvious way: the whole vocabulary sorted (numpy's stable order), then the filters."""
    order = np.argsort(-logits, kind="stable")
    if cfg.top_k > 0:
        order = order[: cfg.top_k]
    return _cut(order, _softmax(logits, order, cfg.temperature), cfg)


def _softmax(logits: np.ndarray, order: np.ndarray, t: float) -> np.ndarray:
    """f64 probabilities of the candidates `order` (best first) at temperature t, normalized over them."""
    z = logits[order].astype(np.float64) / t
    p = np.exp(z - z[0])
    return p / p.sum()


def _cut(order: np.ndarray, p: np.ndarray, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The top-p and min-p filters on candidates in order (p: their probabilities), renormalized."""
    if cfg.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), cfg.top_p) + 1)
        order, p = order[:keep], p[:keep]
    if cfg.min_p > 0.0:
        keep_mask = p >= cfg.min_p * p[0]
        order, p = order[keep_mask], p[keep_mask]
    return order, p / p.sum()


def _prefix(logits: np.ndarray, floor: float) -> np.ndarray:
    """The ids of logits >= floor in numpy's stable descending order: a prefix of argsort(-logits, "stable")."""
    ids = np.flatnonzero(logits >= floor)  # ascending ids: the stable sort below keeps ties in id order
    return ids[np.argsort(-logits[ids], kind="stable")]


def _best(logits: np.ndarray, hi: float, k: int) -> np.ndarray | None:
    """The first k of argsort(-logits, kind="stable") (k < len(logits), hi = the max): the ids at or above a
    floor under the max, lowered until k of them pass (then every finite one), then the k best of those,
    ties to the lowest ids. None where fewer than k logits are finite (the logits hold no NaN: hi is finite)."""
    gap = 4.0
    ids = np.flatnonzero(logits >= hi - gap)
    while len(ids) < k and gap < 64.0:  # each try is a pass (~20 us); an overshoot makes a bigger partition
        gap *= 1.5
        ids = np.flatnonzero(logits >= hi - gap)
    if len(ids) < k:
        ids = np.flatnonzero(logits > -np.inf)
        if len(ids) < k:
            return None
    vals = logits[ids]
    if len(ids) > k:
        v = np.partition(vals, len(ids) - k)[len(ids) - k]  # the k-th best value
        above = vals > v
        ties = np.flatnonzero(vals == v)[: k - int(above.sum())]
        keep = np.sort(np.concatenate([np.flatnonzero(above), ties]))
        ids, vals = ids[keep], vals[keep]
    return ids[np.argsort(-vals, kind="stable")]


class Sampler:
    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        cfg = self.cfg
        if cfg.repeat_penalty != 1.0:
            logits = apply_repeat_penalty(logits, history[-cfg.repeat_last_n :], cfg.repeat_penalty)
        if cfg.temperature == 0.0:
            return int(np.argmax(logits))
        ids, p = candidate_probs(logits, cfg)
        return int(ids[self.rng.choice(len(ids), p=p)])  # one draw of rng.random() per token

    def advance(self, n: int) -> None:
        """Move the random state past n sampled tokens without their logits (a fresh sampler resuming a
        request whose first n tokens another sampler drew: generate's `already`). Greedy draws nothing;
        otherwise every token took exactly one rng.random() (Generator.choice with p)."""
        if self.cfg.temperature != 0.0 and n > 0:
            self.rng.random(n)
