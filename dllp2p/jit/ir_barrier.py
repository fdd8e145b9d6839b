"""IR for a spin barrier shared by N native threads, and a small multi-phase proof of it.

state is i64[2]: (count of threads arrived, generation). A thread reads the generation, then counts
itself in; the last to arrive resets the count and bumps the generation; the others spin (with the
CPU's pause hint) until the generation changes. All read-modify-writes are seq_cst `atomicrmw`
(`store atomic` is avoided: it crashed llvmlite with opaque pointers); the spin reads are
`load atomic acquire`. Writes a thread made before the barrier are visible to all after it.
A waiter that has spun ~1 ms starts calling sched_yield, so oversubscribed cores still make progress.
"""

from __future__ import annotations

import llvmlite.ir as ir

from .compiler import Target
from .irutil import I64, VOID, define, entry_alloca, for_range, gep, i64, intrinsic, load, store
from .specs import KernelSpec, Op


SPINS_BEFORE_YIELD = 20_000  # ~1 ms of pause instructions; then each spin also yields the CPU


def _pause(b: ir.IRBuilder, target: Target) -> None:
    if target.is_x86:
        b.call(intrinsic(b.module, "llvm.x86.sse2.pause", VOID, []), [])
    elif target.triple.startswith(("aarch64", "arm64")):
        b.call(intrinsic(b.module, "llvm.aarch64.hint", VOID, [ir.IntType(32)]), [ir.Constant(ir.IntType(32), 1)])


def emit_barrier(module: ir.Module, spec: KernelSpec, target: Target) -> ir.Function:
    fn, b = define(module, spec.name, spec.signature)
    state, n_threads = fn.args
    count, gen = state, gep(b, state, i64(1), I64)
    g = b.load_atomic(gen, "acquire", 8, typ=I64)
    arrived = b.atomic_rmw("add", count, i64(1), "seq_cst")
    last = b.icmp_signed("==", arrived, b.sub(n_threads, i64(1)))
    with b.if_else(last) as (then, otherwise):
        with then:
            b.atomic_rmw("xchg", count, i64(0), "seq_cst")
            b.atomic_rmw("add", gen, i64(1), "seq_cst")
        with otherwise:
            spins = entry_alloca(b, I64, i64(0), "spins")
            spin = b.append_basic_block("spin")
            backoff = b.append_basic_block("backoff")
            check = b.append_basic_block("check")
            done = b.append_basic_block("released")
            b.branch(spin)
            b.position_at_end(spin)
            _pause(b, target)
            count = b.add(b.load(spins, typ=I64), i64(1))
            b.store(count, spins)
            b.cbranch(b.icmp_signed(">", count, i64(SPINS_BEFORE_YIELD)), backoff, check)
            b.position_at_end(backoff)  # more threads than free cores: let the one we wait for run
            b.call(intrinsic(b.module, "sched_yield", ir.IntType(32), []), [])
            b.branch(check)
            b.position_at_end(check)
            same = b.icmp_signed("==", b.load_atomic(gen, "acquire", 8, typ=I64), g)
            b.cbranch(same, spin, done)
            b.position_at_end(done)
    b.ret_void()
    return fn


def emit_barrier_demo(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Thread tid: buf[0, tid] = tid + 1; then per phase p >= 1: buf[p, tid] = sum(buf[p-1, :]) * (tid + 1) + p,
    with a barrier after every phase (each phase reads what all threads wrote in the one before)."""
    name = KernelSpec(Op.BARRIER).name
    barrier = module.globals.get(name) or emit_barrier(module, KernelSpec(Op.BARRIER), target)
    fn, b = define(module, spec.name, spec.signature)
    state, buf, n_threads, tid, n_phases = fn.args
    tid1 = b.add(tid, i64(1))
    store(b, tid1, buf, tid, I64)
    b.call(barrier, [state, n_threads])
    with for_range(b, i64(1), n_phases, name="p") as p:
        prev = gep(b, buf, b.mul(b.sub(p, i64(1)), n_threads), I64)
        slot = entry_alloca(b, I64, i64(0), "total")
        with for_range(b, i64(0), n_threads, name="j") as j:
            b.store(b.add(b.load(slot, typ=I64), load(b, prev, I64, j, I64)), slot)
        value = b.add(b.mul(b.load(slot, typ=I64), tid1), p)
        store(b, value, gep(b, buf, b.mul(p, n_threads), I64), tid, I64)
        b.call(barrier, [state, n_threads])
    b.ret_void()
