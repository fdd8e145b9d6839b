"""This node's measured compute rate: what the scheduler weighs its share by (scheduler.with_rates).

    d0 = run_delay_ms(); ...step...; delay = run_delay_ms() - d0     # in the thread that runs the step
    meter.add_step(share, compute_ms + delay, tokens)   # a step of a plan: share = scheduler.node_share
    meter.add_rate(tok_s)                       # a decode alone (the whole model: share 1)
    meter.rate                                  # whole-model decode tokens/s, median of the recent steps

Only one-token (decode) steps count, and only their compute: a TP node's time waiting for and moving
activations (tp.py's sync_ms) is left out, so a node is not blamed for a slow neighbour. But the time its
step thread was ready to run and waited for a CPU (the kernel's run_delay, /proc/thread-self/schedstat)
is added: a node whose core another program keeps busy loses little compute time in a step as short as a
decode's (the scheduler favours a thread that slept), it loses it in waking up for each exchange, which
the others see as their sync time. (A wait inside the compute is counted twice: a busy node looks a
little slower than it is.) Its rate falls, and the root's next plan gives it less (service.py re-plans
when the rates moved beyond scheduler.RATE_TOLERANCE). 0.0: not measured.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 32  # recent decode steps the median is over


def run_delay_ms() -> float:
    """Milliseconds the calling thread has spent ready to run but waiting for a CPU, since it started
    (Linux schedstat); 0.0 where the kernel does not tell."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


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
