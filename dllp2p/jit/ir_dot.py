"""The building blocks every quantized-product kernel shares: the 4-byte-group u8 x s8 -> s32 dot per
instruction set (`vpdpbusd` on AVX512-VNNI, `vpmaddubsw` pairs on AVX2, `sdot` or widening NEON multiplies
on aarch64, plain vector IR elsewhere), the weight-stream prefetch and the row stores. The kernels that use
them: ir_matvec.py (Q4_0, Q4_1, Q8_0) and ir_matvec_extra.py (the 5/6-bit, K-quant and IQ4 types)."""

from __future__ import annotations

import llvmlite.binding as llvm
import llvmlite.ir as ir

from .compiler import Target
from .irutil import (
    F32, I32, I8, PTR, Signature, VOID, for_range, gep, i32, i64, intrinsic, load, mask, splat, store, vec,
)
from .layout import G

V16I32, V64I8, V16F32 = vec(I32, 16), vec(I8, 64), vec(F32, 16)
# Software prefetch this many bytes ahead in the weight stream, every line of every chunk: the hardware
# prefetchers alone leave a single core well short of memory bandwidth on a linear stream. Measured on
# Zen 3 (SmolLM2 decode, variants compiled side by side and alternated in one process): 1024 B beats
# 4096 B by 5-13 % on 1 and 2 threads, 512 and 2048 B fall in between; one prefetch per chunk instead
# of one per line loses 30 %, and a second, farther prefetch stream loses 20 % (issue slots).
PREFETCH_AHEAD = 1024
# x86: into L2 only (llvm.prefetch locality 2 = prefetcht1), not into L1 (3 = prefetcht0). Measured on
# the Zen 4 VM (AVX-512 VNNI), variants compiled side by side, passes alternated in one process, busy
# machine (load 4-7 on 2 vCPUs), as paired ratios: the Q8_0 matvec over a 262144 x 640 matrix (Gemma 3's
# output projection) streams at 82-84 % of a plain read loop (membw) on the same buffer with prefetcht0
# and 100-104 % with prefetcht1 (no prefetch: 94-99 %; prefetchnta 87-89 %); Q4_0 / Q4_1 94 / 84 % ->
# 108-111 / 99-109 %. Whole decode steps: Gemma 3 270M 1.19-1.21x, SmolLM2 1.18-1.19x tokens per second on
# 1 thread, Gemma 1.14x on 2. Filling L1 ahead of use holds L1 miss buffers the demand loads need; L2 has
# the deeper queue. That is the decode kernel (one activation row, a pure stream); the matrix-matrix tiles
# (prefill, batches: compute-bound, each weight line used by several rows) keep the L1 hint, as do other
# ISAs (AArch64): not measured there.
PREFETCH_LOCALITY_STREAM_X86 = 2
PREFETCH_LOCALITY = 3
# x86, the matrix-matrix tiles of 4 and 8 rows (batched decode steps; prefill's tiles are 8 rows): 8 KB ahead,
# into L2 (tile_prefetch's 'far'). 1 KB ahead (the decode kernel's distance) is ~40 ns ahead of a tile that spends
# 4-8 rows' work on each weight byte, under the memory's latency: two cores' 4-row tiles streamed 33.5 GB/s where the
# decode kernel pulls 41. Zen 4 VM, batchbench --old (same process, builds alternating, 11 rounds, SmolLM2, 2
# threads), old / new step time: 4 rows 1.10 / 1.13 / 1.08 (8 KB), 1.11 (4 KB), 1.10 (16 KB); 8 rows 1.09 / 1.11
# (8 KB), 1.08 (4 KB), 1.07 (16 KB); prefetcht0 4 KB ahead at 4 rows 1.00; the 2-row tile 0.92-1.04 (4 KB:
# 0.98-1.00), left without. The K-quant / 5-bit / IQ4 tiles too (Gemma 3's 4 / 8-row steps 1.07 / 1.07-1.09x).
# AVX2 code timed on the same VM (DLLP2P_TARGET_CPU=znver3): 4 rows 1.11-1.14x, 8 rows 0.97-0.98x, so its 8-row
# tiles keep 'near'. Other ISAs: 'near' (not measured).
TILE_PREFETCH_AHEAD_X86 = 8192
PAIR_GROUPS = 1  # row groups walked side by side when decoding; 2 measured no faster on Zen 3 (AVX2)
TILE_SIG = Signature(tuple((n, k) for n, k in (("w", "p"), ("x", "p"), ("xs", "i"), ("y", "p"), ("ldy", "i"),
                                                 ("k", "i"), ("r0", "i"), ("r1", "i"))))


