"""Same-run A/B of the decode kernels' weight prefetch: into L1 everywhere (as before) vs this version's.

    python3 -m dllp2p.jit.bench_prefetch [--model PATH] [--threads 1] [--prompt-tokens 128] [--tokens 16] [--passes 16]

Builds two JIT engines of the model in one process, their programs compiled with the prefetch settings
of ir_dot.py and ir_matvec_extra.py set for each while it is built (the module constants
PREFETCH_LOCALITY_STREAM_X86 and SUPER_BLOCK_PREFETCH: read when the IR is emitted, never at run time;
each variant's program is cached under its own key):

    l1     prefetcht0 for every chunk, K-quant super-blocks too (the kernels before the change)
    l2     prefetcht1 for the decode kernels' chunks, none for K-quant super-blocks (the default now)

Each pass runs, for each engine in turn (the order swaps every pass), a prefill of --prompt-tokens ids
and --tokens decode steps after it; printed: median tok/s of each and the median of the per-pass
ratios l2 / l1 (a busy machine slows both engines of a pass alike; two separate medians would not be).
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..formats import load_model
from ..models import default_model_path
from . import ir_dot, ir_matvec_extra
from .engine import JITEngine

VARIANTS = {"l1": (3, True), "l2": (ir_dot.PREFETCH_LOCALITY_STREAM_X86, ir_matvec_extra.SUPER_BLOCK_PREFETCH)}


def build(model, ctx: int, threads: int, name: str) -> JITEngine:
    """An engine whose program was emitted with variant `name`'s settings (restored afterwards)."""
    saved = ir_dot.PREFETCH_LOCALITY_STREAM_X86, ir_matvec_extra.SUPER_BLOCK_PREFETCH
    ir_dot.PREFETCH_LOCALITY_STREAM_X86, ir_matvec_extra.SUPER_BLOCK_PREFETCH = VARIANTS[name]
    try:
        keyed = type(f"PrefetchEngine_{name}", (JITEngine,), {"_program_key": lambda self: f"prefetch-ab:{name}"})
        return keyed(model, ctx, threads)
    finally:
        ir_dot.PREFETCH_LOCALITY_STREAM_X86, ir_matvec_extra.SUPER_BLOCK_PREFETCH = saved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--passes", type=int, default=16)
    args = ap.parse_args(argv)
    model = load_model(args.model or default_model_path())
    prompt = [(i * 7919) % 20000 + 10 for i in range(args.prompt_tokens)]
    engines = {name: build(model, args.prompt_tokens + args.tokens + 1, args.threads, name) for name in VARIANTS}
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in engines}
    try:
        for i in range(args.passes + 1):  # pass 0 warms up
            for name in (list(engines) if i % 2 else list(engines)[::-1]):
                e = engines[name]
                t0 = time.perf_counter()
                e.forward(prompt, 0)
                t1 = time.perf_counter()
                for j in range(args.tokens):
                    e.forward([prompt[j]], args.prompt_tokens + j)
                t2 = time.perf_counter()
                if i:
                    times[name]["prefill"].append((t1 - t0) / args.prompt_tokens)
                    times[name]["decode"].append((t2 - t1) / args.tokens)
    finally:
        for e in engines.values():
            e.close()
    print(f"{args.threads} thread(s), prefill {args.prompt_tokens} + decode {args.tokens} tokens, {args.passes} "
          f"passes alternated; tok/s medians, l2 / l1 as the median of per-pass ratios:")
    for phase in ("prefill", "decode"):
        a, b = times["l1"][phase], times["l2"][phase]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"  {phase:8s} l1 {1 / statistics.median(a):7.1f}   l2 {1 / statistics.median(b):7.1f}   l2 / l1 {ratio:.3f}")


if __name__ == "__main__":
    main()
