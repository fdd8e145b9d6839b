"""`dllp2p bench --load`: decode speed with a CPU hog pinned to one core, per thread count, in one run.

    dllp2p bench --load [--model PATH] [--tokens N] [--repeats R] [--json]

What it does (issue 19's acceptance):

    hog      a child process spinning on the last CPU of this process's mask (os.sched_setaffinity in
             the child); killed when the benchmark ends, on Ctrl-C and on errors too, and it ends by
             itself when this process is gone or after HOG_MAX_S
    loaded   with the hog running: the default thread count is chosen as `dllp2p run` would
             (jit/cpus.py, the load measured now), then decode runs alternate over the engines of
             the default count, 1 thread and 2 threads (each count's engine built once: the default
             shares the engine of the count it chose)
    quiet    the hog stopped: the default count chosen again, against today's fixed default (one
             thread per core of the mask), alternating the same way

Printed: each count's median decode tok/s and the ratios default / best fixed count and default /
1 thread (the acceptance: >= 0.9 and >= 1.0), then quiet default / today's. Timings on a machine that
other programs use are noisy: compare ratios within one run, not figures across runs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

from ..formats import load_model
from ..jit.cpus import affinity_set, choose_threads, read_cpu_facts
from ..models import resolve_model

HOG_MAX_S = 900.0  # a hog outlives no benchmark by more than this, whatever happens to its parent
HOG_START_S = 0.3  # before the load is measured: the hog is running flat out by then
WARMUP_STEPS = 4

# the child: pin itself, spin; stop when the parent is gone or after HOG_MAX_S
HOG = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
parent, end, x = os.getppid(), time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100000):
        x += 1
"""


@contextmanager
def cpu_hog(cpu: int, max_s: float = HOG_MAX_S) -> Iterator[subprocess.Popen]:
    """A process spinning on CPU `cpu` while the block runs; killed (and reaped) when it leaves."""
    child = subprocess.Popen([sys.executable, "-c", HOG, str(cpu), str(max_s)], stdin=subprocess.DEVNULL)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@dataclass(frozen=True)
class LoadRow:
    phase: str  # "loaded" | "quiet"
    label: str  # "default" | "1" | "2" | "today"
    threads: int
    decode_tok_s: float  # median over the runs
    runs: tuple[float, ...]


def alternate(engines: dict[int, Any], prompt: list[int], tokens: int, repeats: int,
              timed: Callable[..., Any]) -> dict[int, list[float]]:
    """Decode tok/s per thread count: one warm-up, then `repeats` rounds of one run per engine in turn."""
    for e in engines.values():
        timed(e, prompt, WARMUP_STEPS)
    out: dict[int, list[float]] = {n: [] for n in engines}
    for _ in range(repeats):
        for n, e in engines.items():
            out[n].append(timed(e, prompt, tokens).decode_tok_s())
    return out


def measure(make: Callable[[int], Any], prompt: list[int], tokens: int, repeats: int, timed: Callable[..., Any],
            labels: dict[str, int], phase: str) -> list[LoadRow]:
    """One engine per distinct count in labels (label -> threads), alternated; -> a row per label."""
    counts = sorted(set(labels.values()))
    engines: dict[int, Any] = {}
    try:
        for n in counts:
            engines[n] = make(n)
        speeds = alternate(engines, prompt, tokens, repeats, timed)
    finally:
        for e in engines.values():
            e.close()
    return [LoadRow(phase, label, n, statistics.median(speeds[n]), tuple(speeds[n])) for label, n in labels.items()]


def ratios(rows: list[LoadRow]) -> dict[str, float]:
    """default / best fixed count and default / 1 thread (loaded), default / today's (quiet)."""
    by = {(r.phase, r.label): r.decode_tok_s for r in rows}
    out = {}
    if ("loaded", "default") in by:
        fixed = [v for (phase, label), v in by.items() if phase == "loaded" and label != "default"]
        out["loaded_default_vs_best"] = by["loaded", "default"] / max(fixed)
        out["loaded_default_vs_1"] = by["loaded", "default"] / by["loaded", "1"]
    if ("quiet", "default") in by:
        out["quiet_default_vs_today"] = by["quiet", "default"] / by["quiet", "today"]
    return out


