"""The root's record of workers left out while their CPU is busy (issue 19), and when to try them again.

A node that shares its core with another program stalls every exchange of a token until its next turn on
that CPU, whatever its share of the work: a smaller share (the weighted re-plan) does not help, leaving it
out does. Each node reports its CPU wait per exchange (session/rates.py, in Status); before each request
the root (service.py) asks `BusyNodes.judge`, which prices the plan with the waits (planner.busy_out, pure)
and answers the workers to plan without now, each with why ("CPU wait 3.1 ms per token") and until when.

A node left out computes nothing, so its wait is not measured again (nor the root's, alone); it is tried
again after BASE_S: planned in with the request then, and nothing is judged until TRIAL_S later, when the
waits reported come from its steps (and the root's) in that plan. Still busy, it is left out for twice as
long (up to MAX_S); quiet, it stays. A node on trial is judged with planner.BACK_MARGIN, one that is in
with OUT_MARGIN: no flapping.

    busy = BusyNodes()
    left = busy.judge(shape, exchange, root, workers, now)   # -> [Left(node_id, address, reason, until)]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

from ..costmodel import DeviceFigures, LinkFigures, ModelShape
from ..planner import busy_out
from .autoplan import DEFAULT_MBPS, DEFAULT_RTT_MS

log = logging.getLogger("dllp2p.daemon")

BASE_S = 30.0  # a node left out is tried again after this, then after twice as long each time it is still busy
MAX_S = 600.0
TRIAL_S = 5.0  # a node tried again is judged anew this long after (its Status polls, every 2 s, carry the waits
# its steps in the plan measured; the root's own wait is measured anew by the same steps)


@dataclass(frozen=True)
class Polled:
    """A node as the root knows it from its Status polls (the root itself: its own meter, address "")."""

    node_id: str
    address: str
    rate: float  # whole-model decode tokens/s (RateMeter.rate); 0: not measured
    wait_ms: float  # CPU wait per exchange (RateMeter.wait_ms)
    rtt_ms: float = 0.0  # the poll's round trip; 0: unknown
    mbps: float = 0.0  # a timed push to it; 0: unknown


@dataclass(frozen=True)
class Left:
    """A worker the root plans without until `until` (unix seconds), and why."""

    node_id: str
    address: str
    reason: str
    until: float


@dataclass(frozen=True)
class _Out:
    left: Left
    backoff: float  # seconds it was left out for this time
    since: float = 0.0  # on trial: when it was planned again


class BusyNodes:
    """State across requests (the root's RootService holds one); the decision itself is planner.busy_out."""

    def __init__(self, base_s: float = BASE_S, max_s: float = MAX_S, trial_s: float = TRIAL_S):
        self.base_s, self.max_s, self.trial_s = base_s, max_s, trial_s
        self.out: dict[str, _Out] = {}  # node id -> left out until .left.until
        self.trial: dict[str, _Out] = {}  # node id -> planned again after its time out, not judged yet

    def judge(self, shape: ModelShape, exchange: str, root: Polled, workers: Sequence[Polled], now: float,
              max_nodes: int | None = None) -> list[Left]:
        """The workers to plan without now. Nothing is judged unless every node in the plan has a rate (a
        node's speed is its rate: GB/s = rate x the model's bytes per token), nor while a node tried again
        has not run for trial_s (the waits the root has of it, and its own, are from before)."""
        for node_id, o in list(self.out.items()):
            if now >= o.left.until:  # its time is up: planned again, judged once it has measured anew
                del self.out[node_id]
                self.trial[node_id] = replace(o, since=now)
                log.info("%s (node %s) is planned again after %.0f s left out (%s)", o.left.address, node_id,
                         o.backoff, o.left.reason)
        here = {w.node_id for w in workers}
        self.trial = {k: o for k, o in self.trial.items() if k in here}
        nodes = [root, *(w for w in workers if w.node_id not in self.out)]
        trying = any(now < o.since + self.trial_s for o in self.trial.values())
        if len(nodes) > 1 and all(n.rate > 0 for n in nodes) and not trying:
            devices = [DeviceFigures(n.rate * shape.weight_bytes / 1e9, wait_ms=n.wait_ms) for n in nodes]
            links = [LinkFigures(n.rtt_ms or DEFAULT_RTT_MS, n.mbps or DEFAULT_MBPS) for n in nodes]
            links[0] = LinkFigures(0.0, links[0].mbps)
            was = {i for i, n in enumerate(nodes) if n.node_id in self.trial}
            left = busy_out(shape, devices, links, exchange, out=was, max_nodes=max_nodes)
            for i, n in enumerate(nodes):
                if i in left:
                    self._leave_out(n, left[i], now)
                elif n.node_id in self.trial:
                    log.info("%s (node %s) is back in the plan: its CPU wait is %.0f us per exchange now", n.address,
                             n.node_id, n.wait_ms * 1e3)
                    del self.trial[n.node_id]
        return [o.left for o in self.out.values() if o.left.address in {w.address for w in workers}]

    def _leave_out(self, n: Polled, per_token_ms: float, now: float) -> None:
        before = self.trial.pop(n.node_id, None)
        backoff = min(before.backoff * 2, self.max_s) if before else self.base_s
        reason = f"CPU wait {per_token_ms:.1f} ms per token"
        self.out[n.node_id] = _Out(Left(n.node_id, n.address, reason, now + backoff), backoff)
        log.warning("%s (node %s) left out of the plan: %s with it (its own: %.0f us at each exchange; another "
                    "program holds a CPU), more than its share of the work saves; tried again in %.0f s", n.address,
                    n.node_id, reason, n.wait_ms * 1e3, backoff)
