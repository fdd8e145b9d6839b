"""Weight streaming: a node whose packed weights exceed its memory budget reads its layers from the file.

A node's packed weights are always a read-only shared mapping of its cache file (weights.py). A node
that fits its budget leaves every page mapped, as it always did. A node that does not (`StreamPlan`)
keeps only what every step needs mapped (the norms, the embedding, the output projection: `resident`)
and, in the compiled step, after layer l (every thread past the barrier that follows its last product),
thread 0 makes two system calls:

    madvise(layer l's range, MADV_DONTNEED)        drop its pages from this process: they stay in the
                                                   page cache while memory allows (reclaimable: a cgroup's
                                                   limit takes them first), VmRSS falls
    madvise(layer (l+1+d) mod n's range, MADV_WILLNEED)   start reading it in (asynchronous readahead):
                                                   d layers are read ahead of the one computing, the next
                                                   step's first layers after the last one

so the process maps one layer (and what is resident) at a time, and the page cache holds the d layers
in flight: resident + (1 + d) layers + the other buffers stay within the budget. The ranges are the
`stream` buffer, i64[n_layers, STREAM_WORDS] (drop address, drop bytes, fetch address, fetch bytes;
page-aligned; a zero length skips the call), filled by the engine; the table's `stream` slot is 0 for
a node that does not stream, so the same compiled code serves both (one load and branch per layer).

The twin: the same engine with no budget; tokens must be identical (streaming changes which pages are
mapped, never what they hold). Linux only (the syscall numbers below); elsewhere no node streams.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Sequence

import llvmlite.ir as ir
import numpy as np

from ..memlimit import MADV_DONTNEED, MADV_WILLNEED
from .irutil import I64, PTR, VOID, gep, i64

STREAM_WORDS = 4  # i64 per layer in the stream buffer: drop address, drop bytes, fetch address, fetch bytes
SYS_MADVISE = {"x86_64": 28, "aarch64": 233, "arm64": 233}


def madvise_number(triple: str) -> int | None:
    """madvise's system call number on this target, or None (not Linux, or an architecture not listed)."""
    arch, _, rest = triple.partition("-")
    return SYS_MADVISE.get(arch) if "linux" in rest else None


# --- the plan: pure --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPlan:
    """How a node over its budget streams its layers: `ahead` layers (d) read ahead of the one computing."""

    budget: int  # bytes: the node's memory budget (--mem-limit)
    ahead: int  # d >= 1
    layer_bytes: int  # the largest layer's packed bytes (this node's share of it)
    resident: int  # bytes mapped at all times: norms, embedding, output projection
    other: int  # the engine's other memory: KV cache at full context, buffers

    @property
    def expected_peak(self) -> int:
        """resident + (1 + ahead) layers + other: what the budget must hold while it streams."""
        return self.resident + (1 + self.ahead) * self.layer_bytes + self.other


def stream_plan(layer_bytes: Sequence[int], resident: int, other: int, budget: int | None) -> StreamPlan | None:
    """None when everything fits the budget (or there is none, or no layers); else the layers read ahead:
    as many as fit beside the resident part, the other memory and the layer computing, at least 1 (a
    budget below resident + other + 2 layers is not kept: the caller logs it) and at most n_layers - 1."""
    n = len(layer_bytes)
    if budget is None or n == 0 or sum(layer_bytes) + resident + other <= budget:
        return None
    biggest = max(layer_bytes)
    room = budget - resident - other
    ahead = max(1, min(n - 1, room // max(1, biggest) - 1))
    return StreamPlan(budget, ahead, biggest, resident, other)


def page_range(lo: int, hi: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """(address, bytes) of the pages holding [lo, hi): madvise wants a page-aligned start."""
    start = lo - lo % page
    return start, -(-(hi - start) // page) * page


def stream_table(ranges: Sequence[tuple[int, int]], ahead: int) -> np.ndarray:
    """i64[n_layers, STREAM_WORDS]: after layer l, drop ranges[l] and fetch ranges[(l + 1 + ahead) % n]
    (ranges[l]: layer l's (address, bytes), page-aligned; (0, 0) for a layer this node does not run)."""
    n = len(ranges)
    table = np.zeros((n, STREAM_WORDS), np.int64)
    for layer, (addr, size) in enumerate(ranges):
        fetch = ranges[(layer + 1 + ahead) % n]
        table[layer] = (addr, size, *fetch)
    return table


# --- the compiled side --------------------------------------------------------------------------------------


def emit_after_layer(b: ir.IRBuilder, table: ir.Value, tid: ir.Value, slot: int, layer: int) -> None:
    """After layer `layer`: if the table's `slot` (the stream buffer's address) is not 0, thread 0 drops the
    layer's pages and reads ahead (the module docstring). Emits nothing where madvise is unknown."""
    number = madvise_number(b.module.triple)
    if number is None:
        return
    fn = _after_layer_fn(b.module, number)
    stream = b.load(gep(b, table, i64(slot), I64), typ=I64)
    on = b.and_(b.icmp_signed("!=", stream, i64(0)), b.icmp_signed("==", tid, i64(0)))
    with b.if_then(on, likely=False):
        b.call(fn, [b.inttoptr(stream, PTR), i64(layer)])


def _after_layer_fn(module: ir.Module, number: int) -> ir.Function:
    """void _stream_after(i64* stream, i64 layer): the two madvise calls of one layer (emitted once)."""
    fn = module.globals.get("_stream_after")
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, I64]), "_stream_after")
    fn.attributes.add("noinline")
    fn.linkage = "internal"
    stream, layer = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    sys = module.globals.get("syscall")
    if sys is None:
        sys = ir.Function(module, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
    row = b.mul(layer, i64(STREAM_WORDS))
    for word, advice in ((0, MADV_DONTNEED), (2, MADV_WILLNEED)):
        addr = b.load(gep(b, stream, b.add(row, i64(word)), I64), typ=I64)
        size = b.load(gep(b, stream, b.add(row, i64(word + 1)), I64), typ=I64)
        with b.if_then(b.icmp_signed(">", size, i64(0))):
            b.call(sys, [i64(number), addr, size, i64(advice)])  # errors ignored: advice, not a requirement
    b.ret_void()
    return fn
