"""`dllp2p plan`: the candidate plans the cluster's root priced for its latest prompt, with predicted and
measured ms per token (the cost model: costmodel.py, planner.py, session/autoplan.py).

    dllp2p plan [--host H --port P] [--json] [--explain]

Asks the daemon with a Status (as `status` does); when it is not the root, asks the root it names. A
root with `--plan auto` (the default) prices plans when it serves a prompt; before its first prompt it
previews them from its own measured figures, its model's shape and its polls' round trips to the other
members (their speeds taken as its own until their Hellos tell). --explain adds where the time goes
(compute, exchange latency, bytes over bandwidth, disk streaming) and every node's measured figures.

--json prints {"root": id, "plans": [{label, nodes, predicted_ms, compute_ms, latency_ms, transfer_ms,
stream_ms, measured_ms, chosen, runnable, kind}, ...], "why": the choice in a line (planner.why),
"figures": {node id: {gbps, disk_gbps, ram_available}}}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..clusterkey import ClusterKey
from ..planner import why
from ..textsafe import printable
from ..wire.reports import StatusReply
from .status import StatusError, ask

NO_PLANS = ("no plan priced yet: a root with --plan auto (the default) previews candidates once it has measured "
            "itself and read its model, and prices them for every prompt")


def root_reply(address: str, timeout: float, key: ClusterKey | None = None) -> StatusReply:
    """The root's StatusReply: the asked daemon's, or the root's it names."""
    reply = ask(address, timeout, key=key)
    root = next((n for n in reply.nodes if n.role == "root"), None)
    if root is None or root.member.node_id == reply.node_id:
        return reply
    return ask(root.member.address, timeout, key=key)


def figures_of(reply: StatusReply, timeout: float, key: ClusterKey | None = None) -> dict[str, dict[str, float]]:
    """Every member's measured figures, from its own Status (unreachable members are left out)."""
    out: dict[str, dict[str, float]] = {}
    for n in reply.nodes:
        try:
            r = reply if n.member.node_id == reply.node_id else ask(n.member.address, timeout, key=key)
        except StatusError:
            continue
        res = r.resources
        if res is not None:
            out[r.node_id] = {"gbps": res.gbps, "disk_gbps": res.disk_gbps, "ram_available": res.ram_available}
    return out


def to_json(reply: StatusReply, figures: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    plans = []
    for p in reply.plans:
        row = dataclasses.asdict(p)
        row["predicted_ms"] = None if math.isinf(p.predicted_ms) else p.predicted_ms
        plans.append(row)
    out: dict[str, Any] = {"root": reply.node_id, "plans": plans, "why": choice_line(reply)}
    if figures is not None:
        out["figures"] = figures
    return out


def choice_line(reply: StatusReply) -> str:
    """Which plan the root chose and why (planner.why): its predicted ms/token against the best
    tensor-parallel plan's, or the fastest pipeline's that was not enough faster ("" before any)."""
    return why([(p.kind, p.label, p.predicted_ms, p.chosen) for p in reply.plans])


def _ms(x: float | None) -> str:
    return "does not fit" if x is None or math.isinf(x) else f"{x:.1f}"


def render(doc: dict[str, Any], explain: bool = False) -> str:
    """The table `dllp2p plan` prints (plain text, one candidate a line, fastest predicted first)."""
    if not doc["plans"]:
        return NO_PLANS
    head = f"{'':2}{'plan':22} {'nodes':>5} {'predicted':>12} {'measured':>9}"
    if explain:
        head += f" {'compute':>9} {'latency':>9} {'transfer':>9} {'stream':>9}"
    lines = [f"root {printable(doc['root'])}: candidate plans, ms per token", head]
    for p in doc["plans"]:
        mark = "* " if p["chosen"] else "  "
        label = printable(p["label"]) + ("" if p["runnable"] else " (priced only)")
        row = f"{mark}{label:22} {p['nodes']:>5} {_ms(p['predicted_ms']):>12} " \
              f"{(_ms(p['measured_ms']) if p['measured_ms'] else '-'):>9}"
        if explain:
            row += "".join(f" {p[k]:>9.1f}" for k in ("compute_ms", "latency_ms", "transfer_ms", "stream_ms"))
        lines.append(row)
    lines.append("* chosen; measured: the latest request's decode, per token")
    if doc.get("why"):
        lines.append(printable(doc["why"]))
    if explain and doc.get("figures"):
        lines.append("measured figures (0: not measured; the planner then assumes):")
        for node, f in doc["figures"].items():
            lines.append(f"  {printable(node)}: {f['gbps']:.1f} GB/s of weights, disk {f['disk_gbps']:.2f} GB/s, "
                         f"{f['ram_available'] / 1e9:.1f} GB available")
    return "\n".join(lines)


def show(address: str, timeout: float = 2.0, *, as_json: bool = False, explain: bool = False,
         key: ClusterKey | None = None) -> dict[str, Any]:
    """The document `dllp2p plan` prints (StatusError when the daemon does not answer)."""
    reply = root_reply(address, timeout, key)
    return to_json(reply, figures_of(reply, timeout, key) if explain or as_json else None)
