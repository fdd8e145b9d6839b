"""How many compute threads this process should use: the cores it may run on, less what others use.

    facts = read_cpu_facts()                  # the thin reader: affinity, cgroup quota, /proc/stat
    choice = choose_threads(facts)            # pure: -> ThreadChoice(threads, reason)
    threads, warning = cap_threads(64, facts) # a count asked for, capped to the cores available

The step's threads meet at barriers hundreds of times a token (jit/ir_barrier.py), so a thread that
the kernel deschedules holds up all the others: one thread per core that is really free is faster than
one per core that exists (issue 19: 2 threads on a 2-core machine with a busy core decoded at 5 tok/s,
1 thread at 75+). The facts, in the order they cap the count:

    affinity    len(os.sched_getaffinity(0)): the cores this process may run on (taskset, cpusets)
    quota       cgroup v2 cpu.max "QUOTA PERIOD" (or v1 cfs_quota_us / cfs_period_us): cores' worth of
                CPU time the container may use, rounded up (1.5 -> 2; "max" or -1: no limit)
    busy        cores' worth of CPU time other programs used while it was measured: /proc/stat's
                non-idle time of the mask's CPUs over BUSY_SAMPLE_S at start-up, less this process's own

A core counts as taken when others keep it more than BUSY_SHARE busy; at least one thread always.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_SAMPLE_S = 0.1  # how long start-up watches /proc/stat
BUSY_SHARE = 0.5  # a core that others keep busier than this is not counted as free


@dataclass(frozen=True)
class CpuFacts:
    """What the reader found (None: could not tell)."""

    affinity: int  # cores this process may run on, >= 1
    quota: float | None = None  # cgroup CPU quota in cores (cpu.max quota / period); None: no limit
    busy: float | None = None  # cores' worth of CPU time others used while measured (0 .. affinity)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line: which fact set the count


def choose_threads(f: CpuFacts) -> ThreadChoice:
    """The default thread count: the affinity mask, capped by the cgroup quota, less the cores that
    other programs keep busy (each more than BUSY_SHARE of a core); at least 1."""
    n = max(1, f.affinity)
    why = [f"{n} core{'s' if n != 1 else ''} in the affinity mask"]
    if f.quota is not None and math.ceil(f.quota - 1e-9) < n:
        n = max(1, math.ceil(f.quota - 1e-9))
        why.append(f"cgroup CPU quota {f.quota:g} cores")
    if f.busy is not None:
        taken = math.floor(min(f.busy, n) + (1 - BUSY_SHARE))  # 0.6 busy -> 1 core taken, 0.4 -> none
        if taken:
            n = max(1, n - taken)
            why.append(f"{f.busy:.1f} cores busy with other programs")
        else:
            why.append(f"{f.busy:.1f} cores busy with others")
    return ThreadChoice(n, ", ".join(why) + f": {n} thread{'s' if n != 1 else ''}")


def cap_threads(asked: int, f: CpuFacts) -> tuple[int, str | None]:
    """A thread count asked for (--threads, config), capped to the cores this process can get (affinity,
    quota: not the load, which comes and goes). -> (threads, the one-line warning when capped, else None)."""
    most = max(1, f.affinity)
    if f.quota is not None:
        most = min(most, max(1, math.ceil(f.quota - 1e-9)))
    if asked <= most:
        return asked, None
    return most, (f"{asked} threads asked for, but this process can use {most} core{'s' if most != 1 else ''}: "
                  f"using {most} (more threads than cores wait for each other at every barrier)")


# --- the reader (Linux /proc and /sys; elsewhere what os tells) ---------------------------------------


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max ("max 100000" or "150000 100000") -> cores, None: no limit."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us -> cores, None: no limit (-1)."""
    quota, period = int(quota_text), int(period_text)
    return quota / period if quota > 0 and period > 0 else None


def cgroup_dirs(proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The directories whose CPU limits apply to this process, innermost first: its own cgroup and each
    parent (a limit set anywhere above holds too). v2 ("0::/a/b") and v1's cpu controller ("3:cpu,cpuacct:/a")."""
    dirs: list[Path] = []
    for line in proc_self_cgroup.splitlines():
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and controllers == "":
            base = root
        elif "cpu" in controllers.split(","):
            base = next((root / d for d in ("cpu,cpuacct", "cpu") if (root / d).is_dir()), root / "cpu")
        else:
            continue
        rel = Path(path.strip() or "/").relative_to("/")
        for depth in range(len(rel.parts), -1, -1):
            dirs.append(base.joinpath(*rel.parts[:depth]))
    return dirs


def read_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota over this process's cgroups, in cores; None: none found or readable."""
    try:
        dirs = cgroup_dirs(Path("/proc/self/cgroup").read_text(), root)
    except OSError:
        return None
    found = []
    for d in dirs:
        try:
            if (d / "cpu.max").is_file():
                found.append(parse_cpu_max((d / "cpu.max").read_text()))
            elif (d / "cpu.cfs_quota_us").is_file():
                found.append(parse_cfs((d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError):
            continue
    limits = [q for q in found if q is not None]
    return min(limits) if limits else None


def parse_proc_stat(text: str, cpus: frozenset[int] | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks since boot of the CPUs in `cpus` (None: all), from /proc/stat's cpuN
    lines (idle and iowait are not busy; guest time is already in user)."""
    busy = total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        f = [int(x) for x in rest.split()[:8]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        busy, total = busy + sum(f) - idle, total + sum(f)
    return busy, total


def busy_between(before: tuple[int, int], after: tuple[int, int], own: int, cpus: int) -> float:
    """Cores' worth of CPU time others used between two readings (busy, total ticks) of `cpus` CPUs,
    less `own` ticks of this process: (busy delta - own) / total delta x cpus."""
    total = after[1] - before[1]
    if total <= 0:
        return 0.0
    return min(float(cpus), max(0.0, (after[0] - before[0] - own) / total * cpus))


def _own_ticks() -> int:
    """This process's user + system clock ticks (all its threads); 0 where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return 0


def measure_busy(seconds: float = BUSY_SAMPLE_S, cpus: frozenset[int] | None = None) -> float | None:
    """Cores' worth of CPU time other programs used on `cpus` (this process's mask) over `seconds`
    (this process sleeps meanwhile); None where /proc/stat cannot tell."""
    try:
        with open("/proc/stat") as f:
            a, own_a = parse_proc_stat(f.read(), cpus), _own_ticks()
        time.sleep(seconds)
        with open("/proc/stat") as f:
            b, own_b = parse_proc_stat(f.read(), cpus), _own_ticks()
    except (OSError, ValueError):
        return None
    return busy_between(a, b, own_b - own_a, len(cpus) if cpus else (os.cpu_count() or 1))


def affinity_set() -> frozenset[int] | None:
    """The CPUs this process may run on; None where the OS cannot tell."""
    try:
        return frozenset(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


def read_cpu_facts(measure_load: bool = True) -> CpuFacts:
    """The facts of this process now; measure_load: watch /proc/stat for BUSY_SAMPLE_S (it sleeps)."""
    mask = affinity_set()
    n = len(mask) if mask else (os.cpu_count() or 1)
    return CpuFacts(n, read_quota(), measure_busy(BUSY_SAMPLE_S, mask) if measure_load else None)
