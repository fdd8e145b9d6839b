"""What a daemon answers a Status with: its membership with roles, the plan it serves, its last step, its
weight push, its latest set-up's progress as root, its process's and machine's resources, read
from /proc when it answers (with its measured figures), and the plans its latest prompt priced."""

from __future__ import annotations

import os
import re
from dataclasses import replace

from ..wire.reports import LeftOut, NodeStatus, ProgressStatus, RecoveryStatus, Resources, StatusReply
from ..session.autoplan import NodeFacts
from .membership import Membership


def status_reply(seq: int, membership: Membership, worker, root_service, measured=None) -> StatusReply:  # noqa: ANN001
    """What this daemon knows now: compatible members in succession order, root first. `worker`: its
    session.worker.Worker; `root_service`: its session.service.RootService."""
    m = membership
    e = m.election()
    nodes = tuple(NodeStatus(x, e.role(x.node_id), tuple(sorted(m.members[x.node_id].sources)),
                             m.members[x.node_id].last_seen) for x in e.succession)
    active = worker.active
    the_plan = active.plan if active else root_service.last_plan
    listed = {n.member.node_id for n in nodes}
    links = tuple(m.link_rtt[n] for n in sorted(m.link_rtt) if n in listed)
    progress = tuple(ProgressStatus(p.task, p.subject, p.done, p.total) for p in root_service.progress.progress.values())
    left_out = tuple(LeftOut(x.node_id, x.address, str(x.code), x.reason, x.until) for x in root_service.left_out_now())
    res = resources(m.me.cores if m.me else 1, m.me.ram if m.me else 0)
    if measured is not None:  # daemon/figures.Measured
        res = replace(res, gbps=max(0.0, measured.gbps), disk_gbps=max(0.0, measured.disk_gbps))
    others = []  # the other members, for a root's plan preview: their poll round trip, speed unknown yet
    if e.root is not None and e.root.node_id == m.node_id:
        rtts = {x.node_id: x.rtt_ms for x in links}
        others = [NodeFacts(x.member.node_id, 1.0, rtt_ms=rtts.get(x.member.node_id, 0.0)) for x in nodes
                  if x.member.node_id != m.node_id]
    estimates = root_service.plan_estimates(others) if hasattr(root_service, "plan_estimates") else ()
    r = root_service.last_recovery
    last = None if r is None else RecoveryStatus(r.cause[:300], r.pause_s, r.replayed, r.nodes_before,
                                                 r.nodes_after, r.at)
    return StatusReply(seq, m.node_id, nodes, the_plan, worker.last_step, worker.sessions, res, links, worker.push,
                       progress, left_out, estimates, root_service.recoveries, last, rate=worker.meter.rate, wait_ms=worker.meter.wait_ms,
                       serving=root_service.batching.serving())


def resources(cores: int, ram: int) -> Resources:
    """This process's RSS and the machine's available RAM and load, now (0 where /proc cannot tell)."""
    rss = available = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # POSIX only: where /proc is missing

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
            available = int(found.group(1)) * 1024 if found else 0
    except OSError:
        pass
    try:
        load = max(0.0, os.getloadavg()[0])
    except OSError:
        load = 0.0
    return Resources(max(0, rss), max(0, ram), available, load, max(1, cores))