# --- the 4-byte-group dot product, per instruction set -------------------------------------------------

def dot4(b: ir.IRBuilder, target: Target, acc: ir.Value, u: ir.Value, s: ir.Value, wmax: int = 255) -> ir.Value:
    """acc <16 x i32> + per lane i: sum_{j<4} u8 u[4i+j] * s8 s[4i+j]  (u, s: <64 x i8>), every u byte <= wmax.
    AArch64 multiplies signed bytes only, so there wmax must be <= 127 (Q8_0's biased bytes: _block_dots)."""
    if target.is_aarch64:
        if wmax > 127:
            raise ValueError(f"AArch64 dots take weights <= 127 as s8, not up to {wmax}")
        return _neon_sdot(b, target, acc, u, s)
    if target.dot_isa == "avx512vnni":
        return _vpdpbusd(b, 16, acc, u, s)
    if target.dot_isa == "avxvnni":
        halves = []
        for h in range(2):
            def part(v: ir.Value, n: int) -> ir.Value:
                return b.shuffle_vector(v, v, mask(range(h * n, h * n + n)))
            halves.append(_vpdpbusd(b, 8, part(acc, 8), part(u, 32), part(s, 32)))
        return b.shuffle_vector(halves[0], halves[1], mask(range(16)))
    v64 = vec(I32, 64)
    prod = b.mul(b.zext(u, v64), b.sext(s, v64))
    lanes = [b.shuffle_vector(prod, prod, mask(range(j, 64, 4))) for j in range(4)]
    return b.add(acc, b.add(b.add(lanes[0], lanes[1]), b.add(lanes[2], lanes[3])))


def _vpdpbusd(b: ir.IRBuilder, lanes: int, acc: ir.Value, u: ir.Value, s: ir.Value) -> ir.Value:
    """llvm.x86.avx512.vpdpbusd.{512,256} (VEX-encoded on AVX-VNNI): acc <lanes x i32>, u/s <4*lanes x i8>.

    LLVM 22 declares the byte operands as <4*lanes x i8> (llvm-project #155194); older LLVMs as
    <lanes x i32>, which LLVM 22 still auto-upgrades. Declare whichever the linked LLVM expects."""
    v32, v8 = vec(I32, lanes), vec(I8, 4 * lanes)
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    if llvm.llvm_version_info[0] >= 22:
        return b.call(intrinsic(b.module, name, v32, [v32, v8, v8]), [acc, u, s])
    fn = intrinsic(b.module, name, v32, [v32, v32, v32])
    return b.call(fn, [acc, b.bitcast(u, v32), b.bitcast(s, v32)])


