"""`dllp2p status`: what the cluster looks like from one daemon (the local one by default).

    survey     Status to the daemon asked; then Status to every other node it lists (short timeout),
               for what only that node knows: its last step, its session's plan, its memory and load,
               its weight push; the round-trip of each of these exchanges is kept
    to_json    the survey as {"node": id asked, "nodes": [{"id", "address", "role", "version", ...}]}
    table      the survey as a rich Table; `watch` redraws it every second until q (or Ctrl-C)

`dllp2p status --json` prints to_json:

    node        the id of the daemon asked
    plan        null, or {"epoch", "policy", "exchange", "nodes", "why"}: the session in progress (latest epoch any
                node reports); why: how an "auto" root chose it (planner.why), else ""
    push        null, or {"epoch", "done", "total", "fraction", "nodes"}: the weight push of that plan's
                epoch summed over the workers that report one (the root's side of it: what it sent)
    progress    the root's latest set-up as it reports it: [{"task": "push" | "build", "subject": "root"
                or "worker HOST:PORT (node ID)", "done", "total"}] (bytes pushed; 0 or 1 engine built)
    left_out    {node id: {"address", "code" ("disk_full", "cpu_wait"), "reason", "until" (unix s)}}: workers the
                root plans without for now, and why ("CPU wait 3.1 ms per token": another program holds its CPU)
    recoveries  {"count", "last": null or {"cause", "pause_s", "replayed", "nodes_before", "nodes_after",
                "at"}}: the root's requests that lost a node mid-generation and went on (re-planned, resumed)
    serving     null, or the root's requests served together: {"running", "queued", "batch" (rows of its
                latest step), "max_batch", "queue" (the queue's bound), "kv_reserved", "kv_budget" (positions),
                "tok_s" (tokens generated a second, all requests together, over the last 2 s; 0: none),
                "served" (requests answered since the daemon started)}
    nodes       one entry per member the daemon asked lists, root first, then the succession:
      id, address, role ("root" | "worker"), version (protocol, int), started_at (unix s, float),
      cluster, cores (int), ram (bytes of RAM, int), features (list of str), known_from (list of
      "self" | "mdns" | "static"), last_seen (unix s), reachable (bool: the node answered its own Status)
      slice       null, or {"index", "kv_heads", "q_heads", "ffn_rows", "vocab_rows", "layers"} ([start, end)
                  pairs; layers: its pipeline stage's, null in a tensor-parallel plan)
      last_step   null, or {"tokens", "step_ms", "sync_ms", "compute_ms", "tokens_per_s", "at"}
      rss         bytes resident of the node's daemon process (int), null when unreachable (or too old)
      ram_available  bytes of RAM the node can still give (int, 0: unknown), null likewise
      load        the node's 1-minute load average (float), null likewise
      load_per_core  load / cores (float), null likewise
      rtt_ms      round-trip (ms, float) of the latest Status poll between the daemon asked and this node
                  (the asked daemon's poll of it, else its poll of the asked daemon); null for the daemon
                  asked itself and where neither polls the other
      status_rtt_ms  this command's own Status round-trip to the node's daemon (ms, float), null when
                  unreachable
      links       {node id: ms}: the node's own latest poll round-trips to the members it polls
      push        null, or {"epoch", "done", "total", "fraction", "finished", "started_at"}: the weight
                  push of the node's latest session (bytes of the slices it needed, received and verified
                  so far / their total; fraction 1.0 when it needed nothing)
      left_out    null, or the node's entry of the top-level left_out

Each exchange is wire.client's, in a trio.run of its own (a CLI asking a few daemons once a second needs no
long-running event loop).

Error handling: the daemon asked not answering is StatusError (one line from the CLI, exit 1); in the
live view it is shown in the caption and asked again next second. Another node not answering only
leaves its columns empty ("reachable": false in JSON).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

from ..clusterkey import ClusterKey
from ..config import LOCAL_DAEMON
from ..pipeline import AnyPlan, PipelinePlan
from ..planner import why
from ..scheduler import NodeSlice
from ..textsafe import printable
from ..wire.client import status_blocking
from ..wire.codec import ProtocolError
from ..wire.link import LinkClosed, LinkTimeout
from ..wire.reports import PushStatus, StatusReply
from ..wire.secure import HandshakeFailed

DEFAULT_ADDRESS = LOCAL_DAEMON


class StatusError(ConnectionError):
    """The daemon asked did not answer; the message says where and why."""


def ask(address: str, timeout: float, seq: int = 0, key: ClusterKey | None = None) -> StatusReply:
    """One Status -> StatusReply exchange. Raises StatusError."""
    return ask_timed(address, timeout, seq, key)[0]


def ask_timed(address: str, timeout: float, seq: int = 0, key: ClusterKey | None = None) -> tuple[StatusReply, float]:
    """ask, and its round-trip in ms (Status sent -> StatusReply received; connecting not included)."""
    try:
        reply, rtt = status_blocking(address, timeout, seq, key)
    except HandshakeFailed as e:
        raise StatusError(f"{address} is not a daemon of this cluster ({e})") from None
    except LinkClosed as e:
        if "cannot connect" not in str(e):  # it took the connection, then dropped it: the handshake
            hint = "it needs this cluster's key: --key-file PATH" if key is None else "it has another cluster key"
            raise StatusError(f"{address} closed the connection ({hint})") from None
        raise StatusError(f"no dllp2p daemon answers at {address} ({e}); is `dllp2p daemon` running?") from None
    except (LinkTimeout, ProtocolError) as e:
        raise StatusError(f"{address}: {e}") from None
    return reply, rtt * 1e3


@dataclass(frozen=True)
class Survey:
    asked: str  # address asked
    reply: StatusReply
    others: dict[str, StatusReply | None] = field(default_factory=dict)  # node id -> its own reply (None: no answer)
    rtt_ms: dict[str, float] = field(default_factory=dict)  # node id -> this client's Status round-trip to it

    def own(self, node_id: str) -> StatusReply | None:
        return self.reply if node_id == self.reply.node_id else self.others.get(node_id)

    def plan(self) -> AnyPlan | None:
        """The plan of the session in progress, as any node that runs one reports it (latest epoch)."""
        plans = [r.plan for r in (self.reply, *self.others.values()) if r is not None and r.plan is not None]
        return max(plans, key=lambda p: p.epoch) if plans else None


def survey(address: str, timeout: float = 2.0, others_timeout: float = 0.5, *,
           key: ClusterKey | None = None) -> Survey:
    reply, rtt = ask_timed(address, timeout, key=key)
    others: dict[str, StatusReply | None] = {}
    rtts = {reply.node_id: rtt}
    for n in reply.nodes:
        if n.member.node_id == reply.node_id:
            continue
        try:
            others[n.member.node_id], rtts[n.member.node_id] = ask_timed(n.member.address, others_timeout, key=key)
        except StatusError:
            others[n.member.node_id] = None
    return Survey(address, reply, others, rtts)


def _slice(plan: AnyPlan | None, node_id: str) -> NodeSlice | None:
    if plan is None:
        return None
    return next((s for s in plan.nodes if s.node_id == node_id), None)


def _layers(plan: AnyPlan | None, node_id: str) -> list[int] | None:
    """The layer range of node_id's stage in a pipeline plan; None in a tensor-parallel one."""
    if not isinstance(plan, PipelinePlan):
        return None
    return next((list(s.layers) for s in plan.stages if any(n.node_id == node_id for n in s.plan.nodes)), None)


