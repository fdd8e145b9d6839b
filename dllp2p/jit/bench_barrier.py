"""What a barrier costs: one round trip of N threads through the compiled barrier, spinning or sleeping.

    python3 -m dllp2p.jit.bench_barrier [--threads 2] [--phases 20000] [--runs 5]

Runs `barrier_demo` (every thread: a few adds, then a barrier; ir_barrier.py) on N Python threads (ctypes
drops the GIL) with the waiters' default spin limit (the spin path: nobody sleeps while the threads keep
pace, as on a quiet machine with a core per thread) and with a spin limit of 1 (the futex path: every waiter sleeps at once and the last arriver wakes
them), alternating within one run, and prints microseconds per barrier for each and their ratio. The
sleeps column is how many FUTEX_WAITs the run made per barrier and waiter (about 1 on the futex path, 0 on
the spin path of a quiet machine). Figures from a busy machine mean little: compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from .ir_barrier import BARRIER_WORDS, SLEEPS, SPINS
from .layout import aligned_zeros
from .library import KernelLibrary, compile_kernels
from .specs import KernelSpec, Op


def demo_library() -> KernelLibrary:
    return compile_kernels([KernelSpec(Op.BARRIER_DEMO)], cache_dir=None)


def run_demo(lib: KernelLibrary, n_threads: int, n_phases: int, spins: int = 0,
             timeout: float = 60.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Run barrier_demo on n_threads threads with the given spin limit (0: the default) -> (buf
    i64[n_phases, n_threads], the barrier state i64[BARRIER_WORDS], wall seconds). Raises TimeoutError
    if a thread is still inside after timeout seconds (a lost wake-up or a broken barrier)."""
    state = aligned_zeros(BARRIER_WORDS, np.int64)
    state[SPINS // 8] = spins
    buf = np.full((n_phases, n_threads), -1, np.int64)
    fn = lib["barrier_demo"]
    threads = [threading.Thread(target=fn, args=(state.ctypes.data, buf.ctypes.data, n_threads, t, n_phases),
                                daemon=True) for t in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"barrier_demo with {n_threads} threads still running after {timeout} s")
    return buf, state, wall


def sleeps(state: np.ndarray) -> int:
    return int(state[SLEEPS // 8])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    lib = demo_library()
    run_demo(lib, args.threads, 100)  # warm up: thread start, page faults
    results: dict[str, list[float]] = {"spin": [], "futex": []}
    waits: dict[str, list[float]] = {"spin": [], "futex": []}
    for _ in range(args.runs):
        for name, spins in (("spin", 0), ("futex", 1)):
            _, state, wall = run_demo(lib, args.threads, args.phases, spins)
            results[name].append(wall / args.phases * 1e6)
            waits[name].append(sleeps(state) / (args.phases * max(1, args.threads - 1)))
    spin, fut = statistics.median(results["spin"]), statistics.median(results["futex"])
    print(f"{args.threads} threads, {args.phases} barriers per run, median of {args.runs} runs (alternating):")
    print(f"  spin path : {spin:8.3f} us per barrier   sleeps per wait {statistics.median(waits['spin']):.3f}")
    print(f"  futex path: {fut:8.3f} us per barrier   sleeps per wait {statistics.median(waits['futex']):.3f}")
    print(f"  futex / spin: {fut / spin:.1f}x  (wall time per run includes starting the threads)")


if __name__ == "__main__":
    main()
