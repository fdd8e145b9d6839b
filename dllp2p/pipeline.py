"""Pure scheduling of pipeline and hybrid plans: contiguous layer ranges, each run by one stage.

A stage is one node or a tensor-parallel group: today's Plan (scheduler.py) for all of the model's
heads and rows, applied to the stage's layers [l0, l1) only. The stages run one after the other:

    stage 0        tokens -> embedding -> layers [0, l1)                 -> residual x f32[n, dim]
    stage k        residual of stage k - 1 -> layers [lk, lk+1)           -> residual x f32[n, dim]
    last stage     residual of stage m - 2 -> layers [.., n_layers) -> final norm, logits -> the root

The root (the plan's first peer) always leads the LAST stage, so the logits arrive where they are
sampled exactly as in a tensor-parallel plan (its group's node 0 gathers them), and the embedding is
looked up by the first stage's nodes, which hold its vocabulary rows; every node gets the step's tokens.
The hand-off: the leader (node 0) of stage k sends its residual, n x dim f32 (dim * 4 bytes a token), to
every node of stage k + 1 (jit/tp_stage.py). With the exact exchange inside every group, the logits are
bit-identical to one node's.

The plan's nodes, flattened (`PipelinePlan.nodes`), are what the session layer connects and pushes
slices to, index 0 the root: the root, then stage 0's nodes, stage 1's, ..., the last stage's others.

Policies: "pipeline" (one node per stage), "hybrid" (stages of `group` nodes, tensor-parallel inside;
the last one may be smaller). Layers are split so that every stage streams the same weights per unit of
its capacity, the last stage's output projection counted (stage_weights): with several requests in
flight the slowest stage sets the pace, and the root's stage also holds the vocabulary's rows (SmolLM2's
output projection weighs as much as 8 of its 30 layers; Gemma 3 270M's more than all 18). candidate_plans enumerates tensor-parallel,
pipeline and hybrid plans over the first k peers for the cost model (plan helper) to choose from.

Errors: PlanError (scheduler.py), also raised when a PipelinePlan is built invalid (e.g. off the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from fractions import Fraction
from typing import Sequence, Union

from .formats import ModelConfig
from .scheduler import (
    BLOCK_ROWS, DEFAULT_EXCHANGE, NodeSlice, Peer, Plan, PlanError, allowed_nodes, apportion, model_fingerprint,
    node_share, plan,
)

PIPELINE_POLICIES = ("pipeline", "hybrid")
DEFAULT_GROUP = 2  # nodes per tensor-parallel group of a hybrid plan


@dataclass(frozen=True)
class Stage:
    """Layers [layers[0], layers[1]) of the model, computed by `plan`'s nodes (tensor-parallel)."""

    layers: tuple[int, int]
    plan: Plan


@dataclass(frozen=True)
class PipelinePlan:
    """Stages in layer order; valid by construction (validate_pipeline). Its epoch and model are every
    stage plan's; `nodes` flattens the stages (index 0: the root, the last stage's node 0)."""

    epoch: int
    model: str
    policy: str
    n_layers: int
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        validate_pipeline(self)

    # what the session layer reads of a Plan --------------------------------------------------------

    @cached_property  # written once into the instance's __dict__: the frozen fields never change
    def nodes(self) -> tuple[NodeSlice, ...]:
        order = [(len(self.stages) - 1, 0)] + [(k, j) for k, s in enumerate(self.stages) for j in range(s.plan.n_nodes)
                                               if (k, j) != (len(self.stages) - 1, 0)]
        return tuple(replace(self.stages[k].plan.nodes[j], index=g) for g, (k, j) in enumerate(order))

    @property
    def n_nodes(self) -> int:
        return sum(s.plan.n_nodes for s in self.stages)

    @property
    def exchange(self) -> str:
        return self.stages[-1].plan.exchange

    def node(self, node_id: str) -> NodeSlice:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise PlanError(f"node {node_id!r} is not in the plan of epoch {self.epoch}")

    # the model's shape, as a Plan has it (scheduler.check_plan_fits)
    n_heads = property(lambda self: self.stages[0].plan.n_heads)
    n_kv_heads = property(lambda self: self.stages[0].plan.n_kv_heads)
    head_dim = property(lambda self: self.stages[0].plan.head_dim)
    ffn_dim = property(lambda self: self.stages[0].plan.ffn_dim)
    vocab_size = property(lambda self: self.stages[0].plan.vocab_size)
    dim = property(lambda self: self.stages[0].plan.dim)

    # where a node sits ---------------------------------------------------------------------------------

    def locate(self, index: int) -> tuple[int, int]:
        """(stage, index in the stage's plan) of flattened node `index`."""
        node_id = self.nodes[index].node_id
        for k, s in enumerate(self.stages):
            for j, n in enumerate(s.plan.nodes):
                if n.node_id == node_id:
                    return k, j
        raise PlanError(f"no node {index} in the plan of epoch {self.epoch}")  # pragma: no cover

    def index_of(self, stage: int, local: int) -> int:
        """The flattened index of node `local` of stage `stage`."""
        node_id = self.stages[stage].plan.nodes[local].node_id
        return next(n.index for n in self.nodes if n.node_id == node_id)


