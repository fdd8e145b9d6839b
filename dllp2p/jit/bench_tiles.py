"""The batched products against the machine's compute peak: what share of the dot instruction's rate the matmul
tiles reach for 1, 2, 4 and 8 activation rows (continuous batching's steps, issue 18).

    python -m dllp2p.jit.bench_tiles [--types Q4_1 Q8_0] [--shape 1536 576] [--rows 1 2 4 8] [--reps 300]

1. The peak: a loop of 12 independent accumulators, each a chain of 4 of the kernels' 4-byte-group dots
   (ir_dot.dot4: one `vpdpbusd` on AVX512-VNNI, 64 multiply-adds), on one thread and on two at once (two
   cores, or one core's two SMT threads sharing its dot units: the second figure says which).
2. Each type's matmul kernel (the engine's, tile 8, so 4 rows run one tile of 4) on one random matrix of that
   shape, small enough to stay in L2 (1536 x 576 is SmolLM2's FFN gate: 0.5 MB of Q4_1), one thread: the best of
   5 timings of `reps` calls, as multiply-adds per second and as a share of the one-thread peak.
3. What the tiles' arithmetic allows: the dots with the block scales' multiplies and multiply-adds in their
   proportion (tile_ops), in the same loop of independent chains. On Zen 4 the dots, the multiplies and the
   multiply-adds share their pipes (64 dots + 16 of either take as long as 80 dots); adds and conversions go
   beside them (64 dots + 16 adds or 8 int -> float conversions: 0.96-0.98x the dots alone).

Measured on the 2-vCPU Zen 4 VM (2026-12-07): peak 3.66 G dots/s per core (234 G multiply-adds), 464-469 G on
two; Q4_1 44 / 62 / 67 / 69 % at 1 / 2 / 4 / 8 rows, Q8_0 26 / 59 / 73 / 73 %. (1 row is the decode kernel,
made to stream weights from memory, not to reach the peak.) Again 2026-12-07 08:55 (peak 231-234 G), two runs:
Q4_1 62-69 % at 8 rows, its arithmetic alone 80 %; Q8_0 65-69 % / 86-89 %. Issuing each weight vector's dots
for all the rows in turn (instead of row after row, 8 dependent dots each) changed nothing (same process,
paired: 0.97-1.01x): the out-of-order core already overlaps the rows. Those arithmetic figures were wrong: the
multiplies' chains started from a constant 0, LLVM dropped them, and the mixed loop spilled registers.
Corrected (2026-12-07 evening, two runs): Q4_1's arithmetic 73 % (64 dots + 8 multiplies + 16 multiply-adds,
88 slots a block and 8 rows), its 8-row tile 61-69 % in L2, 84-95 % of that; Q8_0 81 %, its tile 73-74 %.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from typing import Sequence

import llvmlite.ir as ir
import numpy as np

from ..formats.quant import QType, quantize
from .compiler import compile_module, default_target
from .ir_dot import V16I32, V64I8, dot4
from .irutil import F32, I64, I8, fmuladd, vec
from .layout import PACKED_TYPES, act_bytes, aligned_zeros, pack_weights
from .library import compile_kernels
from .specs import KernelSpec, Op

CHAINS, DEPTH = 12, 4  # accumulators, dots per accumulator per iteration
MIX_CHAINS = 6  # accumulators per kind when several kinds share the loop
MACS_PER_DOT = 64  # 16 lanes x 4 byte products
V16F32 = vec(F32, 16)


def peak_function(ops: dict[str, int] | None = None):
    """i64 peak(i64 iterations, i8* 8 x 64 bytes): per iteration CHAINS x DEPTH dots, or `ops` (counts of "dot",
    "mul", "fma": 512-bit dots, f32 multiplies and multiply-adds), each kind spread over up to CHAINS independent
    accumulators (MIX_CHAINS each when there are several kinds, so that all of them and their sources fit the 32
    vector registers: spilled, the loop measured the stack) so that only the rate the core issues them at limits
    the loop, not their latency; returns a lane of the dots' sum (and of the floats' bits). The float chains
    start from loaded values near 1 and multiply by such: a product chain from a constant 0 stays 0, and LLVM
    dropped it (the multiplies then looked free)."""
    ops = ops or {"dot": CHAINS * DEPTH}
    target = default_target()
    module = ir.Module(name="peak")
    module.triple = target.triple
    fn = ir.Function(module, ir.FunctionType(I64, [I64, I8.as_pointer()]), "peak")
    n, buf = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ptr = b.bitcast(buf, V64I8.as_pointer())
    kinds = {kind: V16I32 if kind == "dot" else V16F32 for kind, count in ops.items() if count}
    chains, sources = (MIX_CHAINS, 4) if len(kinds) > 1 else (CHAINS, 8)
    vals = [b.load(b.gep(ptr, [ir.Constant(I64, j)]), align=1) for j in range(sources)]
    # floats 1 + (0..7) * 2^-24: no operand or result is ever subnormal or overflows (no slow path)
    small, one = ir.Constant(V16I32, [7] * 16), ir.Constant(V16F32, [1.0] * 16)
    ulp = ir.Constant(V16F32, [2.0**-24] * 16)
    floats = [b.fadd(one, b.fmul(b.sitofp(b.and_(b.bitcast(v, V16I32), small), V16F32), ulp)) for v in vals]
    entry, loop, done = b.block, fn.append_basic_block("loop"), fn.append_basic_block("done")
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I64)
    accs = {kind: [b.phi(typ) for _ in range(min(chains, ops[kind]))] for kind, typ in kinds.items()}
    new = {kind: list(phis) for kind, phis in accs.items()}
    for kind in kinds:
        for j in range(ops[kind]):
            c, d = j % len(new[kind]), j // len(new[kind])  # chain, depth
            acc = new[kind][c]
            if kind == "dot":
                acc = dot4(b, target, acc, vals[(c + d) % sources], vals[(c + 3 * d + 1) % sources], wmax=127)
            elif kind == "mul":
                acc = b.fmul(acc, floats[j % sources])
            else:
                acc = fmuladd(b, floats[j % sources], floats[(j + 1) % sources], acc)
            new[kind][c] = acc
    nxt = b.add(i, ir.Constant(I64, 1))
    b.cbranch(b.icmp_unsigned("<", nxt, n), loop, done)
    i.add_incoming(ir.Constant(I64, 0), entry)
    i.add_incoming(nxt, loop)
    for kind, typ in kinds.items():
        for j, (acc, value) in enumerate(zip(accs[kind], new[kind])):
            acc.add_incoming(ir.Constant(typ, None) if kind == "dot" else floats[j % sources], entry)
            acc.add_incoming(value, loop)
    b.position_at_end(done)
    total = ir.Constant(I64, 0)
    for kind, values in new.items():
        for value in values:
            lane = b.extract_element(b.bitcast(value, V16I32), ir.Constant(ir.IntType(32), 0))
            total = b.add(total, b.sext(lane, I64))
    b.ret(total)
    compiled = compile_module(module, target, None)
    fn_ptr = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)(compiled.address("peak"))
    return fn_ptr, compiled


def tile_ops(qtype: QType) -> dict[str, int]:
    """The arithmetic that shares the dot instruction's issue slots in one 32-weight block of a 16-row group, per
    activation row, in the matmul tiles (ir_matvec._emit_tile, AVX512-VNNI): 8 dots, the block scale's multiply
    (x d_x) and multiply-add (x d_w), Q4_1 one more multiply-add (m_w x d_x s_x). Those three products of the
    scales are distinct per weight row, block and activation row, so no arrangement needs fewer. Left out: the
    conversion, the 4-bit unpack and the loads, which run beside them."""
    return {"dot": 64, "mul": 8, "fma": 16 if qtype == QType.Q4_1 else 8}


def arithmetic_macs(qtype: QType) -> float:
    """Multiply-adds per second, one thread, of tile_ops(qtype) alone: the rate the tiles' arithmetic allows."""
    ops = tile_ops(qtype)
    fn, _compiled = peak_function(ops)
    return peak_macs(fn, 1, 1_000_000, ops["dot"])[0]


