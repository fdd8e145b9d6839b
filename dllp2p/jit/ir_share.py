"""How the compiled forward shares an op's work among its threads: fixed chunks taken dynamically.

An op's work is `total` units (16-row groups of a matrix, chunk rows, attention items, heads). It is cut
into chunks of `chunk` units, chunk boundaries fixed by the op's shape alone (`chunk_units`), never by the
thread count: whichever thread computes a chunk, it makes the same kernel calls on the same rows, so the
results are bit-identical for any thread count and any schedule.

Dynamic sharing (ProgramSpec.dynamic): the chunks are dealt out as contiguous runs, thread t owning
chunks [t * C / N, (t + 1) * C / N), each run with its own counter. A thread takes its own chunks first
(`atomicrmw add` on its own counter: an uncontended cache line), then, in turn, what is left of every
other thread's run: a thread that the OS descheduled, or that shares its core with another program,
has its chunks taken by the others instead of holding up the barrier after the op. On a quiet machine
each thread does its own run and finds the others' empty (one read each).

The counters: i64, one per (thread, sharing site), `counters[tid * stride + site]` with stride =
`site_stride(n_layers)` (thread regions on separate cache lines); every site of the program (one op
instance: layer 3's Wq product, ...) has its own: a layer's k-th site is layer * SITES_PER_LAYER + k (the
layer a run-time value in the layer's function, program.py), the sites outside the layers come after all
of theirs. They are zeroed by their owner right after the barrier
that follows the site (`Sites.reset`; every thread has passed that barrier, so nobody reads them until the
next step): no barrier of their own. The engine allocates them zeroed.

Static sharing (the old way, kept as the A/B baseline and the test oracle): thread t computes units
[t * total / N, (t + 1) * total / N) in one piece.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import llvmlite.ir as ir

from .irutil import I64, PTR, entry_alloca, gep, i64

CHUNKS_PER_OP = 16  # an op of many units is cut into about this many chunks
SITES_PER_LAYER = 14  # bound on the sharing sites a layer emits (program.py and tp_program.py: 12)
SITES_OUTSIDE = 4  # bound on those outside the layers (the logits)


CHUNK_WEIGHTS = 1 << 18  # at most this many weights per chunk (a large op, the logits: finer chunks)


def chunk_units(total: int, unit_weights: int = 0) -> int:
    """Units per chunk of an op of `total` units (known when the program is emitted): about
    CHUNKS_PER_OP chunks, at least one unit each; with unit_weights (weights a unit reads), at most
    CHUNK_WEIGHTS weights a chunk, so that what is left of a large op when one thread runs out of chunks
    (SmolLM2's logits: 28 MiB in 16 chunks, ~0.1 ms each) is shorter than a barrier's spin before it sleeps."""
    units = max(1, -(-total // CHUNKS_PER_OP))
    return max(1, min(units, CHUNK_WEIGHTS // unit_weights)) if unit_weights else units


def site_stride(n_layers: int) -> int:
    """i64 words of one thread's counters (a multiple of 8: each thread's region on its own cache lines)."""
    sites = SITES_PER_LAYER * n_layers + SITES_OUTSIDE
    return -(-sites // 8) * 8


def counter_words(n_layers: int, n_threads: int) -> int:
    """Size of the counters buffer, i64 words."""
    return site_stride(n_layers) * n_threads


class Sites:
    """Numbers an emitted program's sharing sites and emits their loops (see the module docstring)."""

    def __init__(self, n_layers: int, dynamic: bool):
        self.dynamic = dynamic
        self.n_layers = n_layers
        self.stride = site_stride(n_layers)
        self.outside = 0  # sites emitted outside the layers
        self.base: ir.Value | None = None  # in a layer's function: its first site's number (run time)
        self.in_layer = 0  # sites emitted in that function so far
        self.open: list[int] = []  # sites emitted since the last barrier (in a layer's function: after base)

    @contextlib.contextmanager
    def layer_function(self, b: ir.IRBuilder, layer: ir.Value) -> Iterator[None]:
        """Number the sites emitted in the with-block as those of layer `layer` (a run-time value): the body of
        a function every layer of one signature calls (program.py). b must be in that function's entry block
        (every site's number is worked out from what it computes there). No site may be open across its edges."""
        assert not self.open and self.base is None, "a sharing site open across a layer function's edge"
        self.base, self.in_layer = b.mul(layer, i64(SITES_PER_LAYER)), 0
        try:
            yield
        finally:
            assert not self.open, "a layer function ends with a sharing site open (no barrier after it)"
            self.base = None

    def _next_site(self) -> int:
        if self.base is not None:
            assert self.in_layer < SITES_PER_LAYER, f"more than {SITES_PER_LAYER} sharing sites in a layer: raise it"
            self.in_layer += 1
            return self.in_layer - 1
        assert self.outside < SITES_OUTSIDE, f"more than {SITES_OUTSIDE} sharing sites outside the layers: raise it"
        self.outside += 1
        return SITES_PER_LAYER * self.n_layers + self.outside - 1

    def _index(self, b: ir.IRBuilder, site: int) -> ir.Value:
        """A site's counter index: its number, after base in a layer's function."""
        return i64(site) if self.base is None else b.add(self.base, i64(site))

    @contextlib.contextmanager
    def each(self, b: ir.IRBuilder, counters: ir.Value, tid: ir.Value, nt: ir.Value, total: ir.Value | int,
             chunk: int) -> Iterator[tuple[ir.Value, ir.Value]]:
        """Emit `for each chunk this thread computes: body(lo, hi)`, units [lo, hi) of range(total); the
        body is the with-block. Static sharing: at most one piece, [t * total / N, (t + 1) * total / N)."""
        total = i64(total) if isinstance(total, int) else total
        if not self.dynamic:
            lo = b.sdiv(b.mul(tid, total), nt)
            hi = b.sdiv(b.mul(b.add(tid, i64(1)), total), nt)
            with b.if_then(b.icmp_signed("<", lo, hi)):
                yield lo, hi
            return
        site = self._next_site()
        self.open.append(site)
        n_chunks = b.sdiv(b.add(total, i64(chunk - 1)), i64(chunk))
        owner = entry_alloca(b, I64, i64(0), "owner.slot")
        take = _next_chunk(b.module, self.stride)
        fn = b.function
        cond, run, after = (fn.append_basic_block(f"share.{s}") for s in ("next", "run", "end"))
        b.branch(cond)
        b.position_at_end(cond)
        claim = b.call(take, [counters, self._index(b, site), tid, nt, n_chunks, owner])
        b.cbranch(b.icmp_signed(">=", claim, i64(0)), run, after)
        b.position_at_end(run)
        lo = b.mul(claim, i64(chunk))
        end = b.add(lo, i64(chunk))
        hi = b.select(b.icmp_signed("<", end, total), end, total)
        yield lo, hi
        b.branch(cond)
        b.position_at_end(after)

    def reset(self, b: ir.IRBuilder, counters: ir.Value, tid: ir.Value) -> None:
        """After a barrier: zero this thread's counters of the sites emitted since the previous one."""
        mine = gep(b, counters, b.mul(tid, i64(self.stride)), I64)
        for site in self.open:
            b.store(i64(0), gep(b, mine, self._index(b, site), I64))
        self.open.clear()


