"""This node's measured compute rate: what the scheduler weighs its share by (scheduler.with_rates).

    meter.add_step(share, compute_ms, tokens)   # a step of a plan (session thread): share = node_share
    meter.add_rate(tok_s)                       # a decode alone (the whole model: share 1)
    meter.rate                                  # whole-model decode tokens/s, median of the recent steps

Only one-token (decode) steps count, and only their compute: a TP node's time waiting for and moving
activations (tp.py's sync_ms) is left out, so a node is not blamed for a slow neighbour. A node whose
cores are busy with other programs computes more slowly, its rate falls, and the root's next plan gives
it less (service.py re-plans when the rates moved beyond scheduler.RATE_TOLERANCE). 0.0: not measured.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 32  # recent decode steps the median is over


class RateMeter:
    """Written by the thread that runs steps, read by trio (Hello, Status): deque appends are atomic."""

    def __init__(self, window: int = WINDOW):
        self._recent: deque[float] = deque(maxlen=window)

    def add_step(self, share: float, compute_ms: float, tokens: int) -> None:
        if tokens == 1 and share > 0 and compute_ms > 0:
            self._recent.append(share / (compute_ms / 1e3))

    def add_rate(self, tok_s: float) -> None:
        if tok_s > 0:
            self._recent.append(tok_s)

    @property
    def rate(self) -> float:
        recent = list(self._recent)
        return statistics.median(recent) if recent else 0.0
