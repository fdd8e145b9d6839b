"""`dllp2p bench --load` (dllp2p/commands/bench_load.py): the hog is pinned and always killed; engines are
alternated, one per distinct thread count; the ratios are the acceptance's. Fake engines: no timing here."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from dllp2p.commands import bench_load


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_hog_is_pinned_and_killed():
    cpu = max(os.sched_getaffinity(0))
    with bench_load.cpu_hog(cpu) as child:
        deadline = time.monotonic() + 10
        while os.sched_getaffinity(child.pid) != {cpu} and time.monotonic() < deadline:
            time.sleep(0.02)  # it pins itself once python has started
        assert os.sched_getaffinity(child.pid) == {cpu} and child.poll() is None
    assert child.returncode is not None  # killed and reaped on the way out
    with pytest.raises(RuntimeError), bench_load.cpu_hog(cpu, max_s=5) as child:
        raise RuntimeError("the benchmark failed")
    assert child.returncode is not None  # an error kills it too


@dataclass
class _Run:
    tok_s: float

    def decode_tok_s(self) -> float:
        return self.tok_s


class _Engine:
    def __init__(self, threads: int, log: list):
        self.threads, self.log, self.closed = threads, log, False

    def close(self) -> None:
        self.closed = True


def test_measure_alternates_one_engine_per_count():
    log: list[int] = []
    made: list[_Engine] = []

    def make(n: int) -> _Engine:
        made.append(_Engine(n, log))
        return made[-1]

    def timed(engine: _Engine, prompt, steps):
        log.append(engine.threads)
        return _Run(10.0 * engine.threads if steps > bench_load.WARMUP_STEPS else 0.0)

    rows = bench_load.measure(make, [1, 2], 8, 3, timed, {"default": 1, "1": 1, "2": 2}, "loaded")
    assert [e.threads for e in made] == [1, 2] and all(e.closed for e in made)  # the default shares count 1's
    assert log == [1, 2] + [1, 2] * 3  # warm-up, then alternating rounds
    assert [(r.label, r.threads, r.decode_tok_s) for r in rows] == [("default", 1, 10.0), ("1", 1, 10.0), ("2", 2, 20.0)]
    quiet = bench_load.measure(make, [1], 8, 1, timed, {"default": 1, "today": 2}, "quiet")
    r = bench_load.ratios(rows + quiet)
    assert r == {"loaded_default_vs_best": 0.5, "loaded_default_vs_1": 1.0, "quiet_default_vs_today": 0.5}
    text = bench_load.format_load_report({"model": "m", "engine": "jit", "tokens": 8, "repeats": 3, "hog_cpu": 1,
                                          "rows": [x.__dict__ for x in rows + quiet], **r})
    assert "default / best fixed 0.50x" in text and "--threads 2  2 thread(s): 20.0 tok/s" in text


def test_engines_are_closed_when_one_fails():
    made: list[_Engine] = []

    def make(n: int) -> _Engine:
        if n == 2:
            raise MemoryError("no room for a second engine")
        made.append(_Engine(n, []))
        return made[-1]

    with pytest.raises(MemoryError):
        bench_load.measure(make, [1], 4, 1, lambda e, p, s: _Run(1.0), {"1": 1, "2": 2}, "loaded")
    assert made and all(e.closed for e in made)
