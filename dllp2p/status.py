"""`dllp2p status`: what the cluster looks like from one daemon (the local one by default).

    survey     Status to the daemon asked; then Status to every other node it lists (short timeout),
               for what only that node knows: its last step, its session's plan
    to_json    the survey as {"node": id asked, "nodes": [{"id", "address", "role", "version", ...}]}
    table      the survey as a rich Table; `watch` redraws it every second until Ctrl-C

Blocking sockets only (a CLI asking a few daemons once a second needs no event loop).

Error handling: the daemon asked not answering is StatusError (one line from the CLI, exit 1); in the
live view it is shown in the caption and asked again next second. Another node not answering only
leaves its columns empty ("reachable": false in JSON).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .link import BlockingLink, LinkClosed, LinkTimeout, parse_address
from .protocol import Error, ProtocolError, Status, StatusReply
from .scheduler import NodeSlice, Plan

DEFAULT_ADDRESS = "127.0.0.1:7340"


class StatusError(ConnectionError):
    """The daemon asked did not answer; the message says where and why."""


def ask(address: str, timeout: float, seq: int = 0) -> StatusReply:
    """One Status -> StatusReply exchange. Raises StatusError."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise StatusError(f"no dllp2p daemon answers at {address} ({e.strerror or e}); is `dllp2p daemon` running?") from None
    link = BlockingLink(sock, address)
    try:
        link.send(Status(seq))
        reply = link.receive(timeout)
    except (LinkClosed, LinkTimeout, ProtocolError) as e:
        raise StatusError(f"{address}: {e}") from None
    finally:
        link.close()
    if not isinstance(reply, StatusReply):
        detail = reply.message if isinstance(reply, Error) else type(reply).__name__
        raise StatusError(f"{address} answered Status with {detail}")
    return reply


@dataclass(frozen=True)
class Survey:
    asked: str  # address asked
    reply: StatusReply
    others: dict[str, StatusReply | None] = field(default_factory=dict)  # node id -> its own reply (None: no answer)

    def own(self, node_id: str) -> StatusReply | None:
        return self.reply if node_id == self.reply.node_id else self.others.get(node_id)

    def plan(self) -> Plan | None:
        """The plan of the session in progress, as any node that runs one reports it (latest epoch)."""
        plans = [r.plan for r in (self.reply, *self.others.values()) if r is not None and r.plan is not None]
        return max(plans, key=lambda p: p.epoch) if plans else None


def survey(address: str, timeout: float = 2.0, others_timeout: float = 0.5) -> Survey:
    reply = ask(address, timeout)
    others: dict[str, StatusReply | None] = {}
    for n in reply.nodes:
        if n.member.node_id == reply.node_id:
            continue
        try:
            others[n.member.node_id] = ask(n.member.address, others_timeout)
        except StatusError:
            others[n.member.node_id] = None
    return Survey(address, reply, others)


def _slice(plan: Plan | None, node_id: str) -> NodeSlice | None:
    if plan is None:
        return None
    return next((s for s in plan.nodes if s.node_id == node_id), None)


def to_json(s: Survey) -> dict[str, Any]:
    plan = s.plan()
    nodes = []
    for n in s.reply.nodes:
        m, own, sl = n.member, s.own(n.member.node_id), _slice(plan, n.member.node_id)
        step = own.last_step if own is not None else None
        nodes.append({
            "id": m.node_id,
            "address": m.address,
            "role": n.role,
            "version": m.version,
            "started_at": m.started_at,
            "cluster": m.cluster,
            "cores": m.cores,
            "ram": m.ram,
            "features": list(m.features),
            "known_from": list(n.sources),
            "last_seen": n.last_seen,
            "reachable": own is not None,
            "slice": None if sl is None else {
                "index": sl.index, "kv_heads": list(sl.kv_heads), "q_heads": list(sl.q_heads),
                "ffn_rows": list(sl.ffn_rows), "vocab_rows": list(sl.vocab_rows)},
            "last_step": None if step is None else {
                "tokens": step.tokens, "step_ms": step.step_ms, "sync_ms": step.sync_ms,
                "compute_ms": step.step_ms - step.sync_ms, "tokens_per_s": step.tokens_per_s, "at": step.at},
        })
    out: dict[str, Any] = {"node": s.reply.node_id, "nodes": nodes}
    out["plan"] = None if plan is None else {"epoch": plan.epoch, "policy": plan.policy, "nodes": plan.n_nodes}
    return out


# --- the live view --------------------------------------------------------------------------------


def table(s: Survey | None, error: str | None = None, now: float | None = None):
    """A rich Table of the survey (or of nothing, with the error in its caption)."""
    from rich.table import Table

    now = time.time() if now is None else now
    t = Table(title="dllp2p cluster", caption=error or (f"asked {s.asked} (node {s.reply.node_id}) at "
                                                         f"{time.strftime('%H:%M:%S', time.localtime(now))}" if s else ""))
    for col in ("node", "role", "address", "version", "started", "slice", "cores / RAM", "last tok/s"):
        t.add_column(col, no_wrap=col in ("node", "role", "address"))
    if s is None:
        return t
    plan = s.plan()
    for row in to_json(s)["nodes"]:
        sl, step = row["slice"], row["last_step"]
        t.add_row(
            row["id"] + ("" if row["reachable"] else " (unreachable)"),
            "[bold]root[/bold]" if row["role"] == "root" else row["role"],
            row["address"],
            str(row["version"]),
            f"{time.strftime('%H:%M:%S', time.localtime(row['started_at']))} ({_age(now - row['started_at'])} ago)",
            "-" if sl is None else (f"{sl['index']}/{plan.n_nodes if plan else '?'} kv {_r(sl['kv_heads'])} "
                                    f"ffn {_r(sl['ffn_rows'])} vocab {_r(sl['vocab_rows'])}"),
            f"{row['cores']} / {row['ram'] / 2**30:.1f} GiB",
            "-" if step is None else (f"{step['tokens_per_s']:.1f} (compute {step['compute_ms']:.1f} ms, "
                                      f"sync {step['sync_ms']:.1f} ms)"),
        )
    return t


def _r(r: list[int]) -> str:
    return f"{r[0]}-{r[1]}"


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def watch(address: str, interval: float = 1.0, timeout: float = 2.0) -> int:
    """Redraw the table every `interval` seconds until Ctrl-C (KeyboardInterrupt propagates)."""
    from rich.console import Console
    from rich.live import Live

    with Live(table(None, f"asking {address}..."), console=Console(), auto_refresh=False, screen=False) as live:
        while True:
            try:
                live.update(table(survey(address, timeout)), refresh=True)
            except StatusError as e:
                live.update(table(None, str(e)), refresh=True)
            time.sleep(interval)