def _link_rtt(s: Survey, node_id: str) -> float | None:
    """The asked daemon's latest poll round-trip to node_id, else node_id's to the asked daemon."""
    if node_id == s.reply.node_id:
        return None
    for reply, peer in ((s.reply, node_id), (s.others.get(node_id), s.reply.node_id)):
        if reply is not None:
            for link in reply.links:
                if link.node_id == peer:
                    return link.rtt_ms
    return None


def _push(p: PushStatus | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"epoch": p.epoch, "done": p.done, "total": p.total, "fraction": p.fraction, "finished": p.finished,
            "started_at": p.started_at}


def to_json(s: Survey) -> dict[str, Any]:
    plan = s.plan()
    nodes = []
    for n in s.reply.nodes:
        m, own, sl = n.member, s.own(n.member.node_id), _slice(plan, n.member.node_id)
        step = own.last_step if own is not None else None
        res = own.resources if own is not None else None
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
                "ffn_rows": list(sl.ffn_rows), "vocab_rows": list(sl.vocab_rows),
                "layers": _layers(plan, m.node_id)},
            "last_step": None if step is None else {
                "tokens": step.tokens, "step_ms": step.step_ms, "sync_ms": step.sync_ms,
                "compute_ms": step.step_ms - step.sync_ms, "tokens_per_s": step.tokens_per_s, "at": step.at},
            "rss": None if res is None else res.rss,
            "ram_available": None if res is None else res.ram_available,
            "load": None if res is None else res.load1,
            "load_per_core": None if res is None else res.load1 / res.cores,
            "rtt_ms": _link_rtt(s, m.node_id),
            "status_rtt_ms": s.rtt_ms.get(m.node_id) if own is not None else None,
            "links": {} if own is None else {link.node_id: link.rtt_ms for link in own.links},
            "push": _push(own.push if own is not None else None),
            "rate": None if own is None else own.rate,  # whole-model decode tok/s of its compute (rates.py)
            "wait_ms": None if own is None else own.wait_ms,  # its CPU wait per exchange (rates.py)
        })
    out: dict[str, Any] = {"node": s.reply.node_id, "nodes": nodes}
    out["plan"] = None if plan is None else {"epoch": plan.epoch, "policy": plan.policy, "exchange": plan.exchange,
                                          "nodes": plan.n_nodes}
    pushes = [row["push"] for row in nodes if row["push"] is not None and plan is not None
              and row["push"]["epoch"] == plan.epoch]
    out["push"] = None
    if pushes:
        done, total = sum(p["done"] for p in pushes), sum(p["total"] for p in pushes)
        out["push"] = {"epoch": plan.epoch, "done": done, "total": total,
                       "fraction": done / total if total else 1.0, "nodes": len(pushes)}
    root = next((s.own(m.member.node_id) for m in s.reply.nodes if m.role == "root"), None) or s.reply
    out["progress"] = [{"task": p.task, "subject": p.subject, "done": p.done, "total": p.total}
                       for p in root.progress]
    if out["plan"] is not None:  # how an "auto" root chose it (planner.why; "" for the other policies)
        out["plan"]["why"] = why([(p.kind, p.label, p.predicted_ms, p.chosen) for p in root.plans])
    out["left_out"] = {x.node_id: {"address": x.address, "code": x.code, "reason": x.reason, "until": x.until}
                       for x in root.left_out}
    r = root.last_recovery
    out["recoveries"] = {"count": root.recoveries, "last": None if r is None else {
        "cause": r.cause, "pause_s": r.pause_s, "replayed": r.replayed, "nodes_before": r.nodes_before,
        "nodes_after": r.nodes_after, "at": r.at}}
    sv = root.serving
    out["serving"] = None if sv is None else {"running": sv.running, "queued": sv.queued, "batch": sv.batch,
                                              "max_batch": sv.max_batch, "queue": sv.queue,
                                              "kv_reserved": sv.kv_reserved, "kv_budget": sv.kv_budget,
                                              "tok_s": sv.tok_s, "served": sv.served}
    left = out["left_out"]
    for row in nodes:
        row["left_out"] = left.get(row["id"])
    return out


