"""Same-run A/B of how the compiled step shares work: chunks taken dynamically vs one static piece per thread.

    python3 -m dllp2p.jit.bench_share [--model PATH] [--threads 2] [--tokens 64] [--runs 7] [--spins N]

Builds two JIT engines of the model in one process (ProgramSpec.dynamic True and False; ir_share.py),
prefills the same prompt in both, then alternates decode runs of --tokens steps between them, and prints
tokens/s (median over --runs) of each and their ratio. --spins sets the barriers' spin limit before a
waiter sleeps (0: ir_barrier.SPINS_BEFORE_SLEEP) in both. Between runs the idle engine's workers are
given time to go to sleep, so the two do not share the cores. To see a busy device, start a CPU hog on
one core first (`taskset -c 1 python3 -c 'while True: pass' &`) and compare --threads 2 with --threads 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..formats import load_model
from ..models import default_model_path
from .engine import JITEngine
from .ir_barrier import SPINS

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
    ap.add_argument("--spins", type=int, default=0)
    args = ap.parse_args(argv)
    model = load_model(args.model or default_model_path())
    prompt = list(range(10, 42))
    ctx = len(prompt) + args.tokens + 1
    engines = {name: JITEngine(model, ctx, threads=args.threads, dynamic=name == "dynamic")
               for name in ("static", "dynamic")}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for e in engines.values():
            e._bufs["barrier"][SPINS // 8] = args.spins
            e.forward(prompt, 0)
            decode_rate(e, len(prompt), 4)  # warm up
        for _ in range(args.runs):
            for name, e in engines.items():
                time.sleep(SETTLE_S)
                rates[name].append(decode_rate(e, len(prompt), args.tokens))
    finally:
        for e in engines.values():
            e.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.threads} threads, {args.tokens} decode steps per run, median of {args.runs} runs (alternating):")
    for name, r in rates.items():
        print(f"  {name:8s}: {med[name]:8.1f} tok/s   runs: {' '.join(f'{x:.0f}' for x in r)}")
    print(f"  dynamic / static: {med['dynamic'] / med['static']:.3f}")


if __name__ == "__main__":
    main()