def _neon_sdot(b: ir.IRBuilder, target: Target, acc: ir.Value, a: ir.Value, s: ir.Value) -> ir.Value:
    """acc <16 x i32> + per lane i: sum_{j<4} s8 a[4i+j] * s8 s[4i+j]  (a, s: <64 x i8>), in four 128-bit
    quarters. 'dotprod' (Cortex-A55/A76, Raspberry Pi 5): one `sdot` per quarter. 'neon' (Cortex-A72,
    Raspberry Pi 4): `smull` to 8 exact s16 products (|p| <= 128 * 128), `saddlp` adds pairs into s32,
    `addp` adds the pairs of pairs: the same sums, exact."""
    v4i32, v16i8, v8i16 = vec(I32, 4), vec(I8, 16), vec(ir.IntType(16), 8)
    def part(v: ir.Value, lo: int, n: int) -> ir.Value:
        return b.shuffle_vector(v, v, mask(range(lo, lo + n)))
    quarters = []
    for q in range(4):
        acc4 = part(acc, 4 * q, 4)
        if target.dot_isa == "dotprod":
            sdot = intrinsic(b.module, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
            quarters.append(b.call(sdot, [acc4, part(a, 16 * q, 16), part(s, 16 * q, 16)]))
            continue
        saddlp = intrinsic(b.module, "llvm.aarch64.neon.saddlp.v4i32.v8i16", v4i32, [v8i16])
        addp = intrinsic(b.module, "llvm.aarch64.neon.addp.v4i32", v4i32, [v4i32, v4i32])
        pairs = [b.call(saddlp, [b.mul(b.sext(part(a, 16 * q + 8 * h, 8), v8i16), b.sext(part(s, 16 * q + 8 * h, 8), v8i16))])
                 for h in range(2)]
        quarters.append(b.add(acc4, b.call(addp, pairs)))
    halves = [b.shuffle_vector(quarters[2 * h], quarters[2 * h + 1], mask(range(8))) for h in range(2)]
    return b.shuffle_vector(halves[0], halves[1], mask(range(16)))




def bcast4(b: ir.IRBuilder, ptr: ir.Value, off: ir.Value) -> ir.Value:
    """The 4 bytes at ptr + off repeated into all 16 lanes of a <64 x i8>."""
    return b.bitcast(splat(b, load(b, ptr, I32, off), 16), V64I8)


def avx2_halves(b: ir.IRBuilder, v: ir.Value) -> list[ir.Value]:
    """<64 x i8> -> two <32 x i8> (one ymm register each)."""
    return [b.shuffle_vector(v, v, mask(range(h * 32, h * 32 + 32))) for h in range(2)]


def prefetch(b: ir.IRBuilder, chunk: ir.Value, nbytes: int, how: str) -> None:
    """Read hints for the lines of the chunk some bytes past `chunk`, `how` as tile_prefetch says: 'near'
    PREFETCH_AHEAD into all cache levels; on x86 'stream' (the decode kernel's pure weight stream) as far into L2
    only, 'far' (matrix-matrix tiles) TILE_PREFETCH_AHEAD_X86 into L2 (see above); elsewhere all as 'near'."""
    if PREFETCH_AHEAD <= 0:
        return
    fn = intrinsic(b.module, "llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
    x86 = str(b.module.triple).startswith(("x86_64", "i686", "i386"))
    locality = PREFETCH_LOCALITY_STREAM_X86 if how != "near" and x86 else PREFETCH_LOCALITY
    ahead = TILE_PREFETCH_AHEAD_X86 if how == "far" and x86 else PREFETCH_AHEAD
    for off in range(0, nbytes, 64):
        b.call(fn, [gep(b, chunk, i64(ahead + off)), i32(0), i32(locality), i32(1)])


def tile_prefetch(target: Target, tile: int) -> str | None:
    """How a Q4_0 / Q4_1 / Q8_0 tile of `tile` activation rows prefetches its weights (prefetch's `how`), or None:
    'stream' for the decode kernel; on x86 'far' for 4 rows, and for 8 with AVX-512 VNNI (AVX2's 8-row tile, twice
    the instructions a dot, is compute-bound and keeps 'near'; measurements above); 'near' for other 8-row tiles;
    none for 2 rows (ir_matvec.py)."""
    if tile == 1:
        return "stream"
    if target.is_x86 and (tile == 4 or (tile == 8 and target.dot_isa == "avx512vnni")):
        return "far"
    return "near" if tile == 8 else None


def store_rows(b: ir.IRBuilder, v: ir.Value, y: ir.Value, r: ir.Value, r1: ir.Value) -> None:
    """y[r : min(r + 16, r1)] = v[:that many]."""
    full = b.icmp_signed("<=", b.add(r, i64(G)), r1)
    with b.if_else(full) as (then, otherwise):
        with then:
            store(b, v, y, r, F32)
        with otherwise:
            with for_range(b, i64(0), b.sub(r1, r), name="lane") as lane:
                store(b, b.extract_element(v, lane), y, b.add(r, lane), F32)