def _next_chunk(module: ir.Module, stride: int) -> ir.Function:
    """i64 share_next(counters, site, tid, nt, n_chunks, owner i64*): the next chunk this thread computes
    at a site, or -1 when none is left. *owner (0 at the site's start) counts the runs looked at: run
    tid + *owner (wrapping), own run first. One small function called from every site (inlined at each,
    the nested loops made LLVM's optimizer take ~3x as long over a whole model's step)."""
    name = "share_next"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(I64, [PTR, I64, I64, I64, I64, PTR]), name)
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    fn.linkage = "internal"
    counters, site, tid, nt, n_chunks, owner = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    look, take, move_on, none = (fn.append_basic_block(s) for s in ("look", "take", "move_on", "none"))
    b.branch(look)

    b.position_at_end(look)
    k = b.load(owner, typ=I64)
    b.cbranch(b.icmp_signed("<", k, nt), take, none)

    b.position_at_end(take)
    victim = b.add(tid, k)
    victim = b.select(b.icmp_signed(">=", victim, nt), b.sub(victim, nt), victim)
    c0 = b.sdiv(b.mul(victim, n_chunks), nt)
    c1 = b.sdiv(b.mul(b.add(victim, i64(1)), n_chunks), nt)
    counter = gep(b, counters, b.add(b.mul(victim, i64(stride)), site), I64)
    # another's run: read before claiming, so a finished run costs a shared read, not a write
    left = b.icmp_signed("<", b.add(c0, b.load_atomic(counter, "monotonic", 8, typ=I64)), c1)
    with b.if_then(b.or_(b.icmp_signed("==", k, i64(0)), left)):
        claim = b.add(c0, b.atomic_rmw("add", counter, i64(1), "monotonic"))
        with b.if_then(b.icmp_signed("<", claim, c1)):
            b.ret(claim)
    b.branch(move_on)

    b.position_at_end(move_on)
    b.store(b.add(k, i64(1)), owner)
    b.branch(look)

    b.position_at_end(none)
    b.ret(i64(-1))
    return fn
