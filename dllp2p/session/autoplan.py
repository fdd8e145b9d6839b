"""`--plan auto` on the root: the cluster's figures -> the planner's choice of how many nodes to use.

What the root knows when it plans (session/root.py, after the Hellos):
    itself    its daemon's measured figures (daemon/figures.py), in ClusterOptions.figures
    workers   the figures each sent in its Hello (0: not measured yet: taken as the root's); the Hello's
              round trip (sent -> answered, on the fresh link)
    links     MB/s: the latest weight push to that node when it moved at least PUSH_MIN bytes
              (RootService remembers them by node id), else DEFAULT_MBPS (Gigabit Ethernet)
    assumed   Assume: figures a root's config (`plan_figures`) states for every node and link in place
              of the measured ones (a LAN whose latency the Hello's round trip through Python overstates;
              tests that make a loopback look like a slow LAN or small machines)
The model's shape comes from its file's tensor sizes (the bytes a token reads). The candidates:

    tp        tensor-parallel plans over the first k nodes in the scheduler's own order
              (scheduler._choose): the chosen k is exactly the plan scheduler.plan(..., "weighted",
              max_nodes=k) makes; root.py gives that plan the same GB/s as capacities, so the slices are
              the shares the model priced
    pipeline  pipeline.stage_plan's plans over the first k >= 2 nodes (one per stage, layers by GB/s)
    hybrid    stage_plan's plans of groups of g >= 2 over the first k nodes
              each priced as built (planner.candidate_of): the root's stage last, the stage split its own;
              recipe() says how root.py builds the chosen one again (pipeline.build_plan), the same plan

A pipeline or hybrid plan is chosen only when predicted planner.PIPELINE_MARGIN faster than the best
tensor-parallel one (its figures are rougher); why() says which, and against what.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..costmodel import Candidate, DeviceFigures, LinkFigures, ModelShape
from ..pipeline import stage_plan
from ..planner import PIPELINE_MARGIN, RUNNABLE, Choice, candidate_of, candidates, rank, why
from ..planner import choose as pick
from ..scheduler import Peer, PlanError, allowed_nodes
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


@dataclass(frozen=True)
class Assume:
    """Figures stated for every node (root included) in place of what was measured; 0: measured.
    ram in bytes; rtt_ms and mbps of every node's port."""

    gbps: float = 0.0
    disk_gbps: float = 0.0
    ram: int = 0
    rtt_ms: float = 0.0
    mbps: float = 0.0

    def __post_init__(self) -> None:
        if not all(x >= 0 and x == x and x != float("inf") for x in (self.gbps, self.disk_gbps, self.ram,
                                                                     self.rtt_ms, self.mbps)):
            raise ValueError(f"assumed plan figures must be finite and >= 0: {self}")

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, float]]) -> Assume:
        """From the config's plan_figures (config.PLAN_FIGURES names: ram in MiB)."""
        given = dict(pairs)
        ram = given.pop("ram_mb", 0.0)
        return cls(**given, ram=int(ram * (1 << 20)))

    def apply(self, n: NodeFacts) -> NodeFacts:
        return NodeFacts(n.node_id, n.capacity, self.gbps or n.gbps, self.disk_gbps or n.disk_gbps,
                         self.ram or n.ram, self.rtt_ms or n.rtt_ms, self.mbps or n.mbps)


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
        links.append(LinkFigures(rtt_ms=n.rtt_ms or DEFAULT_RTT_MS, mbps=n.mbps or DEFAULT_MBPS))  # root: its port
    return tuple(devices), tuple(links)


def scheduler_order(nodes: Sequence[NodeFacts]) -> list[NodeFacts]:
    """The root, then the others as scheduler._choose takes them once their capacities are the GB/s
    the model assumes (figures): fastest first, then node id."""
    devices, _ = figures(nodes)
    rest = sorted(range(1, len(nodes)), key=lambda i: (-devices[i].gbps, nodes[i].node_id))
    return [nodes[0], *(nodes[i] for i in rest)]


