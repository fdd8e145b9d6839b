"""Measured memory read bandwidth: the roof that a decode step (one pass over the weights) runs under.

    python3 -m dllp2p.jit.membw [--threads N] [--mib 1024] [--runs 5]

One JIT kernel, `membw_sum(src, n, out)`, reads n bytes from src front to back as <8 x i64> vectors
(one 64-byte cache line per load; four independent accumulators so the adds never wait) and stores
their wrapping sum at out, so the loads cannot be optimized away. Nothing is written during the
pass: it is the same read-only stream a matvec over packed weights is.

T Python threads each run the kernel over their own contiguous slice of one buffer (ctypes releases
the GIL during the call), between two barriers; a run's bandwidth is the buffer's bytes over the
time from the first thread's start to the last thread's finish, as the threads read the clock
(parallel_passes). The buffer (1 GiB by default: far larger than any last-level cache) is written
once by the thread that later reads each slice, so every page is mapped (and, on NUMA machines,
local) before timing. One untimed pass warms up; the result
is the median of the runs, in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import llvmlite.ir as ir
import numpy as np

from .compiler import DEFAULT_CACHE_DIR, ObjectCache, Target, compile_module, default_target
from .irutil import I64, Signature, define, entry_alloca, for_range, gep, hsum, i64, vec
from .layout import ALIGN, aligned_empty

KERNEL = "membw_sum"
LANES = 8  # i64 lanes per load: 64 bytes, one cache line (two 256-bit loads without AVX-512)
UNROLL = 4  # independent accumulators, one load each per iteration
STEP = LANES * 8 * UNROLL  # bytes per loop iteration; every slice is a multiple of this
SIGNATURE = Signature((("src", "p"), ("n", "i"), ("out", "p")))


def emit_membw_sum(module: ir.Module) -> ir.Function:
    """void membw_sum(const u8 *src, i64 n, i64 *out): *out = wrapping sum of src's n / 8 u64 words.

    src is 64-byte aligned and n is a multiple of STEP (the caller guarantees both).
    """
    fn, b = define(module, KERNEL, SIGNATURE)
    src, n, out = fn.args
    vt = vec(I64, LANES)
    zero = ir.Constant(vt, [ir.Constant(I64, 0)] * LANES)
    accs = [entry_alloca(b, vt, zero, name=f"acc{u}") for u in range(UNROLL)]
    with for_range(b, i64(0), n, STEP, name="off") as off:
        for u, acc in enumerate(accs):
            p = gep(b, src, b.add(off, i64(u * LANES * 8)))
            v = b.load(p, typ=vt, align=ALIGN)
            b.store(b.add(b.load(acc, typ=vt), v), acc)
    total = b.load(accs[0], typ=vt)
    for acc in accs[1:]:
        total = b.add(total, b.load(acc, typ=vt))
    b.store(hsum(b, total), out, align=8)
    b.ret_void()
    return fn


def build_module(target: Target) -> ir.Module:
    module = ir.Module(name="dllp2p_membw")
    module.triple = target.triple
    emit_membw_sum(module)
    return module


@dataclass
class StreamKernel:
    """The compiled kernel as a ctypes function; keeps the machine code alive."""

    compiled: object
    fn: ctypes._CFuncPtr

    def __call__(self, src: int, n: int, out: int) -> None:
        self.fn(src, n, out)


@lru_cache(maxsize=None)
def stream_kernel(cache_dir: str | None = str(DEFAULT_CACHE_DIR)) -> StreamKernel:
    """Compile (or load from the disk cache under cache_dir; None: no cache) the streaming kernel."""
    target = default_target()
    cache = ObjectCache(Path(cache_dir)) if cache_dir is not None else None
    compiled = compile_module(build_module(target), target, cache)
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
    return StreamKernel(compiled, proto(compiled.address(KERNEL)))


@dataclass(frozen=True)
class Bandwidth:
    gb_s: float  # median over runs, 1e9 bytes/s
    runs_gb_s: tuple[float, ...]
    threads: int
    nbytes: int  # bytes read per run
    checksum: int  # the kernel's sum over the buffer (equals the expected value: the loads happened)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _slices(nbytes: int, threads: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges, one per thread, each a multiple of STEP long."""
    steps = nbytes // STEP
    cuts = [steps * i // threads * STEP for i in range(threads + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def parallel_passes(work: list[Callable[[], None]], passes: int,
                    prepare: list[Callable[[], None]] | None = None) -> list[float]:
    """Seconds of each of `passes` passes in which thread t runs work[t]() once (after prepare[t]() once), all
    released together by a barrier: from the first thread's start to the last one's finish, on the threads' own
    clock readings. (The caller's thread used to time it, and may get a core only after the workers, as many as
    the cores, are done: on 2 vCPUs single passes of membw then read 400-6600 GB/s and a 256 MiB buffer's median
    72.) An exception in a thread is raised here once every pass is over."""
    n = len(work)
    start, end = threading.Barrier(n + 1), threading.Barrier(n + 1)
    began, ended = np.zeros((n, passes)), np.zeros((n, passes))
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            if prepare is not None:
                prepare[t]()
        except BaseException as e:  # noqa: BLE001 (memory errors: reported below)
            errors.append(e)
        for r in range(passes):
            start.wait()
            began[t, r] = time.perf_counter()
            if not errors:
                try:
                    work[t]()
                except BaseException as e:  # noqa: BLE001 (reported below, after the barriers let go)
                    errors.append(e)
            ended[t, r] = time.perf_counter()
            end.wait()

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n)]
    for th in pool:
        th.start()
    try:
        for _ in range(passes):
            start.wait()
            end.wait()
    finally:
        for th in pool:
            th.join()
    if errors:
        raise errors[0]
    return list(ended.max(axis=0) - began.min(axis=0))


