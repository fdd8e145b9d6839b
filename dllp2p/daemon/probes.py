"""What a daemon answers a Status with: its membership with roles, the plan it serves, its last step, its
weight push, its latest set-up's progress as root, and its process's and machine's resources, read
from /proc when it answers."""

from __future__ import annotations

import os
import re

from ..wire.reports import LeftOut, NodeStatus, ProgressStatus, Resources, StatusReply
from .membership import Membership


def status_reply(seq: int, membership: Membership, worker, root_service) -> StatusReply:  # noqa: ANN001
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
    return StatusReply(seq, m.node_id, nodes, the_plan, worker.last_step, worker.sessions,
                       resources(m.me.cores if m.me else 1, m.me.ram if m.me else 0), links, worker.push, progress,
                       left_out, root_service.batching.serving())


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