# --- the live view --------------------------------------------------------------------------------


def table(s: Survey | None, error: str | None = None, now: float | None = None, hint: str = ""):
    """A rich Table of the survey (or of nothing, with the error in its caption); `hint` ends the caption."""
    from rich.table import Table

    now = time.time() if now is None else now
    caption = error or (f"asked {s.asked} (node {s.reply.node_id}) at "
                        f"{time.strftime('%H:%M:%S', time.localtime(now))}" if s else "")
    if s is not None and not error:
        busy = [p for p in to_json(s)["progress"] if p["done"] < p["total"]]
        if busy:
            caption += "; set-up: " + ", ".join(
                f"weights → {p['subject']} {100 * p['done'] / p['total']:.0f}%" if p["task"] == "push"
                else f"{p['subject']} building its engine" for p in busy)
        plan_ = to_json(s)["plan"]
        if plan_ is not None and plan_["why"]:
            caption += f"; plan {plan_['policy']} ({plan_['why']})"
        caption += _recoveries(to_json(s)["recoveries"], now)
        sv = to_json(s)["serving"]
        if sv is not None and (sv["running"] or sv["queued"]):
            caption += (f"; requests: {sv['running']} running, {sv['queued']} queued (batch {sv['batch']} of "
                        f"{sv['max_batch']}, KV {100 * sv['kv_reserved'] / max(1, sv['kv_budget']):.0f}%)"
                        + (f", {sv['tok_s']:.0f} tok/s" if sv["tok_s"] else ""))
        if sv is not None and sv["served"]:
            caption += f"; {sv['served']} requests served"
    t = Table(title="dllp2p cluster", caption=_text(f"{caption} ({hint})" if hint and not error else caption))
    for col in ("node", "role", "address", "version", "started", "slice", "cores / RAM", "rss", "load",
                "rtt", "weights", "last tok/s"):
        t.add_column(col, no_wrap=col in ("node", "role", "address"))
    if s is None:
        return t
    plan = s.plan()
    j = to_json(s)
    for row in j["nodes"]:
        sl, step = row["slice"], row["last_step"]
        push = row["push"]
        if sl is not None and sl["index"] == 0 and j["push"] is not None:  # the plan's root: what it sent
            push = {**j["push"], "sent": True}
        t.add_row(
            _text(row["id"] + ("" if row["reachable"] else " (unreachable)")
                  + ("" if row["left_out"] is None else f" (left out: {_left_why(row['left_out'])})")),
            "[bold]root[/bold]" if row["role"] == "root" else _text(row["role"]),
            _text(row["address"]),
            str(row["version"]),
            f"{time.strftime('%H:%M:%S', time.localtime(row['started_at']))} ({_age(now - row['started_at'])} ago)",
            "-" if sl is None else (f"{sl['index']}/{plan.n_nodes if plan else '?'} "
                                    + ("" if sl["layers"] is None else f"layers {_r(sl['layers'])} ")
                                    + f"kv {_r(sl['kv_heads'])} ffn {_r(sl['ffn_rows'])} vocab {_r(sl['vocab_rows'])}"),
            f"{row['cores']} / {row['ram'] / 2**30:.1f} GiB",
            "-" if row["rss"] is None else _bytes(row["rss"]),
            "-" if row["load"] is None else f"{row['load']:.2f} ({100 * row['load_per_core']:.0f}%)",
            _rtt(row),
            _weights(push),
            "-" if step is None else (f"{step['tokens_per_s']:.1f} (compute {step['compute_ms']:.1f} ms, "
                                      f"sync {step['sync_ms']:.1f} ms)"),
        )
    return t


