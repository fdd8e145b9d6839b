"""The cost-model planner: a cluster's figures -> candidate plans, each priced, and the one to run.

    candidates(shape, devices, kinds, exchanges)  every plan worth pricing on these nodes
    rank(shape, devices, links, cands)            their Predictions, fastest first
    choose(predictions, margin, handicap)         the fastest, unless one with fewer nodes is within
                                                  `margin` of it: never a plan predicted slower than a
                                                  plan that uses fewer nodes; pipeline and hybrid plans
                                                  compete with their time x (1 + handicap)
    why(rows)                                     one line: which kind was chosen, against the best
                                                  tensor-parallel plan (or pipeline) it beat
    busy_out(shape, devices, links, exchange, out) the nodes whose CPU wait (another program holds their
                                                  core) costs the plan more than their share saves

Node 0 is the root and is in every plan (it holds the prompt and samples); the others join fastest
first (highest GB/s, then index), as scheduler._choose takes peers by capacity. Pure: no I/O.

Every kind runs (RUNNABLE): a root with `--plan auto` builds the pipeline or hybrid plan the model
priced (session/autoplan.py). Their figures are rougher than tensor parallelism's (a stage's hand-off,
the stages' imbalance), so a root chooses one only when it is predicted PIPELINE_MARGIN faster than the
best tensor-parallel plan: choose's `handicap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Collection, Sequence

from .costmodel import Candidate, DeviceFigures, LinkFigures, ModelShape, Prediction, predict, split_layers

RUNNABLE = ("tp", "pipeline", "hybrid")
MARGIN = 0.02  # a plan with more nodes must be predicted this much faster to be chosen
PIPELINE_MARGIN = 0.10  # a pipeline or hybrid plan must be predicted this much faster than tensor parallelism


def node_order(devices: Sequence[DeviceFigures]) -> list[int]:
    """The root, then the others fastest first."""
    return [0] + sorted(range(1, len(devices)), key=lambda i: (-devices[i].gbps, i))


def candidates(shape: ModelShape, devices: Sequence[DeviceFigures], kinds: Sequence[str] = RUNNABLE,
               exchanges: Sequence[str] = ("exact",), *, ordered: bool = False,
               allowed: Collection[int] | None = None) -> list[Candidate]:
    """Tensor parallel over the first k nodes (k = 1..n, as the heads allow: `allowed` node counts, or up
    to shape.max_nodes); pipelines of k >= 2 single-node stages (layers in proportion to GB/s); hybrids
    of s >= 2 stages of g >= 2 nodes. ordered: the devices are in the order nodes join (the scheduler's),
    else fastest first."""
    order = list(range(len(devices))) if ordered else node_order(devices)
    out: list[Candidate] = []
    for k in range(1, len(order) + 1):
        nodes = order[:k]
        if "tp" in kinds and k <= shape.max_nodes and (allowed is None or k in allowed):
            out += [Candidate("tp", (tuple(nodes),), (shape.n_layers,), x) for x in (exchanges if k > 1 else exchanges[:1])]
        if "pipeline" in kinds and 2 <= k <= shape.n_layers:
            layers = split_layers(shape.n_layers, [devices[i].gbps for i in nodes])
            out.append(Candidate("pipeline", tuple((i,) for i in nodes), layers))
        if "hybrid" in kinds:
            for g in range(2, min(k // 2, shape.max_nodes) + 1):
                s = k // g
                if s * g != k or s > shape.n_layers:
                    continue
                groups = tuple(tuple(nodes[j * g:(j + 1) * g]) for j in range(s))
                layers = split_layers(shape.n_layers, [sum(devices[i].gbps for i in grp) for grp in groups])
                out += [Candidate("hybrid", groups, layers, x) for x in exchanges]
    return out


def candidate_of(p: Any, ids: Sequence[str], n_layers: int) -> Candidate:
    """A plan as the cost model's Candidate over nodes indexed as in `ids` (node ids): a scheduler Plan
    (.nodes, .exchange) is "tp"; a pipeline plan (.stages, each with .layers (l0, l1) and a tensor-parallel
    .plan) is "pipeline" when every stage is one node, else "hybrid". The pipe branch's candidate_plans
    give these; RUNNABLE then lists their kinds."""
    index = {node_id: i for i, node_id in enumerate(ids)}
    if not hasattr(p, "stages"):
        return Candidate("tp", (tuple(index[n.node_id] for n in p.nodes),), (n_layers,), p.exchange)
    stages = tuple(tuple(index[n.node_id] for n in s.plan.nodes) for s in p.stages)
    layers = tuple(s.layers[1] - s.layers[0] for s in p.stages)
    return Candidate("pipeline" if all(len(s) == 1 for s in stages) else "hybrid", stages, layers, p.exchange)


def rank(shape: ModelShape, devices: Sequence[DeviceFigures], links: Sequence[LinkFigures],
         cands: Sequence[Candidate]) -> list[Prediction]:
    """Predictions, fastest first (ties: fewer nodes, then the order given)."""
    preds = [predict(shape, devices, links, c) for c in cands]
    order = sorted(range(len(preds)), key=lambda i: (preds[i].total_ms, preds[i].candidate.n_nodes, i))
    return [preds[i] for i in order]


def score(p: Prediction, handicap: float = 0.0) -> float:
    """What a prediction competes with: its ms per token, x (1 + handicap) for a pipeline or hybrid plan."""
    return p.total_ms if p.candidate.kind == "tp" else p.total_ms * (1 + handicap)


def choose(preds: Sequence[Prediction], margin: float = MARGIN, handicap: float = 0.0) -> Prediction:
    """The fastest feasible prediction, or the one with the fewest nodes within `margin` of it; each
    competes with its score (pipelines and hybrids handicapped)."""
    ok = [p for p in preds if p.feasible]
    if not ok:
        raise ValueError("no candidate fits the nodes' memory")
    best = min(score(p, handicap) for p in ok)
    near = [p for p in ok if score(p, handicap) <= best * (1 + margin)]
    return min(near, key=lambda p: (p.candidate.n_nodes, score(p, handicap)))


def why(rows: Sequence[tuple[str, str, float, bool]], handicap: float = PIPELINE_MARGIN) -> str:
    """One line on the choice among rows (kind, label, predicted ms per token, chosen): the chosen plan's
    time against the best tensor-parallel one's (a pipeline or hybrid chosen), or against the fastest
    pipeline or hybrid that was not `handicap` faster. "" when none is chosen."""
    chosen = next((r for r in rows if r[3]), None)
    if chosen is None:
        return ""
    kind, label, ms, _ = chosen
    best = {k: min((r for r in rows if (r[0] == "tp") == (k == "tp") and math.isfinite(r[2])),
                   key=lambda r: r[2], default=None) for k in ("tp", "pipe")}
    line = f"chose {label}: predicted {ms:.1f} ms/token"
    if kind != "tp":
        tp = best["tp"]
        return line + (f" against {tp[2]:.1f} for the best tensor-parallel plan ({tp[1]})" if tp else "")
    pipe = best["pipe"]
    if pipe is not None and pipe[2] < ms:
        line += (f"; {pipe[1]} predicted {pipe[2]:.1f}, not {100 * handicap:.0f} % faster (a pipeline's figures "
                 f"are rougher)")
    return line


@dataclass(frozen=True)
class Choice:
    """What the root decided: the chosen plan and every candidate it priced (fastest first)."""

    chosen: Prediction
    ranked: tuple[Prediction, ...]


def plan_for(shape: ModelShape, devices: Sequence[DeviceFigures], links: Sequence[LinkFigures],
             kinds: Sequence[str] = RUNNABLE, exchanges: Sequence[str] = ("exact",),
             margin: float = MARGIN, handicap: float = 0.0, **which: Any) -> Choice:
    """Price every candidate of `kinds` (candidates' `ordered`, `allowed`) and choose among them."""
    ranked = rank(shape, devices, links, candidates(shape, devices, kinds, exchanges, **which))
    return Choice(choose(ranked, margin, handicap), tuple(ranked))


# --- busy nodes: left out while their CPU wait costs more than their share saves (issue 19) ---------------

# a node in the plan is left out when its wait costs more than this (of the plan without it): for SmolLM2 on two
# 1-thread nodes (5.9 ms a token alone) 9.8 us per exchange, where a hog on its core costs ~35 (4.2 ms a token)
OUT_MARGIN = 0.2
BACK_MARGIN = 0.1  # a node left out comes back only when its wait costs less than this: hysteresis (4.9 us)


def busy_out(shape: ModelShape, devices: Sequence[DeviceFigures], links: Sequence[LinkFigures],
             exchange: str = "exact", *, out: Collection[int] = (), max_nodes: int | None = None) -> dict[int, float]:
    """The nodes (indices >= 1; node 0, the root, always runs) to plan without because of the CPU waits
    (DeviceFigures.wait_ms), each with the wait per token (ms) of the plan that includes it. `out`: the nodes
    left out now (judged with BACK_MARGIN, the others with OUT_MARGIN: no flapping between the two).

    Tensor parallelism over all the nodes (the first max_nodes of them), priced with the waits (t) and
    with every wait at 0 (t_quiet; their difference W is the plan's wait), against the same without G,
    the m busiest other nodes (m = 1 .. all of them, the busiest first: an exchange waits for its busiest
    node, so two busy nodes leave together or not at all, and a busy root's wait goes only with every
    exchange). G is left out when, with margin x t(without G) as the unit,
        t(all) - t(without G) > margin          the plan without G is predicted faster, and
        W(without G_{m-1}) - W(without G) > margin   its last node's leaving cures that much wait more,
    so a node leaves for the waits, never for the rest of the cost model (a quiet node that the policy
    keeps although a pessimistic latency figure says one node fewer would be faster stays). The
    smallest such G: the busiest node alone when that is enough."""
    limit = max_nodes or shape.max_nodes
    everyone = list(range(len(devices)))
    quiet = [replace(d, wait_ms=0.0) for d in devices]

    def t(nodes: list[int], devs: Sequence[DeviceFigures]) -> float:
        cand = Candidate("tp", (tuple(nodes[:limit]),), (shape.n_layers,), exchange)
        return predict(shape, devs, links, cand).total_ms

    t_all = t(everyone, devices)
    wait_before = wait_all = t_all - t(everyone, quiet)
    by_wait = sorted(everyone[1:], key=lambda i: (-devices[i].wait_ms, i))
    for m in range(1, len(by_wait) + 1):
        group = by_wait[:m]
        kept = [i for i in everyone if i not in group]
        without = t(kept, devices)
        wait = without - t(kept, quiet)
        unit = (BACK_MARGIN if set(group) <= set(out) else OUT_MARGIN) * without
        if t_all - without > unit and wait_before - wait > unit:
            return {i: wait_all for i in group}
        wait_before = wait
    return {}
