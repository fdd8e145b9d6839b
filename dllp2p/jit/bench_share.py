"""Same-run A/B of how the compiled step shares work: chunks taken dynamically vs one static piece per thread.

    python3 -m dllp2p.jit.bench_share [--model PATH] [--threads 2] [--tokens 64] [--runs 7] [--spins 100,1000]

Builds three JIT engines of the model in one process: --threads threads with chunks taken dynamically
and with one static piece per thread (ProgramSpec.dynamic; ir_share.py), and one thread; prefills the
same prompt in each, then alternates decode runs of --tokens steps between them, and prints tokens/s
(median over --runs) of each and the ratios. --spins 100,1000,4000 runs the threaded engines at each of
those barrier spin limits (pause iterations before a waiter sleeps; 0: ir_barrier.SPINS_BEFORE_SLEEP).
Between runs the idle engines' workers are given time to go to sleep, so they do not share the cores.
To see a busy device, start a CPU hog on one core first (`taskset -c 1 python3 -c 'while True: pass' &`).
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..formats import load_model
from ..models import default_model_path
from .engine import JITEngine
from .ir_barrier import SPINS, SPINS_BEFORE_SLEEP

SETTLE_S = 0.05  # > the ~10 ms an idle worker spins (ir_barrier.IDLE_SPINS) before it sleeps


def decode_rate(engine: JITEngine, start: int, tokens: int) -> float:
    """Tokens/s of `tokens` greedy decode steps from position start (the cache holds the prompt)."""
    tok = 1
    t0 = time.perf_counter()
    for i in range(tokens):
        tok = int(engine.forward([tok], start + i).argmax())
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--spins", default="0", help="comma-separated spin limits to try (0: the default)")
    args = ap.parse_args(argv)
    model = load_model(args.model or default_model_path())
    prompt = list(range(10, 42))
    ctx = len(prompt) + args.tokens + 1
    engines = {"1 thread": JITEngine(model, ctx, threads=1)}
    for name in ("static", "dynamic"):
        engines[name] = JITEngine(model, ctx, threads=args.threads, dynamic=name == "dynamic")
    limits = [int(x) for x in args.spins.split(",")]
    cases = [("1 thread", 0)] + [(name, s) for s in limits for name in ("static", "dynamic")]
    rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    try:
        for e in engines.values():
            e.forward(prompt, 0)
            decode_rate(e, len(prompt), 4)  # warm up
        for _ in range(args.runs):
            for name, spins in cases:
                e = engines[name]
                e._bufs["barrier"][SPINS // 8] = spins
                time.sleep(SETTLE_S)
                rates[name, spins].append(decode_rate(e, len(prompt), args.tokens))
    finally:
        for e in engines.values():
            e.close()
    med = {case: statistics.median(r) for case, r in rates.items()}
    print(f"{args.tokens} decode steps per run, median of {args.runs} runs (alternating), tok/s:")
    for (name, spins), r in rates.items():
        label = name if name == "1 thread" else f"{args.threads} threads {name}, spins {spins or SPINS_BEFORE_SLEEP}"
        extra = "" if name != "dynamic" else f"   dynamic / static {med[name, spins] / med['static', spins]:.3f}"
        print(f"  {label:36s} {med[name, spins]:8.1f}   x{med[name, spins] / med['1 thread', 0]:.2f} of 1 thread"
              f"{extra}   runs: {' '.join(f'{x:.0f}' for x in r)}")


if __name__ == "__main__":
    main()