AnyPlan = Union[Plan, PipelinePlan]


def with_epoch(p: AnyPlan, epoch: int) -> AnyPlan:
    """The same plan for another epoch (a pipeline plan's stages too)."""
    if isinstance(p, Plan):
        return replace(p, epoch=epoch)
    stages = tuple(replace(s, plan=replace(s.plan, epoch=epoch)) for s in p.stages)
    return replace(p, epoch=epoch, stages=stages)


def validate_pipeline(p: PipelinePlan) -> None:
    """Raises PlanError unless the stages cover [0, n_layers) in order, each with >= 1 layer, share the
    epoch, model, exchange and shape, name every node once, and the root's stage is the last."""
    where = f"pipeline plan of epoch {p.epoch}"
    if p.policy not in PIPELINE_POLICIES:
        raise PlanError(f"{where}: unknown policy {p.policy!r} (known: {', '.join(PIPELINE_POLICIES)})")
    if not isinstance(p.n_layers, int) or isinstance(p.n_layers, bool) or p.n_layers < 1:
        raise PlanError(f"{where}: n_layers must be an int >= 1, got {p.n_layers!r}")
    if not isinstance(p.stages, tuple) or not p.stages:
        raise PlanError(f"{where}: no stages")
    end, ids = 0, []
    shape0 = None
    for k, s in enumerate(p.stages):
        if not isinstance(s, Stage) or not isinstance(s.plan, Plan):
            raise PlanError(f"{where}: stage {k} is not a Stage of a Plan")
        lo, hi = s.layers
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or lo != end or hi <= lo:
            raise PlanError(f"{where}: stage {k}'s layers [{lo}, {hi}) do not follow [.., {end}) or are empty")
        end = hi
        sp = s.plan
        if sp.epoch != p.epoch or sp.model != p.model:
            raise PlanError(f"{where}: stage {k}'s plan is of epoch {sp.epoch}, model {sp.model}")
        shape = (sp.n_heads, sp.n_kv_heads, sp.head_dim, sp.ffn_dim, sp.vocab_size, sp.dim, sp.exchange)
        if shape0 is not None and shape != shape0:
            raise PlanError(f"{where}: stage {k}'s plan has shape/exchange {shape}, stage 0's {shape0}")
        shape0 = shape
        ids += [n.node_id for n in sp.nodes]
    if end != p.n_layers:
        raise PlanError(f"{where}: the stages end at layer {end}, the model has {p.n_layers}")
    if len(set(ids)) != len(ids):
        raise PlanError(f"{where}: a node is in two stages (or twice in one)")


def check_fits(p: AnyPlan, config: ModelConfig) -> None:
    """Raises PlanError unless a pipeline plan's layers are the model's (the shape: check_plan_fits)."""
    if isinstance(p, PipelinePlan) and p.n_layers != config.n_layers:
        raise PlanError(f"plan of epoch {p.epoch} is for {p.n_layers} layers, the model has {config.n_layers}")


def stage_plan(config: ModelConfig, peers: Sequence[Peer], epoch: int, policy: str = "pipeline", *,
               group: int = DEFAULT_GROUP, max_nodes: int | None = None, model: str | None = None,
               exchange: str = DEFAULT_EXCHANGE, block: int = BLOCK_ROWS) -> PipelinePlan:
    """peers[0] is the root. "pipeline": one node per stage, as many stages as peers (and layers) allow;
    "hybrid": stages of `group` nodes (the root's, the last, takes the root and the next group - 1
    peers by capacity; the last peers left may make a smaller first stage). Layers are apportioned by
    each stage's total capacity; inside a stage, heads and rows as scheduler.plan's "weighted" does.
    Raises PlanError (no peers, unknown policy, a group the heads cannot split, fewer than 2 stages)."""
    if policy not in PIPELINE_POLICIES:
        raise PlanError(f"unknown pipeline policy {policy!r} (known: {', '.join(PIPELINE_POLICIES)})")
    if not peers:
        raise PlanError("cannot plan without peers (the root itself is the first peer)")
    others = sorted(peers[1:], key=lambda p: (-p.capacity, p.node_id))
    chosen = [peers[0], *others][: min(len(peers), max_nodes or len(peers))]
    size = 1 if policy == "pipeline" else group
    if size < 1 or not allowed_nodes(config, size):
        raise PlanError(f"{size} nodes cannot share this model's {config.n_kv_heads} KV heads in a stage")
    groups = [chosen[i: i + size] for i in range(0, len(chosen), size)][: config.n_layers]
    if len(groups) < 2:
        raise PlanError(f"a {policy} plan needs at least 2 stages; {len(chosen)} node(s) give {len(groups)}")
    groups.reverse()  # the root's group is the last stage
    counts = apportion(config.n_layers, stage_weights(config, [sum((Fraction(p.capacity) for p in g), Fraction(0))
                                                               for g in groups]))
    model = model if model is not None else model_fingerprint(config)
    stages, start = [], 0
    for g, count in zip(groups, counts):
        if not allowed_nodes(config, len(g)):
            raise PlanError(f"{len(g)} nodes cannot share this model's {config.n_kv_heads} KV heads in a stage")
        sp = plan(config, g, epoch, "weighted", model=model, exchange=exchange, block=block)
        if sp.n_nodes != len(g):  # pragma: no cover - allowed_nodes said it can
            raise PlanError(f"a stage of {len(g)} nodes was planned on {sp.n_nodes}")
        stages.append(Stage((start, start + count), sp))
        start += count
    return PipelinePlan(epoch, model, policy, config.n_layers, tuple(stages))


