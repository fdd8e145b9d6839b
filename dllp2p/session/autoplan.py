"""`--plan auto` on the root: the cluster's figures -> the planner's choice of how many nodes to use.

What the root knows when it plans (session/root.py, after the Hellos):
    itself    its daemon's measured figures (daemon/figures.py), in ClusterOptions.figures
    workers   the figures each sent in its Hello (0: not measured yet: taken as the root's); the Hello's
              round trip (sent -> answered, on the fresh link)
    links     MB/s: the latest weight push to that node when it moved at least PUSH_MIN bytes
              (RootService remembers them by node id), else DEFAULT_MBPS (Gigabit Ethernet)
The model's shape comes from its file's tensor sizes (the bytes a token reads). The candidates are
tensor-parallel plans over the first k nodes in the scheduler's own order (scheduler._choose), so the
chosen k is exactly the plan scheduler.plan(..., "weighted", max_nodes=k) makes; root.py gives that
plan the same GB/s as capacities, so the slices are the shares the model priced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..costmodel import DeviceFigures, LinkFigures, ModelShape
from ..planner import RUNNABLE, Choice, plan_for
from ..scheduler import allowed_nodes
from ..wire.reports import PlanEstimate

DEFAULT_GBPS = 5.0  # a node that measured nothing (one x86 core's matvec; daemon/figures.py measures)
DEFAULT_MBPS = 117.0  # Gigabit Ethernet's TCP payload
DEFAULT_RTT_MS = 0.2
PUSH_MIN = 1 << 20  # bytes a push must move to time the link by it


@dataclass(frozen=True)
class NodeFacts:
    """One node as the root sees it when it plans (node 0: the root)."""

    node_id: str
    capacity: float
    gbps: float = 0.0  # measured; 0: unknown
    disk_gbps: float = 0.0
    ram: int = 0  # bytes; 0: unknown
    rtt_ms: float = 0.0  # the root's Hello round trip to it (0 for the root itself)
    mbps: float = 0.0  # a timed push to it; 0: unknown
    wait_ms: float = 0.0  # its CPU wait per exchange (session/rates.py); 0: quiet or unknown


def model_shape(model: Any) -> ModelShape:
    """The bytes a token reads, from the file's tensors (a stand-in model without them: 1 byte a weight)."""
    c = model.config
    allowed = [k for k in range(1, 257) if allowed_nodes(c, k)]
    tensors = getattr(model, "tensors", None)
    if not tensors:
        return ModelShape.uniform(c, 1.0, max_nodes=max(allowed))
    layers = sum(t.nbytes for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    output = model.output_tensor().nbytes if hasattr(model, "output_tensor") else 0
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return ModelShape(c.dim, c.ffn_dim, c.n_layers, q, kv, c.vocab_size, layers / c.n_layers, output,
                      max_nodes=max(allowed))


def figures(nodes: Sequence[NodeFacts]) -> tuple[tuple[DeviceFigures, ...], tuple[LinkFigures, ...]]:
    """DeviceFigures and LinkFigures per node; unknowns as the module's docstring says."""
    root_gbps = nodes[0].gbps or DEFAULT_GBPS
    devices, links = [], []
    for n in nodes:
        gbps = n.gbps or root_gbps
        devices.append(DeviceFigures(gbps=gbps, ram_bytes=float(n.ram) if n.ram else float("inf"),
                                     disk_gbps=n.disk_gbps or 0.5, wait_ms=n.wait_ms))
        links.append(LinkFigures(rtt_ms=n.rtt_ms or DEFAULT_RTT_MS, mbps=n.mbps or DEFAULT_MBPS))
    return tuple(devices), tuple(links)


def scheduler_order(nodes: Sequence[NodeFacts]) -> list[NodeFacts]:
    """The root, then the others as scheduler._choose takes them once their capacities are the GB/s
    the model assumes (figures): fastest first, then node id."""
    devices, _ = figures(nodes)
    rest = sorted(range(1, len(nodes)), key=lambda i: (-devices[i].gbps, nodes[i].node_id))
    return [nodes[0], *(nodes[i] for i in rest)]


def choose(model: Any, nodes: Sequence[NodeFacts], exchange: str) -> tuple[Choice, list[NodeFacts]]:
    """The planner's choice over tensor-parallel plans of the first k nodes (in scheduler order)."""
    return choose_for(model_shape(model), model.config, nodes, exchange)


def choose_for(shape: ModelShape, config: Any, nodes: Sequence[NodeFacts], exchange: str) -> tuple[Choice, list[NodeFacts]]:
    """choose, for a model known by its shape and config (a root's preview before any prompt)."""
    order = scheduler_order(nodes)
    devices, links = figures(order)
    allowed = {k for k in range(1, len(order) + 1) if allowed_nodes(config, k)}
    return plan_for(shape, devices, links, RUNNABLE, (exchange,), ordered=True, allowed=allowed), order


def estimates(c: Choice, measured_ms: float) -> tuple[PlanEstimate, ...]:
    """The ranked candidates of a choice as Status reports them, fastest first; the chosen one carries the
    measured ms per decoded token of the latest request (0: none yet)."""
    return tuple(PlanEstimate(p.candidate.label, p.candidate.n_nodes, p.total_ms, p.compute_ms, p.latency_ms,
                              p.transfer_ms, p.stream_ms, measured_ms if p is c.chosen else 0.0, p is c.chosen,
                              p.candidate.kind in RUNNABLE) for p in c.ranked)