@dataclass(frozen=True)
class BenchTools:
    """What bench.py lends: make_engine(kind, model, ctx, threads, cache_dir), prompt_ids(model, n),
    timed_run(engine, prompt, steps) -> bench.RunResult."""

    make_engine: Callable[..., Any]
    prompt_ids: Callable[[Any, int], list[int]]
    timed_run: Callable[..., Any]


def run_load_bench(cfg: Any, tools: BenchTools, err: TextIO = sys.stderr) -> dict[str, Any]:
    """The whole --load benchmark (cfg: bench.BenchConfig; its engine, model, tokens, repeats)."""
    make_engine, prompt_ids, timed_run = tools.make_engine, tools.prompt_ids, tools.timed_run
    path = resolve_model(cfg.model)
    model = load_model(path)
    prompt = prompt_ids(model, min(cfg.prompt_tokens, 32))
    ctx = len(prompt) + cfg.tokens + WARMUP_STEPS

    def make(n: int) -> Any:
        return make_engine(cfg.engine, model, ctx, n, cfg.cache_dir)

    mask = sorted(affinity_set() or range(os.cpu_count() or 1))
    today = len(mask)
    rows: list[LoadRow] = []
    with cpu_hog(mask[-1]):
        time.sleep(HOG_START_S)
        loaded = choose_threads(read_cpu_facts())
        print(f"dllp2p: hog on CPU {mask[-1]}; default {loaded.reason}", file=err)
        rows += measure(make, prompt, cfg.tokens, cfg.repeats, timed_run,
                        {"default": loaded.threads, "1": 1, "2": 2}, "loaded")
    time.sleep(HOG_START_S)
    quiet = choose_threads(read_cpu_facts())
    print(f"dllp2p: no hog; default {quiet.reason}", file=err)
    rows += measure(make, prompt, cfg.tokens, cfg.repeats, timed_run, {"default": quiet.threads, "today": today},
                    "quiet")
    return {"model": str(path), "engine": cfg.engine, "tokens": cfg.tokens, "repeats": cfg.repeats,
            "hog_cpu": mask[-1], "loaded_reason": loaded.reason, "quiet_reason": quiet.reason,
            "rows": [r.__dict__ | {"runs": list(r.runs)} for r in rows], **ratios(rows)}


def format_load_report(r: dict[str, Any]) -> str:
    lines = [f"model      {r['model']}, {r['engine']}, decode {r['tokens']} tokens, median of {r['repeats']} run(s)"]
    for row in r["rows"]:
        name = {"default": "default", "today": "today's"}.get(row["label"], f"--threads {row['label']}")
        runs = " ".join(f"{v:.1f}" for v in row["runs"])
        lines.append(f"{row['phase']:<10} {name:<12} {row['threads']} thread(s): {row['decode_tok_s']:.1f} tok/s "
                     f"(runs {runs})")
    if "loaded_default_vs_best" in r:
        lines.append(f"ratio      hog on CPU {r['hog_cpu']}: default / best fixed {r['loaded_default_vs_best']:.2f}x "
                     f"(acceptance >= 0.9), default / --threads 1 {r['loaded_default_vs_1']:.2f}x (>= 1.0)")
    if "quiet_default_vs_today" in r:
        lines.append(f"ratio      no hog: default / today's {r['quiet_default_vs_today']:.2f}x")
    return "\n".join(lines)


def main(cfg: Any, tools: BenchTools, out: TextIO, err: TextIO) -> int:
    """--load's report on out (text or JSON). Ctrl-C ends it (and its hog) with the usual 130."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill ends it through the hog's finally
    try:
        report = run_load_bench(cfg, tools, err)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(report) if cfg.json else format_load_report(report), file=out)
    return 0