def measure_bandwidth(
    threads: int | None = None,
    nbytes: int = 1 << 30,
    runs: int = 5,
    cache_dir: str | None = str(DEFAULT_CACHE_DIR),
) -> Bandwidth:
    """Read bandwidth of `threads` threads streaming an nbytes buffer: median GB/s of `runs` passes."""
    threads = threads or default_threads()
    if threads < 1:
        raise ValueError("threads must be at least 1")
    if runs < 1:
        raise ValueError("runs must be at least 1")
    nbytes = nbytes // STEP * STEP
    if nbytes < STEP * threads:
        raise ValueError(f"a bandwidth buffer of {nbytes} bytes is too small for {threads} threads")
    kernel = stream_kernel(cache_dir)
    buf = aligned_empty(nbytes, np.uint8)
    base = buf.ctypes.data
    words = buf.view(np.uint64)
    slices = _slices(nbytes, threads)
    outs = np.zeros((threads, 8), np.int64)  # one cache line per thread: no false sharing

    def first_touch(lo: int, hi: int) -> Callable[[], None]:  # by the thread that later reads the slice
        def touch() -> None:
            words[lo // 8 : hi // 8] = 1
        return touch

    def reader(t: int, lo: int, hi: int) -> Callable[[], None]:
        out = outs[t].ctypes.data
        return lambda: kernel(base + lo, hi - lo, out)

    times = parallel_passes([reader(t, lo, hi) for t, (lo, hi) in enumerate(slices)], runs + 1,
                            [first_touch(lo, hi) for lo, hi in slices])
    read = slices[-1][1]
    checksum = int(outs[:, 0].sum())
    if checksum != read // 8:
        raise RuntimeError(f"bandwidth kernel summed {checksum}, expected {read // 8}")
    rates = tuple(read / t / 1e9 for t in times[1:])  # the first pass is a warm-up
    return Bandwidth(statistics.median(rates), rates, threads, read, checksum)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--mib", type=int, default=1024, help="buffer size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    bw = measure_bandwidth(args.threads, args.mib << 20, args.runs)
    runs = " ".join(f"{r:.1f}" for r in bw.runs_gb_s)
    print(f"{bw.threads} thread(s), {bw.nbytes >> 20} MiB: median {bw.gb_s:.1f} GB/s (runs {runs})")


if __name__ == "__main__":
    main()