def peak_macs(fn, threads: int, iterations: int = 5_000_000, dots: int = CHAINS * DEPTH) -> list[float]:
    """Multiply-adds per second of the dot loop fn (peak_function's, `dots` dots an iteration), per thread,
    `threads` running at once (best of 3)."""
    buf = (np.arange(8 * 64) % 97).astype(np.uint8)
    best = [0.0] * threads

    def run(k: int) -> None:
        t0 = time.perf_counter()
        fn(iterations, buf.ctypes.data)
        best[k] = max(best[k], iterations * dots * MACS_PER_DOT / (time.perf_counter() - t0))

    for _ in range(3):
        workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return best


def tile_macs(qtype: QType, rows: int, k: int, ns: Sequence[int], reps: int) -> list[float]:
    """Multiply-adds per second of the matmul kernel for each n in ns activation rows over a random rows x k matrix."""
    rng = np.random.default_rng(int(qtype))
    packed = pack_weights(quantize(rng.standard_normal((rows, k)).astype(np.float32), qtype), qtype, (rows, k))
    spec = KernelSpec(Op.MATMUL, qtype, 8)
    lib = compile_kernels([spec, KernelSpec(Op.QUANTIZE)])
    return [_time_tile(lib, spec, packed, rng, n, reps) for n in ns]


def _time_tile(lib, spec: KernelSpec, packed, rng: np.random.Generator, n: int, reps: int) -> float:
    rows, k = packed.rows, packed.k
    acts = aligned_zeros((n, act_bytes(k)), np.uint8)
    x = rng.standard_normal((n, k)).astype(np.float32)
    lib[KernelSpec(Op.QUANTIZE).name](x.ctypes.data, acts.ctypes.data, k, n)
    y = aligned_zeros((n, packed.padded_rows), np.float32)
    f, args = lib[spec.name], (packed.data.ctypes.data, acts.ctypes.data, y.ctypes.data, k, 0, rows, n, packed.padded_rows)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return rows * k * n / best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dllp2p.jit.bench_tiles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_1", "Q8_0"], choices=[q.name for q in PACKED_TYPES])
    p.add_argument("--shape", type=int, nargs=2, default=(1536, 576), metavar=("ROWS", "K"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="activation rows per call")
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args(argv)
    fn, _compiled = peak_function()
    one = peak_macs(fn, 1)[0]
    two = peak_macs(fn, 2)
    print(f"dot peak: 1 thread {one / 1e9:.0f} G multiply-adds/s; 2 threads at once "
          f"{' + '.join(f'{v / 1e9:.0f}' for v in two)} = {sum(two) / 1e9:.0f} G ({sum(two) / one:.2f}x one)")
    rows, k = a.shape
    for name in a.types:
        shares = [f"{n} rows {macs / 1e9:.0f} G ({100 * macs / one:.0f} %)"
                  for n, macs in zip(a.rows, tile_macs(QType[name], rows, k, a.rows, a.reps))]
        arith = arithmetic_macs(QType[name])
        print(f"{name} {rows} x {k}, 1 thread: " + ", ".join(shares)
              + f"; its arithmetic alone {arith / 1e9:.0f} G ({100 * arith / one:.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