def choose(model: Any, nodes: Sequence[NodeFacts], exchange: str) -> tuple[Choice, list[NodeFacts]]:
    """The planner's choice over the plans of the first k nodes (in scheduler order)."""
    return choose_for(model_shape(model), model.config, nodes, exchange)


def choose_for(shape: ModelShape, config: Any, nodes: Sequence[NodeFacts], exchange: str,
               kinds: Sequence[str] = RUNNABLE) -> tuple[Choice, list[NodeFacts]]:
    """choose, for a model known by its shape and config (a root's preview before any prompt). -> the
    choice and the nodes in the order its candidates index them (node 0: the root)."""
    order = scheduler_order(nodes)
    devices, links = figures(order)
    allowed = {k for k in range(1, len(order) + 1) if allowed_nodes(config, k)}
    cands = candidates(shape, devices, ("tp",), (exchange,), ordered=True, allowed=allowed) if "tp" in kinds else []
    cands += staged_candidates(config, order, devices, exchange, kinds)
    ranked = rank(shape, devices, links, cands)
    return Choice(pick(ranked, handicap=PIPELINE_MARGIN), tuple(ranked)), order


def staged_candidates(config: Any, order: Sequence[NodeFacts], devices: Sequence[DeviceFigures], exchange: str,
                      kinds: Sequence[str] = RUNNABLE) -> list[Candidate]:
    """The pipeline and hybrid plans stage_plan makes over the first k nodes of `order` (capacities: the
    GB/s in `devices`), as Candidates indexed like `order`. Pure."""
    peers = [Peer(n.node_id, "", 1, d.gbps) for n, d in zip(order, devices)]
    ids = [n.node_id for n in order]
    out: list[Candidate] = []
    for k in range(2, len(order) + 1):
        tries = [("pipeline", 1)] if "pipeline" in kinds else []
        tries += [("hybrid", g) for g in range(2, k // 2 + 1)] if "hybrid" in kinds else []
        for policy, g in tries:
            try:
                p = stage_plan(config, peers, 0, policy, group=g, max_nodes=k, model="auto", exchange=exchange)
            except PlanError:  # more stages than layers, a group the heads cannot split
                continue
            if p.n_nodes != k:  # stage_plan keeps no more stages than layers: priced at a smaller k already
                continue
            out.append(candidate_of(p, ids, config.n_layers))
    return out


def recipe(c: Candidate) -> tuple[str, int, dict[str, int]]:
    """(policy, max_nodes, options) for pipeline.build_plan to make the plan candidate `c` priced again,
    over the same nodes with the same capacities (GB/s): "weighted" for tp; stage_plan's groups are the
    root's stage's size (the last stage; the first may be smaller)."""
    if c.kind == "tp":
        return "weighted", c.n_nodes, {}
    if c.kind == "pipeline":
        return "pipeline", c.n_nodes, {}
    return "hybrid", c.n_nodes, {"group": len(c.stages[-1])}


def reason(c: Choice) -> str:
    """planner.why of a choice: the chosen plan's predicted ms/token against the best of the other kind."""
    return why([(p.candidate.kind, p.candidate.label, p.total_ms, p is c.chosen) for p in c.ranked])


def estimates(c: Choice, measured_ms: float) -> tuple[PlanEstimate, ...]:
    """The ranked candidates of a choice as Status reports them, fastest first; the chosen one carries the
    measured ms per decoded token of the latest request (0: none yet)."""
    return tuple(PlanEstimate(p.candidate.label, p.candidate.n_nodes, p.total_ms, p.compute_ms, p.latency_ms,
                              p.transfer_ms, p.stream_ms, measured_ms if p is c.chosen else 0.0, p is c.chosen,
                              p.candidate.kind in RUNNABLE, p.candidate.kind) for p in c.ranked)