def _recoveries(r: dict[str, Any], now: float) -> str:
    """The caption's recovery line: how many requests lost a node and went on, the latest's cause and pause."""
    last = r["last"]
    if last is None:
        return ""
    return (f"; {r['count']} recover{'y' if r['count'] == 1 else 'ies'}, the last {_age(now - last['at'])} ago: "
            f"{last['cause']} ({last['nodes_before']} -> {last['nodes_after']} nodes, paused {last['pause_s']:.2f} s)")


def _text(peer_text: str):
    """What a peer said (node id, address, role, its error), for a cell: never rich markup, no control
    characters (textsafe)."""
    from rich.text import Text

    return Text(printable(peer_text))


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _rtt(row: dict[str, Any]) -> str:
    """The asked daemon's poll round-trip to the node, and this command's ("you")."""
    parts = [] if row["rtt_ms"] is None else [f"{row['rtt_ms']:.1f} ms"]
    if row["status_rtt_ms"] is not None:
        parts.append(f"you {row['status_rtt_ms']:.1f} ms")
    return ", ".join(parts) or "-"


def _weights(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    if p.get("sent"):
        return f"sent {p['done'] / 1e6:.1f}/{p['total'] / 1e6:.1f} MB ({100 * p['fraction']:.0f}%)"
    if p["finished"]:
        return f"done ({p['total'] / 1e6:.1f} MB)" if p["total"] else "cached"
    return f"{p['done'] / 1e6:.1f}/{p['total'] / 1e6:.1f} MB ({100 * p['fraction']:.0f}%)"


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


def watch(address: str, interval: float = 1.0, timeout: float = 2.0, keys: TextIO | None = None, *,
          key: ClusterKey | None = None) -> int:
    """Redraw the table every `interval` seconds until `q` (read from `keys`, the terminal: stdin when it
    is one) or Ctrl-C (KeyboardInterrupt propagates). -> 0 after q. `key`: the cluster key to ask with."""
    from rich.console import Console
    from rich.live import Live

    keys = keys if keys is not None else (sys.stdin if sys.stdin.isatty() else None)
    hint = "q: quit" if keys is not None else "Ctrl-C: quit"
    with _cbreak(keys), Live(table(None, f"asking {address}... ({hint})"), console=Console(), auto_refresh=False,
                             screen=False) as live:
        while True:
            try:
                live.update(table(survey(address, timeout, key=key), hint=hint), refresh=True)
            except StatusError as e:
                live.update(table(None, f"{e} ({hint})"), refresh=True)
            if _wait_for_q(keys, interval):
                return 0


@contextlib.contextmanager
def _cbreak(keys: TextIO | None) -> Iterator[None]:
    """Keys arrive one by one, unechoed, while the view runs (the terminal restored after)."""
    if keys is None:
        yield
        return
    import termios  # POSIX terminals only, and only for the live view
    import tty

    fd = keys.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_q(keys: TextIO | None, seconds: float) -> bool:
    """Sleep `seconds`, or less: -> True as soon as q (or Q) is typed."""
    if keys is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([keys], [], [], left)
        if ready and os.read(keys.fileno(), 1) in (b"q", b"Q"):
            return True
    return False


def _left_why(left: dict) -> str:
    """Why the root plans without a node, in a few words: its CPU wait as measured, else its error code."""
    return left["reason"] if left["code"] == "cpu_wait" else left["code"].replace("_", " ")
