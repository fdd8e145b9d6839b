"""IR for the barrier shared by N native threads (spin, then sleep on a futex), a small proof of it, and the
worker threads' idle loop between steps (spin, then sleep on a futex on the go-counter).

state is i64[BARRIER_WORDS] (zeroed before first use; the engine and the tests allocate it):

    byte  0  i64  threads arrived at the current barrier
    byte  8  i32  generation (the futex word; bumped by the last arriver)
    byte 12  i32  sleepers: threads inside or about to enter FUTEX_WAIT on the generation
    byte 16  i64  spins: pause iterations a waiter spins before it sleeps (0: SPINS_BEFORE_SLEEP)
    byte 24  i64  sleeps: FUTEX_WAITs made so far (a counter for tests and benchmarks)

A thread reads the generation, then counts itself in; the last to arrive resets the count, bumps the
generation and, only if someone sleeps, calls FUTEX_WAKE: the fast path is what it was (atomics and
pause). A waiter spins on the generation with the CPU's pause hint; after `spins` iterations it counts
itself a sleeper, re-checks the generation and calls FUTEX_WAIT (the kernel sleeps only if the word still
holds the old generation, so a bump between the check and the call is never lost: the last arriver bumps
before it reads the sleepers, a waiter counts itself in before the kernel reads the word; both seq_cst).
Sleeping frees the core, so on a busy device the thread being waited for (or the other program) runs,
and an idle core lets the kernel's balancer move a waiting-to-run thread onto it; yielding in a loop,
as before, kept every core busy and the token waited for the slowest thread's next time slice.

All read-modify-writes are seq_cst `atomicrmw` (`store atomic` crashed llvmlite with opaque pointers);
spin reads are `load atomic acquire`. Writes a thread made before the barrier are visible to all after it.
Linux only (x86_64 and aarch64 system call numbers); elsewhere a waiter yields in a loop after spinning.
"""

from __future__ import annotations

import llvmlite.ir as ir

from .compiler import Target
from .irutil import I32, I64, PTR, VOID, define, entry_alloca, for_range, gep, i64, intrinsic, load, store
from .specs import KernelSpec, Op

BARRIER_WORDS = 8  # i64 words of a barrier's state (see the module docstring)
SPINS_BEFORE_SLEEP = 1_000  # default pause iterations before a waiter sleeps (~20-50 us; README "Busy devices")
SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129  # FUTEX_WAIT | FUTEX_PRIVATE_FLAG, FUTEX_WAKE | ...
WAKE_ALL = 0x7FFFFFFF
IDLE_SPINS = 200_000  # pause iterations (~10 ms) an idle worker spins between steps before it sleeps
SLEEP_US = 100  # without a futex (not Linux): an idle worker naps this long between looks

GEN, SLEEPERS, SPINS, SLEEPS = 8, 12, 16, 24  # byte offsets in the state


def futex_number(triple: str) -> int | None:
    """The futex system call's number on this target, or None (not Linux, or an architecture not listed)."""
    arch, _, rest = triple.partition("-")
    return SYS_FUTEX.get(arch) if "linux" in rest else None


def pause(b: ir.IRBuilder, triple: str) -> None:
    """The CPU's spin-wait hint (x86 `pause`, aarch64 `yield`); nothing elsewhere."""
    if triple.startswith(("x86_64", "i686", "i386")):
        b.call(intrinsic(b.module, "llvm.x86.sse2.pause", VOID, []), [])
    elif triple.startswith(("aarch64", "arm64")):
        b.call(intrinsic(b.module, "llvm.aarch64.hint", VOID, [I32]), [ir.Constant(I32, 1)])


def futex(b: ir.IRBuilder, number: int, word: ir.Value, op: int, value: ir.Value) -> None:
    """syscall(SYS_futex, word, op, value, NULL, NULL, 0): word is an i32*, value an i32 (all passed as
    64-bit registers, as the variadic syscall() reads them)."""
    fn = b.module.globals.get("syscall")
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
    null = ir.Constant(PTR, None)
    b.call(fn, [i64(number), word, i64(op), b.zext(value, I64), null, null, i64(0)])


def sleep_until_changed(b: ir.IRBuilder, triple: str, word: ir.Value, old: ir.Value, sleepers: ir.Value,
                        sleeps: ir.Value | None = None) -> None:
    """Block until the i32 at word may differ from old (the caller re-checks: wake-ups can be spurious):
    count in as a sleeper, FUTEX_WAIT if it still holds old, count out. Without a futex: sched_yield."""
    number = futex_number(triple)
    if number is None:
        b.call(intrinsic(b.module, "sched_yield", I32, []), [])
        return
    b.atomic_rmw("add", sleepers, ir.Constant(I32, 1), "seq_cst")
    if sleeps is not None:
        b.atomic_rmw("add", sleeps, i64(1), "monotonic")
    with b.if_then(b.icmp_unsigned("==", b.load_atomic(word, "seq_cst", 4, typ=I32), old)):
        futex(b, number, word, FUTEX_WAIT_PRIVATE, old)
    b.atomic_rmw("sub", sleepers, ir.Constant(I32, 1), "seq_cst")