def output_layers(config: ModelConfig) -> Fraction:
    """The output projection (vocab x dim) in layers' worth of weights (q, k, v, o, gate, up, down), by
    count: the bytes per weight of the file's types are not in the config."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return Fraction(config.vocab_size * config.dim, config.dim * (2 * q + 2 * kv) + 3 * config.dim * config.ffn_dim)


def stage_weights(config: ModelConfig, capacities: Sequence[Fraction]) -> list[Fraction]:
    """The stages' shares of the layers (for apportion) so that each stage's weights, the last stage's
    output projection included, are in proportion to its capacity: layers_k + X [k last] = T cap_k with
    T = (n_layers + X) / sum(cap). A last stage whose output alone exceeds its part gets the least (1
    layer: apportion's floor; its share here is a token 1/1000)."""
    x = output_layers(config)
    t = (config.n_layers + x) / sum(capacities, Fraction(0))
    last = len(capacities) - 1
    return [max(c * t - (x if k == last else 0), Fraction(1, 1000)) for k, c in enumerate(capacities)]


def build_plan(config: ModelConfig, peers: Sequence[Peer], epoch: int, policy: str = "pow2", **options) -> AnyPlan:
    """The plan of a policy: scheduler.POLICIES' tensor-parallel Plan, or PIPELINE_POLICIES' PipelinePlan,
    which falls back to a tensor-parallel plan of the root alone when there is one peer (or one layer),
    and for "hybrid" to a pipeline when the peers make one group only (options: model, exchange, block;
    group for "hybrid"). Raises PlanError."""
    if policy not in PIPELINE_POLICIES:
        return plan(config, peers, epoch, policy, **options)
    group = options.pop("group", DEFAULT_GROUP)
    if len(peers) < 2 or config.n_layers < 2:  # (a max_nodes the caller passed is 1 here, whatever it said)
        return plan(config, peers, epoch, "pow2", **{**options, "max_nodes": 1})
    if policy == "hybrid" and len(peers) <= group:  # one group would be one stage: a pipeline of them
        return stage_plan(config, peers, epoch, "pipeline", **options)
    return stage_plan(config, peers, epoch, policy, group=group, **options)


def candidate_plans(config: ModelConfig, peers: Sequence[Peer], *, epoch: int = 0, model: str | None = None,
                    exchange: str = DEFAULT_EXCHANGE, block: int = BLOCK_ROWS) -> list[AnyPlan]:
    """Every plan worth predicting for these peers (peers[0] the root), without duplicates: for each k
    of 1 .. len(peers) (the root and the k - 1 others of highest capacity): tensor parallelism over k
    ("pow2" when k is a power of two, "weighted"), a pipeline of k stages, and hybrids of k nodes in
    groups of g (2 <= g, at least 2 stages, g nodes allowed by the heads). Pure; same inputs, same list."""
    out: list[AnyPlan] = []
    seen: set[tuple] = set()

    def add(p: AnyPlan) -> None:
        key = _shape_key(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    kw = dict(model=model, exchange=exchange, block=block)
    for k in range(1, len(peers) + 1):
        for policy in ("pow2", "weighted"):
            try:
                p = plan(config, peers, epoch, policy, max_nodes=k, **kw)
            except PlanError:
                continue
            if p.n_nodes == k:
                add(p)
        if k >= 2 and k <= config.n_layers:
            add(stage_plan(config, peers, epoch, "pipeline", max_nodes=k, **kw))
        for g in range(2, k // 2 + 1):
            try:
                add(stage_plan(config, peers, epoch, "hybrid", group=g, max_nodes=k, **kw))
            except PlanError:
                continue
    return out


def _shape_key(p: AnyPlan) -> tuple:
    """What makes two plans different work: who computes which layers and which rows."""
    def flat(sp: Plan) -> tuple:
        return tuple((n.node_id, n.q_heads, n.ffn_rows, n.vocab_rows, n.dim_rows) for n in sp.nodes)

    if isinstance(p, Plan):
        return (((0, None), flat(p)),)
    return tuple((s.layers, flat(s.plan)) for s in p.stages)


def plan_share(p: AnyPlan, index: int, n_layers: int) -> float:
    """scheduler.node_share for any plan: a pipeline node's share of its stage's layers, scaled by the
    stage's part of the layers (the vocabulary's part of the last stage left out: a rate, not a count)."""
    if isinstance(p, Plan):
        return node_share(p, index, n_layers)
    k, j = p.locate(index)
    l0, l1 = p.stages[k].layers
    return node_share(p.stages[k].plan, j, n_layers) * (l1 - l0) / n_layers
