"""IR for the quantized products of the 5- and 6-bit, K-quant and IQ4 types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K,
IQ4_NL, IQ4_XS: layout.EXTRA_TYPES), built from ir_dot.py's blocks like ir_matvec.py's Q4_0 kernels, and
their embedding-row lookup."""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats.quant import IQ4_VALUES, QType
from .compiler import Target
from .ir_dot import V16I32, V64I8, V16F32, TILE_SIG, dot4, bcast4, avx2_halves, prefetch, store_rows, tile_prefetch
from .irutil import (
    F16, F32, I32, I64, I8, define, entry_alloca, fmuladd, for_range, gep, hsum, i32, i64, intrinsic, load, mask,
    splat, splat_const, store, vec,
)
from .layout import G, chunk_bytes, unit_values
from .specs import KernelSpec

SUPER_BLOCK_PREFETCH = False  # prefetch K-quant super-blocks when decoding too (the A/B baseline; see below)

# --- Q5_0, Q5_1 and the K-quants (layouts: layout.py, "the 5- and 6-bit and K-quant types") ---------------
#
# Per 32 values and 16 rows the kernel loads 4 nibble vectors and one (5-bit) or two (6-bit) high-bit
# planes, rebuilds u8 values 0..31 / 0..63 (shift, mask, or), and takes u8 x s8 dots as for Q4_0: the
# value rebuilding is per group and block, shared by every activation row of a matmul tile. Per block
# and activation row the f32 work is, with dot = sum q * xq (exact i32) and dx, sx from Q8S:
#
#   Q5_0   acc += d * (dx * (dot - 16 sx))
#   Q5_1   acc += d * (dx * dot);  acc += m * (dx * sx)
#   Q4_K, Q5_K (sub-block j)   acc += (d sc_j) * (dx * dot);  acc += (dmin m_j) * -(dx * sx)
#   Q6_K (halves h of 16)      acc += (d sc_h) * (dx * (dot_h - 32 sx_h)),  sx_lo summed here, sx_hi = sx - sx_lo
#
# d sc_j is exact in f32 (an f16 times a 6- or 8-bit integer), so the rounding per term is the same as
# Q4_1's: the error bound of the tests is (terms + 3) U sum|terms| with two terms per 32 values.
# IQ4_NL / IQ4_XS: nibbles looked up (vpshufb) as u8 table value + 128, acc += (d ls_j) * (dx * (dot - 128 sx)).
#
# Cost, counted in the matvec's block loop (instructions per 64 B of packed weights; not timed here):
#   AVX-512 VNNI (+GFNI, which LLVM uses for the byte shifts): Q4_0 12.7, Q4_1 11.6, Q8_0 6.7, Q5_0 13.5,
#   Q5_1 12.3, Q4_K 9.9, Q5_K 12.8, Q6_K 13.6, IQ4_NL 14.4, IQ4_XS 11.4: within ~15% of Q4_0, so where
#   Q4_0 keeps up with memory these should too.
#   AVX2 (haswell): Q4_0 24.9, Q4_1 22.6, Q8_0 16.5, Q5_0 33.3, Q5_1 29.8, Q4_K 24.1, Q5_K 31.2,
#   Q6_K 31.4, IQ4_NL 40.7, IQ4_XS 37.0: the 5/6-bit types cost ~1.3x Q4_0 per byte and IQ4 ~1.6x
#   (vpmaddubsw's saturation forces the sign trick and a widening per product): likely compute-bound
#   on one AVX2 core.