def wake_sleepers(b: ir.IRBuilder, triple: str, word: ir.Value, sleepers: ir.Value) -> None:
    """After changing the word: FUTEX_WAKE every sleeper on it, only if the sleeper count says there are any."""
    number = futex_number(triple)
    if number is None:
        return
    with b.if_then(b.icmp_unsigned("!=", b.load_atomic(sleepers, "seq_cst", 4, typ=I32), ir.Constant(I32, 0))):
        futex(b, number, word, FUTEX_WAKE_PRIVATE, ir.Constant(I32, WAKE_ALL))


def emit_barrier(module: ir.Module, spec: KernelSpec, target: Target) -> ir.Function:
    fn, b = define(module, spec.name, spec.signature)
    state, n_threads = fn.args
    count, gen, sleepers = state, gep(b, state, i64(GEN)), gep(b, state, i64(SLEEPERS))
    g = b.load_atomic(gen, "acquire", 4, typ=I32)
    arrived = b.atomic_rmw("add", count, i64(1), "seq_cst")
    last = b.icmp_signed("==", arrived, b.sub(n_threads, i64(1)))
    with b.if_else(last) as (then, otherwise):
        with then:
            b.atomic_rmw("xchg", count, i64(0), "seq_cst")
            b.atomic_rmw("add", gen, ir.Constant(I32, 1), "seq_cst")
            wake_sleepers(b, target.triple, gen, sleepers)
        with otherwise:
            limit = b.load(gep(b, state, i64(SPINS)), typ=I64)
            limit = b.select(b.icmp_signed("==", limit, i64(0)), i64(SPINS_BEFORE_SLEEP), limit)
            spins = entry_alloca(b, I64, i64(0), "spins")
            spin, sleep, check, done = (b.append_basic_block(s) for s in ("spin", "sleep", "check", "released"))
            b.branch(spin)
            b.position_at_end(spin)
            pause(b, target.triple)
            n = b.add(b.load(spins, typ=I64), i64(1))
            b.store(n, spins)
            b.cbranch(b.icmp_signed(">", n, limit), sleep, check)
            b.position_at_end(sleep)  # the thread we wait for is slow or descheduled: give up the core
            sleep_until_changed(b, target.triple, gen, g, sleepers, gep(b, state, i64(SLEEPS)))
            b.branch(check)
            b.position_at_end(check)
            same = b.icmp_unsigned("==", b.load_atomic(gen, "acquire", 4, typ=I32), g)
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


def emit_worker(module: ir.Module, go_slot: int, quit_slot: int, idle_slot: int) -> None:
    """void worker(i64* table, i64 tid): run the module's `forward` each time table[go_slot] moves, until
    table[quit_slot] is set. Between steps a worker spins IDLE_SPINS times, then sleeps on a futex on go's
    low 32 bits, counted in the i32 at table[idle_slot] (so `step` calls FUTEX_WAKE only when a worker
    sleeps); without a futex it naps (usleep)."""
    forward = module.globals["forward"]
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, I64]), "worker")
    table, tid = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    go, quit_, idle = (gep(b, table, i64(slot), I64) for slot in (go_slot, quit_slot, idle_slot))
    seen = b.alloca(I64)
    spins = b.alloca(I64)
    b.store(i64(0), seen)
    wait, spin, nap, run, done = (fn.append_basic_block(s) for s in ("wait", "spin", "nap", "run", "done"))
    b.store(i64(0), spins)
    b.branch(wait)

    b.position_at_end(wait)
    now = b.load_atomic(go, "acquire", 8, typ=I64)
    b.cbranch(b.icmp_signed("==", now, b.load(seen, typ=I64)), spin, run)

    b.position_at_end(spin)
    pause(b, module.triple)
    count = b.add(b.load(spins, typ=I64), i64(1))
    b.store(count, spins)
    b.cbranch(b.icmp_signed(">", count, i64(IDLE_SPINS)), nap, wait)

    b.position_at_end(nap)
    if futex_number(module.triple) is None:
        b.call(intrinsic(module, "usleep", I32, [I32]), [ir.Constant(I32, SLEEP_US)])
    else:
        sleep_until_changed(b, module.triple, go, b.trunc(b.load(seen, typ=I64), I32), idle)
    b.branch(wait)

    b.position_at_end(run)
    b.store(now, seen)
    b.store(i64(0), spins)
    stop = b.load_atomic(quit_, "acquire", 8, typ=I64)
    with b.if_then(b.icmp_signed("==", stop, i64(0))):
        b.call(forward, [table, tid])
    b.cbranch(b.icmp_signed("==", stop, i64(0)), wait, done)

    b.position_at_end(done)
    b.ret_void()


def emit_step(module: ir.Module, go_slot: int, idle_slot: int) -> None:
    """void step(i64* table): bump table[go_slot], wake sleeping workers, run forward as thread 0;
    void kick(i64* table): the same without running forward (to let workers see `quit`)."""
    forward = module.globals["forward"]
    for name, runs in (("step", True), ("kick", False)):
        fn = ir.Function(module, ir.FunctionType(VOID, [PTR]), name)
        (table,) = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        go = gep(b, table, i64(go_slot), I64)
        b.atomic_rmw("add", go, i64(1), "seq_cst")
        wake_sleepers(b, module.triple, go, gep(b, table, i64(idle_slot), I64))
        if runs:
            b.call(forward, [table, i64(0)])
        b.ret_void()
