"""A busy device (issue 19): barriers that sleep on a futex, idle workers that sleep, chunks taken dynamically.

  * barrier_demo with more threads than cores (the process pinned to one core) finishes quickly and right,
    its waiters sleeping (the futex path counted in the barrier's state);
  * with a spin limit of 1 every wait takes the futex path, and the phases still read every write;
  * a JIT engine whose idle worker went to sleep between steps is woken by the next step;
  * a JIT engine with 4 threads on one core gives the 1-thread logits, bit for bit.
Dynamic vs static chunking, bit for bit: tests/test_jit_engine.py (test_bit_identical_across_threads...).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit import reference as ref
from dllp2p.jit.bench_barrier import demo_library, run_demo, sleeps
from dllp2p.jit.engine import JITEngine

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="futex and sched_setaffinity: Linux")


@pytest.fixture(scope="module")
def demo():
    return demo_library()


@contextmanager
def one_core():
    """This thread (and the threads it starts meanwhile) on one CPU of the process's set."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@linux_only
def test_barrier_oversubscribed_sleeps_and_is_right(demo):
    """4 threads, 1 core: a waiter spins its limit, then sleeps, so the thread it waits for gets the core.
    (Yielding in a loop instead, 4 threads took seconds for what takes ~0.1 s here on a quiet core.)"""
    n_threads, n_phases = 4, 200
    with one_core():
        t0 = time.perf_counter()
        buf, state, _ = run_demo(demo, n_threads, n_phases, timeout=60)
        wall = time.perf_counter() - t0
    np.testing.assert_array_equal(buf, ref.barrier_demo(n_threads, n_phases))
    assert state[0] == 0  # nobody left counted in
    assert sleeps(state) > 0, "no waiter slept on one core"
    assert wall < 20, f"{n_phases} barriers of {n_threads} threads on one core took {wall:.1f} s"


@linux_only
@pytest.mark.parametrize("n_threads", [2, 3])
def test_barrier_futex_path(demo, n_threads):
    """Spin limit 1: (nearly) every wait goes to FUTEX_WAIT and is woken by the last arriver's FUTEX_WAKE;
    a lost wake-up would hang (run_demo's timeout), a missing fence would break the sums."""
    n_phases = 300
    for _ in range(2):  # a reused state: the generation keeps counting
        buf, state, _ = run_demo(demo, n_threads, n_phases, spins=1, timeout=60)
        np.testing.assert_array_equal(buf, ref.barrier_demo(n_threads, n_phases))
        assert sleeps(state) > n_phases // 2, sleeps(state)
        assert state[0] == 0


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = SyntheticSpec(qtype=QType.Q4_0, embed_qtype=QType.Q8_0, n_kv_heads=2, n_layers=2)
    return load_model(write_random_llama(tmp_path_factory.mktemp("busy") / "random-q4_0.gguf", spec))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def forward_within(engine: JITEngine, tokens: list[int], pos: int, timeout: float = 30.0) -> np.ndarray:
    """engine.forward on another thread, failing (not hanging) if it does not return in time."""
    out: list[np.ndarray] = []
    t = threading.Thread(target=lambda: out.append(engine.forward(tokens, pos)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"forward did not return in {timeout} s (a worker never woke?)"
    return out[0]


@linux_only
def test_sleeping_worker_is_woken_by_the_next_step(small_model, cache_dir):
    engine = JITEngine(small_model, 32, threads=2, cache_dir=cache_dir)
    try:
        want = [engine.forward([1, 2, 3], 0), engine.forward([4], 3)]
        idle = engine._slots["idle"]
        deadline = time.monotonic() + 20
        while engine._table[idle] & 0xFFFFFFFF == 0 and time.monotonic() < deadline:  # spins ~10 ms, then sleeps
            time.sleep(0.01)
        assert engine._table[idle] & 0xFFFFFFFF == 1, "the idle worker never went to sleep"
        got = forward_within(engine, [1, 2, 3], 0)
        assert np.array_equal(got, want[0])
        assert np.array_equal(forward_within(engine, [4], 3), want[1])
    finally:
        engine.close()


@linux_only
def test_more_threads_than_cores_gives_the_one_thread_logits(small_model, cache_dir):
    prompt = [5, 17, 3, 99, 42, 7]
    one = JITEngine(small_model, 32, threads=1, cache_dir=cache_dir)
    try:
        want = [one.forward(prompt, 0)] + [one.forward([11 + i], len(prompt) + i) for i in range(4)]
    finally:
        one.close()
    with one_core():
        four = JITEngine(small_model, 32, threads=4, cache_dir=cache_dir)
    try:
        t0 = time.perf_counter()
        got = [forward_within(four, prompt, 0)] + [forward_within(four, [11 + i], len(prompt) + i) for i in range(4)]
        wall = time.perf_counter() - t0
    finally:
        four.close()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    assert wall < 20, f"5 steps of 4 threads on one core took {wall:.1f} s"
