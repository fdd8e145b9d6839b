"""The default thread count (dllp2p/jit/cpus.py): a pure choice over the facts (affinity mask, cgroup quota,
the load measured at start-up), tested with made-up facts and files; `--threads` beyond the cores capped
with a warning (cli.asked_threads)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from dllp2p.cli import asked_threads
from dllp2p.jit.cpus import (
    CpuFacts, busy_between, cap_threads, cgroup_dirs, choose_threads, parse_cfs, parse_cpu_max, parse_proc_stat,
    read_cpu_facts, read_quota,
)


@pytest.mark.parametrize("facts, threads, says", [
    (CpuFacts(2), 2, "2 cores in the affinity mask"),
    (CpuFacts(2, busy=0.0), 2, "0.0 cores busy"),
    (CpuFacts(2, busy=0.3), 2, "0.3 cores busy"),  # a little load: both cores still worth using
    (CpuFacts(2, busy=1.0), 1, "1.0 cores busy with other programs"),  # a hog on one core (issue 19)
    (CpuFacts(2, busy=0.6), 1, "0.6 cores busy"),
    (CpuFacts(2, busy=2.0), 1, ""),  # never below one
    (CpuFacts(8, busy=2.7), 5, ""),  # 2.7 cores taken -> 3 of 8
    (CpuFacts(8, quota=1.5), 2, "quota 1.5"),  # a container of 1.5 CPUs: 2 threads
    (CpuFacts(8, quota=4.0, busy=1.0), 3, "quota 4"),
    (CpuFacts(4, quota=16.0), 4, ""),  # a quota above the mask changes nothing
    (CpuFacts(1), 1, "1 core in"),
])
def test_choose_threads(facts, threads, says):
    choice = choose_threads(facts)
    assert choice.threads == threads
    assert says in choice.reason and choice.reason.endswith(f"{threads} thread{'s' if threads > 1 else ''}")


@pytest.mark.parametrize("asked, facts, threads, warned", [
    (64, CpuFacts(2), 2, True),
    (2, CpuFacts(2), 2, False),
    (1, CpuFacts(2, busy=2.0), 1, False),
    (2, CpuFacts(2, busy=2.0), 2, False),  # the load does not cap what was asked for: it comes and goes
    (4, CpuFacts(8, quota=2.5), 3, True),
])
def test_cap_threads(asked, facts, threads, warned):
    got, warning = cap_threads(asked, facts)
    assert got == threads and (warning is not None) == warned
    if warned:
        assert f"{asked} threads asked for" in warning and "\n" not in warning


def test_asked_threads_warns_in_one_line():
    err = io.StringIO()
    assert asked_threads(64, err, CpuFacts(2)) == 2
    assert err.getvalue().count("\n") == 1 and "warning: 64 threads" in err.getvalue()
    assert asked_threads(None, err, CpuFacts(2)) is None
    with pytest.raises(ValueError):
        asked_threads(0, err, CpuFacts(2))


def test_cgroup_files(tmp_path: Path):
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cfs("-1", "100000") is None and parse_cfs("50000", "100000") == 0.5
    # v2: the process's own cgroup and every parent, innermost first
    assert cgroup_dirs("0::/user.slice/app\n", tmp_path) == [tmp_path / "user.slice/app", tmp_path / "user.slice", tmp_path]
    (tmp_path / "cpu").mkdir()
    assert cgroup_dirs("4:memory:/x\n1:cpu:/box\n", tmp_path) == [tmp_path / "cpu/box", tmp_path / "cpu"]
    # read_quota reads this process's /proc/self/cgroup: make its directories carry limits
    dirs = cgroup_dirs(Path("/proc/self/cgroup").read_text(), tmp_path)
    assert read_quota(tmp_path) is None  # no files: no limit
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    (dirs[-1] / "cpu.max").write_text("300000 100000\n")
    assert read_quota(tmp_path) == 3.0  # a parent's limit holds
    (dirs[0] / "cpu.max").write_text("250000 100000\n")
    assert read_quota(tmp_path) == 2.5  # the tightest one


def test_busy_from_proc_stat():
    before = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 0 5 50 0 0 0 0 0 0\ncpu1 5 0 5 50 0 0 0 0 0 0\nintr 1\n"
    # 10 ticks later: cpu0 spent all of them busy (a hog), cpu1 idle
    after = "cpu  20 0 10 110 0 0 0 0 0 0\ncpu0 15 0 5 50 0 0 0 0 0 0\ncpu1 5 0 5 60 0 0 0 0 0 0\nintr 1\n"
    a, b = parse_proc_stat(before), parse_proc_stat(after)
    assert busy_between(a, b, 0, 2) == 1.0
    assert busy_between(a, b, 5, 2) == 0.5  # half of it was this process's own
    only1 = frozenset({1})
    assert busy_between(parse_proc_stat(before, only1), parse_proc_stat(after, only1), 0, 1) == 0.0
    assert choose_threads(CpuFacts(2, busy=busy_between(a, b, 0, 2))).threads == 1


def test_reader_on_this_machine():
    f = read_cpu_facts(measure_load=True)
    assert f.affinity >= 1 and (f.busy is None or 0 <= f.busy <= f.affinity)
    assert 1 <= choose_threads(f).threads <= f.affinity
