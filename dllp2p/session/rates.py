"""This node's measured compute rate: what the scheduler weighs its share by (scheduler.with_rates).

    d0 = run_delay_ms(); ...step...; delay = run_delay_ms() - d0     # in the thread that runs the step
    meter.add_step(share, compute_ms + delay, tokens, delay, exchanges)   # a step of a plan: share =
                                                # scheduler.node_share, exchanges = costmodel.messages
    meter.add_rate(tok_s)                       # a decode alone (the whole model: share 1)
    meter.rate                                  # whole-model decode tokens/s, median of the recent steps
    meter.wait_ms                               # CPU wait per exchange (ms), median of the recent steps

Only one-token (decode) steps count, and only their compute: a TP node's time waiting for and moving
activations (tp.py's sync_ms) is left out, so a node is not blamed for a slow neighbour. But the time its
step thread was ready to run and waited for a CPU (the kernel's run_delay, /proc/thread-self/schedstat)
is added: a node whose core another program keeps busy loses little compute time in a step as short as a
decode's (the scheduler favours a thread that slept), it loses it in waking up for each exchange, which
the others see as their sync time. (A wait inside the compute is counted twice: a busy node looks a
little slower than it is.) Its rate falls, and the root's next plan gives it less (service.py re-plans
when the rates moved beyond scheduler.RATE_TOLERANCE). 0.0: not measured.

A smaller share does not cure that wait: each of a token's ~120 exchanges waits for the node's next turn
on its CPU whatever its share. So the run delay is kept apart too, per exchange of the step (wait_ms): the
cost model prices it as latency per exchange of every plan that includes the node (costmodel.DeviceFigures
.wait_ms), and the root leaves a node out while that costs more than its share saves (planner.busy_out,
session/busy.py). The median over steps of each step's mean wait per exchange: a step's exchanges mostly
wake at once and a few wait a time slice, so the mean within a step, the median across steps.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from ..costmodel import messages
from ..pipeline import plan_share

WINDOW = 32  # recent decode steps the median is over


def run_delay_ms() -> float:
    """Milliseconds the calling thread has spent ready to run but waiting for a CPU, since it started
    (Linux schedstat); 0.0 where the kernel does not tell."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def plan_exchanges(p: Any, index: int, n_layers: int) -> int:
    """The exchanges node `index` takes part in per decode token of plan p (a scheduler Plan: its group's
    messages; a pipeline plan: its stage's, plus the hand-overs to and from it)."""
    if not hasattr(p, "stages"):
        return messages(p.exchange, p.n_nodes, n_layers)
    k, _ = p.locate(index)
    l0, l1 = p.stages[k].layers
    return messages(p.exchange, p.stages[k].plan.n_nodes, l1 - l0, k == len(p.stages) - 1) + 2


class RateMeter:
    """Written by the thread that runs steps, read by trio (Hello, Status): deque appends are atomic."""

    def __init__(self, window: int = WINDOW):
        self._recent: deque[float] = deque(maxlen=window)
        self._waits: deque[float] = deque(maxlen=window)  # ms of CPU wait per exchange of recent decode steps

    def add_step(self, share: float, compute_ms: float, tokens: int, wait_ms: float = 0.0, exchanges: int = 0) -> None:
        """compute_ms: the step's compute, its CPU wait (wait_ms) included; exchanges: the step's (0: alone)."""
        if tokens == 1 and share > 0 and compute_ms > 0:
            self._recent.append(share / (compute_ms / 1e3))
            if exchanges > 0 and wait_ms >= 0:
                self._waits.append(wait_ms / exchanges)

    def add_plan_steps(self, steps: Any, plan: Any, n_layers: int) -> None:
        """A cluster root's steps (cluster_stats.StepStats) of `plan`: each one's compute, not its exchanges'
        waits but its waits for a CPU, for the root's share of the plan."""
        share, exchanges = plan_share(plan, 0, n_layers), plan_exchanges(plan, 0, n_layers)
        for st in steps:
            self.add_step(share, st.step_ms - st.sync_ms + st.delay_ms, st.tokens, st.delay_ms, exchanges)

    def add_rate(self, tok_s: float) -> None:
        if tok_s > 0:
            self._recent.append(tok_s)

    @property
    def rate(self) -> float:
        recent = list(self._recent)
        return statistics.median(recent) if recent else 0.0

    @property
    def wait_ms(self) -> float:
        """ms a CPU was waited for per exchange, median of the recent decode steps of plans with exchanges."""
        waits = list(self._waits)
        return statistics.median(waits) if waits else 0.0


def batched_step(meter: RateMeter, engine: Any, rows: Any, seconds: float, plan: Any, n_layers: int) -> None:
    """A root's batched step (session/batching.py) of `rows` that took `seconds`. A decode step of one row counts
    as the prompt slot's decode steps do (service.py's _measure): a cluster engine's per-step figures (plan: its
    plan), else the step's time as the whole model's rate; steps of several rows or tokens do not. A cluster
    engine's figures are taken (its stats.steps emptied): a batcher's engine lives as long as requests come."""
    steps = getattr(getattr(engine, "stats", None), "steps", None)
    taken = list(steps) if isinstance(steps, list) else []
    if isinstance(steps, list):
        steps.clear()
    if len(rows) != 1 or len(rows[0].tokens) != 1:
        return
    if not isinstance(steps, list):
        meter.add_rate(1 / seconds if seconds > 0 else 0.0)
    elif plan is not None:
        meter.add_plan_steps(taken, plan, n_layers)