def _dot_pairs(b: ir.IRBuilder, target: Target, pairs: list[tuple[ir.Value, ir.Value]], wmax: int) -> ir.Value:
    """<16 x i32>: per row lane, sum over pairs of the 4-byte u8 x s8 dots of (w, x) (<64 x i8> each),
    where every w byte is <= wmax and |x| <= 127. AVX2: vpmaddubsw pair sums (<= 2 wmax 127, never
    saturating) are added in i16 as long as they provably fit (32767 // (2 wmax 127) of them), then
    widened by vpmaddwd."""
    if target.dot_isa != "avx2":
        zero = ir.Constant(V16I32, None)
        acc = [zero, zero]
        for i, (w, x) in enumerate(pairs):
            acc[i % 2] = dot4(b, target, acc[i % 2], w, x, wmax)
        return b.add(acc[0], acc[1])
    v32i8, v16i16, v8i32 = vec(I8, 32), vec(ir.IntType(16), 16), vec(I32, 8)
    maddubs = intrinsic(b.module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = intrinsic(b.module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    ones = splat_const(ir.IntType(16), 16, 1)
    per = max(1, 32767 // (2 * wmax * 127))
    acc32: list = [None, None]
    for start in range(0, len(pairs), per):
        acc16: list = [None, None]
        for w, x in pairs[start : start + per]:
            wh, xh = avx2_halves(b, w), avx2_halves(b, x)
            for h in range(2):
                p = b.call(maddubs, [wh[h], xh[h]])
                acc16[h] = p if acc16[h] is None else b.add(acc16[h], p)
        for h in range(2):
            wide = b.call(maddwd, [acc16[h], ones])
            acc32[h] = wide if acc32[h] is None else b.add(acc32[h], wide)
    return b.shuffle_vector(acc32[0], acc32[1], mask(range(16)))


def _shift_bytes(b: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """<64 x i8> shifted left by n (right by -n) bits, per byte."""
    if n == 0:
        return v
    amount = splat_const(I8, 64, abs(n))
    return b.shl(v, amount) if n > 0 else b.lshr(v, amount)


def _block_values(b: ir.IRBuilder, wq: ir.Value, bits: int) -> list[tuple[ir.Value, ir.Value]]:
    """The 32-value block whose nibble lanes start at wq (and high planes right after them): for each of
    the 4 steps, (u8 values of elements 4j..4j+3, u8 values of 16+4j..16+4j+3), <64 x i8> each."""
    lo_mask, four = splat_const(I8, 64, 15), splat_const(I8, 64, 4)
    planes = [load(b, wq, V64I8, i64(256 + 64 * p)) for p in range(0 if bits == 4 else 1 if bits == 5 else 2)]
    out = []
    for j in range(4):
        v = load(b, wq, V64I8, i64(64 * j))
        lo, hi = b.and_(v, lo_mask), b.lshr(v, four)
        if bits == 5:  # bit j -> bit 4 (low nibble's element), bit 4 + j -> bit 4 (high nibble's)
            bit4 = splat_const(I8, 64, 16)
            lo = b.or_(lo, b.and_(_shift_bytes(b, planes[0], 4 - j), bit4))
            hi = b.or_(hi, b.and_(_shift_bytes(b, planes[0], -j), bit4))
        elif bits == 6:  # bits 2j, 2j + 1 -> bits 4, 5
            top = splat_const(I8, 64, 0x30)
            lo = b.or_(lo, b.and_(_shift_bytes(b, planes[0], 4 - 2 * j), top))
            hi = b.or_(hi, b.and_(_shift_bytes(b, planes[1], 4 - 2 * j), top))
        out.append((lo, hi))
    return out


def _value_dots(b, target, values, xq, bits: int, halves: bool = False):
    """Dots of one block's rebuilt values with the activation block at xq: one <16 x i32>, or with
    `halves` (elements 0..15, elements 16..31)."""
    wmax = (1 << bits) - 1
    lo = [(v[0], bcast4(b, xq, i64(4 * j))) for j, v in enumerate(values)]
    hi = [(v[1], bcast4(b, xq, i64(16 + 4 * j))) for j, v in enumerate(values)]
    if halves:
        return _dot_pairs(b, target, lo, wmax), _dot_pairs(b, target, hi, wmax)
    return _dot_pairs(b, target, lo + hi, wmax)


def _lookup16(b: ir.IRBuilder, target: Target, idx: ir.Value, table: list[int]) -> ir.Value:
    """<64 x i8> of table[idx[i]] for indices 0..15: vpshufb on x86 (AVX-512BW: one instruction; AVX2:
    two), a select chain elsewhere."""
    if target.dot_isa == "avx512vnni":
        fn = intrinsic(b.module, "llvm.x86.avx512.pshuf.b.512", V64I8, [V64I8, V64I8])
        return b.call(fn, [ir.Constant(V64I8, [ir.Constant(I8, table[i % 16]) for i in range(64)]), idx])
    if target.dot_isa in ("avx2", "avxvnni"):
        v32 = vec(I8, 32)
        fn = intrinsic(b.module, "llvm.x86.avx2.pshuf.b", v32, [v32, v32])
        t32 = ir.Constant(v32, [ir.Constant(I8, table[i % 16]) for i in range(32)])
        halves = [b.call(fn, [t32, h]) for h in avx2_halves(b, idx)]
        return b.shuffle_vector(halves[0], halves[1], mask(range(64)))
    if target.is_aarch64:  # tbl: one 16-entry byte lookup per 128-bit quarter
        v16 = vec(I8, 16)
        fn = intrinsic(b.module, "llvm.aarch64.neon.tbl1.v16i8", v16, [v16, v16])
        t16 = ir.Constant(v16, [ir.Constant(I8, t) for t in table])
        q = [b.call(fn, [t16, b.shuffle_vector(idx, idx, mask(range(16 * i, 16 * i + 16)))]) for i in range(4)]
        halves = [b.shuffle_vector(q[2 * h], q[2 * h + 1], mask(range(32))) for h in range(2)]
        return b.shuffle_vector(halves[0], halves[1], mask(range(64)))
    out = splat_const(I8, 64, table[0])
    for i in range(1, 16):
        out = b.select(b.icmp_unsigned("==", idx, splat_const(I8, 64, i)), splat_const(I8, 64, table[i]), out)
    return out


def _signed_dot_pairs(b: ir.IRBuilder, pairs: list[tuple[ir.Value, ir.Value]]) -> ir.Value:
    """AVX2: <16 x i32> sum of 4-byte s8 x s8 dots, as |w| * (x * sign(w)) (vpsignb, vpabsb): a pair sum
    is at most 2 * 127 * 127 (|w| <= 127: no -128 weights here), widened per product (vpmaddwd)."""
    v32i8, v16i16, v8i32 = vec(I8, 32), vec(ir.IntType(16), 16), vec(I32, 8)
    mod = b.module
    maddubs = intrinsic(mod, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = intrinsic(mod, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    psign = intrinsic(mod, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
    absb = intrinsic(mod, "llvm.abs.v32i8", v32i8, [v32i8, ir.IntType(1)])
    ones = splat_const(ir.IntType(16), 16, 1)
    acc: list = [None, None]
    for w, x in pairs:
        wh, xh = avx2_halves(b, w), avx2_halves(b, x)
        for h in range(2):
            prod = b.call(maddubs, [b.call(absb, [wh[h], ir.Constant(ir.IntType(1), 0)]), b.call(psign, [xh[h], wh[h]])])
            wide = b.call(maddwd, [prod, ones])
            acc[h] = wide if acc[h] is None else b.add(acc[h], wide)
    return b.shuffle_vector(acc[0], acc[1], mask(range(16)))


def _iq4_dot(b: ir.IRBuilder, target: Target, wq: ir.Value, xq: ir.Value, sx: ir.Value) -> ir.Value:
    """<16 x i32> sum_i IQ4_VALUES[nibble_i] * xq_i for the IQ4 block whose lanes start at wq. The table
    is looked up as u8 (value + 128) for u8 x s8 dots, then 128 * sx taken off; on AVX2 as s8 (vpmaddubsw
    would saturate on u8 values up to 241) and on AArch64 (sdot / smull take s8: |value| <= 127)."""
    signed = target.dot_isa == "avx2" or target.is_aarch64
    table = [int(v) + (0 if signed else 128) for v in IQ4_VALUES]
    table = [t - 256 if t > 127 else t for t in table]  # as i8 bit patterns
    lo_mask, four = splat_const(I8, 64, 15), splat_const(I8, 64, 4)
    pairs = []
    for j in range(4):
        v = load(b, wq, V64I8, i64(64 * j))
        pairs.append((_lookup16(b, target, b.and_(v, lo_mask), table), bcast4(b, xq, i64(4 * j))))
        pairs.append((_lookup16(b, target, b.lshr(v, four), table), bcast4(b, xq, i64(16 + 4 * j))))
    if target.is_aarch64:
        return _dot_pairs(b, target, pairs, 127)  # s8 table values, |v| <= 127: sdot / smull as they are
    if signed:
        return _signed_dot_pairs(b, pairs)
    return b.sub(_dot_pairs(b, target, pairs, 255), splat(b, b.mul(sx, i32(128)), 16))


def _f16x16(b: ir.IRBuilder, wc: ir.Value, off: int) -> ir.Value:
    return b.fpext(load(b, wc, vec(F16, G), i64(off)), V16F32)


def _bytes_f32(b: ir.IRBuilder, wc: ir.Value, off: int, signed: bool) -> ir.Value:
    v = load(b, wc, vec(I8, G), i64(off))
    return b.sitofp(v, V16F32) if signed else b.uitofp(v, V16F32)


def _emit_tile_extra(module: ir.Module, qtype: QType, tile: int, target: Target) -> ir.Function:
    """Internal f(w, x, xs, y, ldy, k, r0, r1) as _emit_tile, for the types of layout.EXTRA_TYPES."""
    fn, b = define(module, f"_tile_{qtype.name.lower()}_q8s_x{tile}", TILE_SIG, internal=True)
    w, x, xs, y, ldy, k, r0, r1 = fn.args
    cb = chunk_bytes(qtype)
    unit = unit_values(qtype)
    nu = b.udiv(k, i64(unit))
    nb = b.lshr(k, i64(5))
    d_off, s_off = k, b.add(k, b.shl(nb, i64(2)))
    accs = [entry_alloca(b, V16F32, name=f"acc{t}") for t in range(tile)]
    xts = [gep(b, x, b.mul(xs, i64(t))) for t in range(tile)]

    def act(t: int, blk: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(xq pointer, dx, sx) of activation row t's 32-value block blk."""
        return (gep(b, xts[t], b.shl(blk, i64(5))), load(b, gep(b, xts[t], d_off), F32, blk, F32),
                load(b, gep(b, xts[t], s_off), I32, blk, I32))

    def add(t: int, scale: ir.Value, factor: ir.Value) -> None:
        """acc[t] += scale (16 rows) * splat(factor)."""
        b.store(fmuladd(b, scale, splat(b, factor, 16), b.load(accs[t], typ=V16F32)), accs[t])

    def add_v(t: int, scale: ir.Value, dx: ir.Value, dot: ir.Value) -> None:
        """acc[t] += scale * (dx * dot) with dot <16 x i32>."""
        b.store(fmuladd(b, scale, b.fmul(splat(b, dx, 16), b.sitofp(dot, V16F32)), b.load(accs[t], typ=V16F32)), accs[t])

    def block_q5(wc: ir.Value, u: ir.Value) -> None:
        values = _block_values(b, wc, 5)
        d = _f16x16(b, wc, 320)
        m = _f16x16(b, wc, 352) if qtype == QType.Q5_1 else None
        for t in range(tile):
            xq, dx, sx = act(t, u)
            dot = _value_dots(b, target, values, xq, 5)
            if m is None:
                add_v(t, d, dx, b.sub(dot, splat(b, b.mul(sx, i32(16)), 16)))
            else:
                add_v(t, d, dx, dot)
                add(t, m, b.fmul(dx, b.sitofp(sx, F32)))

    def super_k(wc: ir.Value, u: ir.Value) -> None:
        bits = 4 if qtype == QType.Q4_K else 5
        d, dmin = _f16x16(b, wc, 0), _f16x16(b, wc, 32)
        sub = 256 if bits == 4 else 320
        for j in range(8):
            scale = b.fmul(d, _bytes_f32(b, wc, 64 + 16 * j, False))
            mins = b.fmul(dmin, _bytes_f32(b, wc, 192 + 16 * j, False))
            values = _block_values(b, gep(b, wc, i64(320 + sub * j)), bits)
            blk = b.add(b.shl(u, i64(3)), i64(j))
            for t in range(tile):
                xq, dx, sx = act(t, blk)
                add_v(t, scale, dx, _value_dots(b, target, values, xq, bits))
                add(t, mins, b.fneg(b.fmul(dx, b.sitofp(sx, F32))))

    def super_q6(wc: ir.Value, u: ir.Value) -> None:
        d = _f16x16(b, wc, 0)
        v16i8, v16i32 = vec(I8, 16), vec(I32, 16)
        for j in range(8):
            scales = [b.fmul(d, _bytes_f32(b, wc, 32 + 16 * (2 * j + h), True)) for h in range(2)]
            values = _block_values(b, gep(b, wc, i64(288 + 384 * j)), 6)
            blk = b.add(b.shl(u, i64(3)), i64(j))
            for t in range(tile):
                xq, dx, sx = act(t, blk)
                sx_lo = hsum(b, b.sext(load(b, xq, v16i8), v16i32))
                dots = _value_dots(b, target, values, xq, 6, halves=True)
                for h, part in enumerate((sx_lo, b.sub(sx, sx_lo))):
                    add_v(t, scales[h], dx, b.sub(dots[h], splat(b, b.mul(part, i32(32)), 16)))

    def block_iq4nl(wc: ir.Value, u: ir.Value) -> None:
        d = _f16x16(b, wc, 256)
        for t in range(tile):
            xq, dx, sx = act(t, u)
            add_v(t, d, dx, _iq4_dot(b, target, wc, xq, sx))

    def super_iq4xs(wc: ir.Value, u: ir.Value) -> None:
        d = _f16x16(b, wc, 0)
        for j in range(8):
            scale = b.fmul(d, _bytes_f32(b, wc, 32 + 16 * j, True))
            wq = gep(b, wc, i64(160 + 256 * j))
            blk = b.add(b.shl(u, i64(3)), i64(j))
            for t in range(tile):
                xq, dx, sx = act(t, blk)
                add_v(t, scale, dx, _iq4_dot(b, target, wq, xq, sx))

    # Decoding (tile 1), K-quant super-blocks (2-3.4 KB chunks) stream best without software prefetch:
    # measured on the Zen 4 VM as in ir_dot.py, over 131072 x 2048 matrices, Q4_K 95-97 % of membw without,
    # 79 % with prefetcht0 and 90-93 % with prefetcht1 (per chunk or spread over its sub-blocks); Q6_K 83-84 %
    # without, 64-70 % / 68-77 %. In whole Gemma decode steps, none and prefetcht1 spread over the 8
    # sub-blocks were within noise of each other: none, the simpler.
    body = {QType.Q5_0: block_q5, QType.Q5_1: block_q5, QType.Q4_K: super_k, QType.Q5_K: super_k,
            QType.Q6_K: super_q6, QType.IQ4_NL: block_iq4nl, QType.IQ4_XS: super_iq4xs}[qtype]
    with for_range(b, r0, r1, G, name="r") as r:
        wg = gep(b, w, b.mul(b.mul(b.lshr(r, i64(4)), nu), i64(cb)))
        for a in accs:
            b.store(ir.Constant(V16F32, None), a)
        with for_range(b, i64(0), nu, name="unit") as u:
            wc = gep(b, wg, b.mul(u, i64(cb)))
            if unit == 32 or tile > 1 or SUPER_BLOCK_PREFETCH:  # not a decode stream of super-blocks: see above
                # as ir_matvec's tiles, but 'near' where those have none (Gemma 3 on Zen 4, 'far' in the 4- and
                # 8-row tiles: steps 1.07 / 1.07-1.09x faster; prefill 1903-1937 against 1818-1839 tok/s)
                prefetch(b, wc, cb, tile_prefetch(target, tile) or "near")
            body(wc, u)
        for t, a in enumerate(accs):
            store_rows(b, b.load(a, typ=V16F32), gep(b, y, b.mul(ldy, i64(t)), F32), r, r1)
    b.ret_void()
    return fn


def emit_embed_extra(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """embed_{w} for layout.EXTRA_TYPES: out f32[k] = row `token` of the packed matrix, dequantized with
    the operations (and order) of formats.quant, so bit-exact with it. Scalar code: one row per token."""
    fn, b = define(module, spec.name, spec.signature)
    w, token, out, k = fn.args
    qtype = spec.qtype
    cb, unit = chunk_bytes(qtype), unit_values(qtype)
    nu = b.udiv(k, i64(unit))
    lane = b.and_(token, i64(G - 1))
    lane4 = b.mul(lane, i64(4))
    wg = gep(b, w, b.mul(b.mul(b.lshr(token, i64(4)), nu), i64(cb)))

    def byte(ptr: ir.Value, off: ir.Value | int) -> ir.Value:
        return b.zext(load(b, ptr, I8, off if isinstance(off, ir.Value) else i64(off)), I32)

    def f16(ptr: ir.Value, off: int) -> ir.Value:
        return b.fpext(load(b, gep(b, ptr, i64(off)), F16, lane, F16), F32)

    def at(j: ir.Value, base: int, stride: int) -> ir.Value:
        """base + stride * j as an i64 offset (j: the sub-block loop's index)."""
        return b.add(i64(base), b.mul(j, i64(stride)))

    def block(wq: ir.Value, bits: int, ob: ir.Value, value) -> None:
        """The 32 values of the block whose lanes start at wq: out[ob + i] = value(i, q_i)."""
        c = lambda v: ir.Constant(I32, v)  # noqa: E731
        for j in range(4):
            for e in range(4):
                v = byte(wq, b.add(lane4, i64(64 * j + e)))
                lo, hi = b.and_(v, c(15)), b.lshr(v, c(4))
                if bits == 5:
                    h = byte(wq, b.add(lane4, i64(256 + e)))
                    lo = b.or_(lo, b.shl(b.and_(b.lshr(h, c(j)), c(1)), c(4)))
                    hi = b.or_(hi, b.shl(b.and_(b.lshr(h, c(4 + j)), c(1)), c(4)))
                elif bits == 6:
                    h0, h1 = byte(wq, b.add(lane4, i64(256 + e))), byte(wq, b.add(lane4, i64(320 + e)))
                    lo = b.or_(lo, b.shl(b.and_(b.lshr(h0, c(2 * j)), c(3)), c(4)))
                    hi = b.or_(hi, b.shl(b.and_(b.lshr(h1, c(2 * j)), c(3)), c(4)))
                for i, q in ((4 * j + e, lo), (16 + 4 * j + e, hi)):
                    store(b, value(i, q), ob, i64(i), F32)

    if qtype in (QType.IQ4_NL, QType.IQ4_XS):
        table_t = ir.ArrayType(I8, 16)
        table = ir.GlobalVariable(module, table_t, name=f"{spec.name}.table")
        table.global_constant, table.linkage = True, "internal"
        table.initializer = ir.Constant(table_t, [ir.Constant(I8, int(v)) for v in IQ4_VALUES])

        def iq4(q: ir.Value) -> ir.Value:  # i32 nibble -> f32 table value
            return b.sitofp(load(b, table, I8, b.zext(q, I64)), F32)

    with for_range(b, i64(0), nu, name="unit") as u:
        wc = gep(b, wg, b.mul(u, i64(cb)))
        ob = gep(b, out, b.mul(u, i64(unit)), F32)
        if qtype == QType.IQ4_NL:
            d = f16(wc, 256)
            block(wc, 4, ob, lambda i, q: b.fmul(d, iq4(q)))
        elif qtype == QType.IQ4_XS:
            d = f16(wc, 0)
            with for_range(b, i64(0), i64(8), name="sub") as j:  # a loop, not unrolled: compile time
                step = b.fmul(d, b.sitofp(load(b, wc, I8, b.add(lane, at(j, 32, 16))), F32))
                block(gep(b, wc, at(j, 160, 256)), 4, gep(b, ob, at(j, 0, 32), F32), lambda i, q, s=step: b.fmul(s, iq4(q)))
        elif qtype in (QType.Q5_0, QType.Q5_1):
            d = f16(wc, 320)
            if qtype == QType.Q5_0:
                block(wc, 5, ob, lambda i, q: b.fmul(d, b.fsub(b.uitofp(q, F32), ir.Constant(F32, 16.0))))
            else:
                m = f16(wc, 352)
                block(wc, 5, ob, lambda i, q: b.fadd(b.fmul(d, b.uitofp(q, F32)), m))
        elif qtype in (QType.Q4_K, QType.Q5_K):
            bits = 4 if qtype == QType.Q4_K else 5
            d, dmin = f16(wc, 0), f16(wc, 32)
            with for_range(b, i64(0), i64(8), name="sub") as j:
                scale = b.fmul(d, b.uitofp(byte(wc, b.add(lane, at(j, 64, 16))), F32))
                mins = b.fmul(dmin, b.uitofp(byte(wc, b.add(lane, at(j, 192, 16))), F32))
                block(gep(b, wc, at(j, 320, 256 if bits == 4 else 320)), bits, gep(b, ob, at(j, 0, 32), F32),
                      lambda i, q, s=scale, mn=mins: b.fsub(b.fmul(s, b.uitofp(q, F32)), mn))
        else:  # Q6_K
            d = f16(wc, 0)
            with for_range(b, i64(0), i64(8), name="sub") as j:
                scales = [b.fmul(d, b.sitofp(load(b, wc, I8, b.add(lane, at(j, 32 + 16 * h, 32))), F32)) for h in range(2)]
                block(gep(b, wc, at(j, 288, 384)), 6, gep(b, ob, at(j, 0, 32), F32),
                      lambda i, q, s=scales: b.fmul(s[i // 16], b.sitofp(b.sub(q, ir.Constant(I32, 32)), F32)))
    b.ret_void()
