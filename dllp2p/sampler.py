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
    """f32[vocab] -> (token ids, probabilities summing to 1), most likely first, after all filters."""
    order = np.argsort(-logits, kind="stable")
    if cfg.top_k > 0:
        order = order[: cfg.top_k]
    z = logits[order].astype(np.float64) / cfg.temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    if cfg.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), cfg.top_p) + 1)
        order, p = order[:keep], p[:keep]
    if cfg.min_p > 0.0:
        keep_mask = p >= cfg.min_p * p[0]
        order, p = order[keep_mask], p[keep_mask]
    return order, p / p.sum()


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
