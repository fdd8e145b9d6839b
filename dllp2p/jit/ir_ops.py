"""IR for the f32 operations of a Llama layer: RMSNorm, RoPE, attention, SiLU-gate, residual add, and
embedding lookup (one weight row dequantized). Shapes: see specs.py."""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats.quant import QK, QType
from .compiler import Target
from .irutil import (
    F16, F32, I8, I32, I64, PTR, define, entry_alloca, for_range, gep, hmax, hsum, i32, i64, intrinsic, load, mask, splat,
    store, vec, vector_loop,
)
from .layout import Q8_0_BLOCK, G, chunk_bytes
from .specs import KernelSpec

V16F32 = vec(F32, 16)


def _fvec(n: int) -> ir.Type:
    return vec(F32, n)


def _exp(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    n = v.type.count if isinstance(v.type, ir.VectorType) else 0
    name = f"llvm.exp.v{n}f32" if n else "llvm.exp.f32"
    return b.call(intrinsic(b.module, name, v.type, [v.type]), [v])


def _fmuladd(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    name = f"llvm.fmuladd.v{x.type.count}f32" if isinstance(x.type, ir.VectorType) else "llvm.fmuladd.f32"
    return b.call(intrinsic(b.module, name, x.type, [x.type] * 3), [x, y, z])


def _fconst(v: float, n: int = 0) -> ir.Constant:
    return ir.Constant(_fvec(n), [ir.Constant(F32, v)] * n) if n else ir.Constant(F32, v)


def emit_rmsnorm(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    x, w, out, n, eps = fn.args
    acc16 = entry_alloca(b, V16F32, ir.Constant(V16F32, None), "acc16")
    acc1 = entry_alloca(b, _fvec(1), ir.Constant(_fvec(1), None), "acc1")

    def squares(i, width):
        v = load(b, x, _fvec(width), i, F32)
        slot = acc16 if width == 16 else acc1
        b.store(_fmuladd(b, v, v, b.load(slot, typ=_fvec(width))), slot)

    vector_loop(b, n, 16, squares)
    ss = b.fadd(hsum(b, b.load(acc16, typ=V16F32)), b.extract_element(b.load(acc1, typ=_fvec(1)), ir.Constant(I32, 0)))
    sqrt = intrinsic(module, "llvm.sqrt.f32", F32, [F32])
    mean = b.fdiv(ss, b.sitofp(n, F32))
    scale = b.fdiv(_fconst(1.0), b.call(sqrt, [b.fadd(mean, eps)]))

    def apply(i, width):
        v = b.fmul(b.fmul(load(b, x, _fvec(width), i, F32), splat(b, scale, width)), load(b, w, _fvec(width), i, F32))
        store(b, v, out, i, F32)

    vector_loop(b, n, 16, apply)
    b.ret_void()


def emit_rope(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Adjacent pairs (x[2i], x[2i+1]) of each head rotate by the table's angle for (pos, i)."""
    fn, b = define(module, spec.name, spec.signature)
    x, table, pos, n_heads, head_dim, rope_dim = fn.args
    trow = gep(b, table, b.mul(pos, rope_dim), F32)  # (cos, sin) pairs for this position
    with for_range(b, i64(0), n_heads, name="h") as h:
        xh = gep(b, x, b.mul(h, head_dim), F32)
        with for_range(b, i64(0), rope_dim, 2, name="p") as p:
            c, s = load(b, trow, F32, p, F32), load(b, trow, F32, b.add(p, i64(1)), F32)
            a0, a1 = load(b, xh, F32, p, F32), load(b, xh, F32, b.add(p, i64(1)), F32)
            store(b, b.fsub(b.fmul(a0, c), b.fmul(a1, s)), xh, p, F32)
            store(b, b.fadd(b.fmul(a0, s), b.fmul(a1, c)), xh, b.add(p, i64(1)), F32)
    b.ret_void()


# Vectorized exp (Cephes expf): x = k ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, times 2^k.
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = HI + LO; HI has 9 significant bits: k * HI is exact
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer
EXP_LO, EXP_HI = -104.0, 88.72  # inputs are clamped to this range (exp(-104) < 2^-150)


def _minmax(b: ir.IRBuilder, name: str, x: ir.Value, y: ir.Value) -> ir.Value:
    n = x.type.count
    return b.call(intrinsic(b.module, f"llvm.{name}.v{n}f32", x.type, [x.type, x.type]), [x, y])


def vexp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp of a <n x float> in plain vector IR (no libm call; FMA where the target has it). Relative error
    <= 2U (U = 2^-24; 1.4U measured) where exp(x) is a normal f32; subnormal results within 2^-149 too (2^k is
    applied as two normal factors); x < EXP_LO (-inf included) -> 0 or 2^-149; x > EXP_HI -> exp(EXP_HI),
    finite; NaN -> as EXP_LO (maxnum drops NaN). Checked by test_vexp."""
    n = x.type.count
    vi32 = vec(I32, n)

    def c(v: float) -> ir.Constant:
        return _fconst(v, n)

    def ci(v: int) -> ir.Constant:
        return ir.Constant(vi32, [ir.Constant(I32, v)] * n)

    x = _minmax(b, "minnum", _minmax(b, "maxnum", x, c(EXP_LO)), c(EXP_HI))
    k = b.fsub(_fmuladd(b, x, c(_LOG2E), c(_ROUND_MAGIC)), c(_ROUND_MAGIC))  # round(x log2 e), exact integer
    r = _fmuladd(b, k, c(-_LN2_HI), x)  # exact (Sterbenz)
    r = _fmuladd(b, k, c(-_LN2_LO), r)
    p = c(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = _fmuladd(b, p, r, c(coef))
    y = b.fadd(_fmuladd(b, p, b.fmul(r, r), r), c(1.0))
    ki = b.fptosi(k, vi32)  # in [-150, 128]: 2^k = 2^k1 * 2^k2 with k1, k2 in [-75, 64], both normal
    k1 = b.ashr(ki, ci(1))
    k2 = b.sub(ki, k1)

    def pow2(e: ir.Value) -> ir.Value:
        return b.bitcast(b.shl(b.add(e, ci(127)), ci(23)), x.type)

    return b.fmul(b.fmul(y, pow2(k1)), pow2(k2))


def has_native_f16(target: Target) -> bool:
    """Whether LLVM widens f16 -> f32 in hardware on target (else it calls __extendhfsf2, which the JIT may not
    resolve): F16C on x86, always on AArch64."""
    return target.has("f16c") if target.is_x86 else target.triple.startswith(("aarch64", "arm64"))


def widen_f16(b: ir.IRBuilder, raw: ir.Value, native: bool) -> ir.Value:
    """<n x half> -> <n x float>, exactly (subnormals, infinities and NaN payloads included): fpext where the
    target converts in hardware, else integer IR: the bits moved into place and the exponent rebased, f16
    subnormals renormalized by one f32 subtraction, inf/NaN given the all-ones exponent."""
    if native:
        return b.fpext(raw, _fvec(raw.type.count))
    n = raw.type.count
    vi = vec(I32, n)

    def ci(v: int) -> ir.Constant:
        return ir.Constant(vi, [ir.Constant(I32, v)] * n)

    x = b.zext(b.bitcast(raw, vec(ir.IntType(16), n)), vi)
    sign = b.shl(b.and_(x, ci(0x8000)), ci(16))
    o = b.shl(b.and_(x, ci(0x7FFF)), ci(13))  # exponent and mantissa, in f32 position
    e = b.and_(o, ci(0x0F800000))
    o = b.add(o, ci(112 << 23))  # exponent bias 15 -> 127
    o = b.select(b.icmp_unsigned("==", e, ci(0x0F800000)), b.add(o, ci(112 << 23)), o)  # inf/NaN: 255
    sub = b.fsub(b.bitcast(b.add(o, ci(1 << 23)), _fvec(n)), _fconst(2.0**-14, n))  # 2^-14 (1 + m/1024) - 2^-14
    o = b.select(b.icmp_unsigned("==", e, ci(0)), b.bitcast(sub, vi), o)  # zero, subnormal
    return b.bitcast(b.or_(o, sign), _fvec(n))


def _shuffle_add(b: ir.IRBuilder, x: ir.Value, y: ir.Value, lo: list[int], hi: list[int]) -> ir.Value:
    return b.fadd(b.shuffle_vector(x, y, mask(lo)), b.shuffle_vector(x, y, mask(hi)))


_HALVES = ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])  # [x.lo | y.lo] + [x.hi | y.hi]
_UNPACK = ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])  # unpcklps + unpckhps (per 128-bit lane)


def _transpose_sum8(b: ir.IRBuilder, accs: list[ir.Value]) -> ir.Value:
    """8 vectors <8 x float> -> <8 x float> of their horizontal sums (lane j = sum of accs[j]) by 3 levels of
    shuffle + add: 128-bit halves, then a 4 x 4 transpose within 128-bit lanes (unpack, then 64-bit halves).
    Shuffles that stay within 128-bit lanes or swap them whole (no haddps, which is slow on some cores)."""
    a = accs
    x = [_shuffle_add(b, a[j], a[j + 4], *_HALVES) for j in range(4)]  # x[j] = [a_j (4 lanes) | a_j+4]
    s = [_shuffle_add(b, x[2 * i], x[2 * i + 1], *_UNPACK) for i in range(2)]
    # s[0] = [a0 02, a1 02, a0 13, a1 13 | a4 .., a5 .., ..], s[1] the same for a2, a3 | a6, a7
    return _shuffle_add(b, s[0], s[1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])


def _transpose_sum4(b: ir.IRBuilder, accs: list[ir.Value]) -> ir.Value:
    """4 vectors <8 x float> -> <4 x float> of their horizontal sums, the same tree as _transpose_sum8."""
    x = [_shuffle_add(b, accs[j], accs[j + 2], *_HALVES) for j in range(2)]  # [a0 | a2], [a1 | a3]
    s = _shuffle_add(b, x[0], x[1], *_UNPACK)  # [a0 02, a1 02, a0 13, a1 13 | a2 .., a3 .., ..]
    return _shuffle_add(b, s, s, [0, 1, 4, 5], [2, 3, 6, 7])


ATT_POS_BLOCK = 64  # positions per block: the block's K (then V) rows stay in L1 while each head chunk reads them
ATT_PREFETCH = 32  # positions ahead whose K/V rows are prefetched (a hint; clamped to the range's last)
ATT_SPLIT = 128  # positions per attention span: every row's positions are cut at multiples of this, one
# partial per span, merged in span order (attention_merge); a decode step hands the spans to its threads
ATT_MAX_SHARE = 3  # heads of a group that share each widened K/V vector (more would spill accumulators)
ATT_UNROLLED_HD = (64,)  # head dims that get their own copy of the body, hd a constant (+0.5 s compile each)


def emit_attention(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Heads [h0, h1), positions [t0, t1): the span's unnormalized softmax partial, KV head = h / (n_heads / n_kv):
    s_t = q . k_t / sqrt(hd), m = max_t s_t, e_t = exp(s_t - m); out[h] = sum_t e_t v_t, stats[h] = (m, sum_t e_t).
    attention_merge combines the spans of a row (their partials, in span order) into the softmax output.

    One KV group at a time, on the heads of [h0, h1) in that group (one when the caller passes a single head),
    split into chunks of up to ATT_MAX_SHARE heads: each K/V vector widened f16 -> f32 (the costly step: one
    vcvtph2ps per 8 values with F16C) serves every head of the chunk. Positions go in blocks of
    ATT_POS_BLOCK, every chunk of the group working on a block before the next, so each K/V row comes from
    memory once per call. Plain <8 x float> vector IR throughout (no target intrinsics); no libm call.
      1. scores. A lone head takes 8 positions at a time: 8 accumulators <8 x float> over hd (q chunk x widened
         K row chunk), then a transpose-style reduction to one <8 x float> of 8 scores. A chunk of 2 or 3 heads
         takes 4 positions (4 accumulators per head, reduced to <4 x float>). The block's last positions that
         do not fill a step go one at a time, so no position outside [t0, t1) is ever read (nor prefetched).
         scratch[h, t] = (q_h . k_t) / sqrt(hd).
      2. per head: the max (vector), e_t = exp(s_t - max) by vexp 8 lanes at a time and their sum -> stats[h];
         out[h] = 0.
      3. out[h] += sum_t e_t v_t, block by block: per chunk a tile of output lanes per head stays in
         registers (64 lanes for a lone head, 32 for a chunk: <= 12 accumulators) over the block's V rows.
    Rounding: a score is hd/8 fused multiply-adds per lane, a 3-level tree, the scale; each sum over positions
    (of e_t, of e_t v_t) is one f32 chain per lane.
    """
    fn, b = define(module, spec.name, spec.signature)
    q, kc, vc, out, stats, scratch, t0, t1, n_heads, n_kv, hd_arg, ctx, h0, h1 = fn.args
    W = 8
    vf, vh = _fvec(W), vec(F16, W)
    sqrt = intrinsic(module, "llvm.sqrt.f32", F32, [F32])
    maxnum = intrinsic(module, "llvm.maxnum.f32", F32, [F32, F32])
    prefetch_fn = intrinsic(module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    scale = b.fdiv(_fconst(1.0), b.call(sqrt, [b.sitofp(hd_arg, F32)]))
    zero = ir.Constant(vf, None)
    group = b.sdiv(n_heads, n_kv)
    last = b.sub(t1, i64(1))
    n8 = b.add(t0, b.and_(b.sub(t1, t0), i64(~(W - 1))))
    slots = [entry_alloca(b, vf, name=f"acc{j}") for j in range(12)]
    mxv = entry_alloca(b, vf, name="mxv")
    mx = entry_alloca(b, F32, name="mx")
    sumv = entry_alloca(b, vf, name="sumv")
    total = entry_alloca(b, F32, name="total")

    native = has_native_f16(target)

    def widen(ptr: ir.Value, offset: ir.Value) -> ir.Value:
        return widen_f16(b, load(b, ptr, vh, offset, F16), native)

    def f32(ptr: ir.Value, offset: ir.Value) -> ir.Value:
        return load(b, ptr, vf, offset, F32)

    def get(slot: ir.Value) -> ir.Value:
        return b.load(slot, typ=vf)

    def srow(h: ir.Value) -> ir.Value:
        return gep(b, scratch, b.mul(h, ctx), F32)

    def prefetch(ptr: ir.Value, offset: ir.Value) -> None:
        """A read hint for the line holding ptr + offset f16 elements: no effect on any result."""
        b.call(prefetch_fn, [gep(b, ptr, offset, F16), i32(0), i32(3), i32(1)])

    def ahead(t: ir.Value) -> ir.Value:
        """The position ATT_PREFETCH after t, or the range's last when that is past it."""
        ta = b.add(t, i64(ATT_PREFETCH))
        return b.select(b.icmp_signed("<", ta, t1), ta, last)

    def block_end(tb: ir.Value) -> ir.Value:
        te = b.add(tb, i64(ATT_POS_BLOCK))
        return b.select(b.icmp_signed("<", te, t1), te, t1)

    def body(hd: ir.Value) -> None:
        """The kernel for head dim hd (a constant, or the argument)."""
        row_stride = b.mul(n_kv, hd)  # f16 elements from one position's row to the next
        g_first = b.sdiv(h0, group)
        g_end = b.add(b.sdiv(b.sub(h1, i64(1)), group), i64(1))
        with for_range(b, g_first, g_end, name="g") as g:
            gh0 = b.mul(g, group)
            gh1 = b.add(gh0, group)
            ha = b.select(b.icmp_signed(">", h0, gh0), h0, gh0)
            hb = b.select(b.icmp_signed("<", h1, gh1), h1, gh1)
            kg = gep(b, kc, b.mul(g, hd), F16)
            vg = gep(b, vc, b.mul(g, hd), F16)
            n_rest = b.srem(b.sub(hb, ha), i64(ATT_MAX_SHARE))
            h_rest = b.sub(hb, n_rest)

            def chunks(emit) -> None:
                """emit(heads) for [ha, hb) in chunks of ATT_MAX_SHARE heads, then the 1 .. ATT_MAX_SHARE-1 left."""
                with for_range(b, ha, h_rest, ATT_MAX_SHARE, name="hc") as h:
                    emit([b.add(h, i64(i)) for i in range(ATT_MAX_SHARE)])
                for n in range(1, ATT_MAX_SHARE):
                    with b.if_then(b.icmp_signed("==", n_rest, i64(n))):
                        emit([b.add(h_rest, i64(i)) for i in range(n)])

            def krow(t: ir.Value) -> ir.Value:
                return gep(b, kg, b.mul(t, row_stride), F16)

            def scores(heads: list[ir.Value], tb: ir.Value, te: ir.Value) -> None:
                nh = len(heads)
                P = W if nh == 1 else 4  # positions per step: nh * P <= 12 accumulators
                qs = [gep(b, q, b.mul(h, hd), F32) for h in heads]
                tm = b.add(tb, b.and_(b.sub(te, tb), i64(~(P - 1))))
                with for_range(b, tb, tm, P, name=f"t{nh}") as t:
                    rows = [krow(b.add(t, i64(j))) for j in range(P)]
                    later = [krow(ahead(b.add(t, i64(j)))) for j in range(P)]
                    with for_range(b, i64(0), hd, 32, name=f"pf{nh}") as c:  # 32 f16: a 64-byte line
                        for row in later:
                            prefetch(row, c)
                    accs = [[slots[i * P + j] for j in range(P)] for i in range(nh)]
                    for a in sum(accs, []):
                        b.store(zero, a)
                    with for_range(b, i64(0), hd, W, name=f"c{nh}") as c:
                        qc = [f32(qh, c) for qh in qs]
                        for j in range(P):
                            k = widen(rows[j], c)
                            for i in range(nh):
                                b.store(_fmuladd(b, qc[i], k, get(accs[i][j])), accs[i][j])
                    for i, h in enumerate(heads):
                        vals = [get(a) for a in accs[i]]
                        s = _transpose_sum8(b, vals) if P == W else _transpose_sum4(b, vals)
                        store(b, b.fmul(s, splat(b, scale, P)), srow(h), t, F32)
                with for_range(b, tm, te, name=f"tt{nh}") as t:
                    row = krow(t)
                    for a in slots[:nh]:
                        b.store(zero, a)
                    with for_range(b, i64(0), hd, W, name=f"tc{nh}") as c:
                        k = widen(row, c)
                        for i in range(nh):
                            b.store(_fmuladd(b, f32(qs[i], c), k, get(slots[i])), slots[i])
                    for i, h in enumerate(heads):
                        store(b, b.fmul(hsum(b, get(slots[i])), scale), srow(h), t, F32)

            # 1. scores
            with for_range(b, t0, t1, ATT_POS_BLOCK, name="kb") as tb:
                te = block_end(tb)
                chunks(lambda heads: scores(heads, tb, te))

            # 2. exp(score - max) of each head's scores, in place, their sum; out[h] = 0
            with for_range(b, ha, hb, name="sh") as h:
                sc = srow(h)
                b.store(_fconst(float("-inf"), W), mxv)
                with for_range(b, t0, n8, W, name="m") as t:
                    b.store(_minmax(b, "maxnum", get(mxv), f32(sc, t)), mxv)
                b.store(hmax(b, module, get(mxv)), mx)
                with for_range(b, n8, t1, name="mt") as t:
                    b.store(b.call(maxnum, [b.load(mx, typ=F32), load(b, sc, F32, t, F32)]), mx)
                m = b.load(mx, typ=F32)
                m_v = splat(b, m, W)
                b.store(zero, sumv)
                with for_range(b, t0, n8, W, name="e") as t:
                    e = vexp(b, b.fsub(f32(sc, t), m_v))
                    store(b, e, sc, t, F32)
                    b.store(b.fadd(get(sumv), e), sumv)
                b.store(hsum(b, get(sumv)), total)
                with for_range(b, n8, t1, name="et") as t:
                    e = vexp(b, b.fsub(load(b, sc, _fvec(1), t, F32), splat(b, m, 1)))
                    store(b, e, sc, t, F32)
                    b.store(b.fadd(b.load(total, typ=F32), b.extract_element(e, i32(0))), total)
                store(b, m, stats, b.mul(h, i64(2)), F32)
                store(b, b.load(total, typ=F32), stats, b.add(b.mul(h, i64(2)), i64(1)), F32)
                oh = gep(b, out, b.mul(h, hd), F32)
                with for_range(b, i64(0), hd, W, name="z") as c:
                    store(b, zero, oh, c, F32)

            # 3. out[h] += sum_t p_t v_t, block by block
            def tile(heads: list[ir.Value], c0: ir.Value, lanes: int, tb: ir.Value, te: ir.Value) -> None:
                nh, nv = len(heads), lanes // W
                ohs = [gep(b, out, b.add(b.mul(h, hd), c0), F32) for h in heads]
                scs = [srow(h) for h in heads]
                accs = [[slots[i * nv + j] for j in range(nv)] for i in range(nh)]
                for i in range(nh):
                    for j in range(nv):
                        b.store(f32(ohs[i], i64(W * j)), accs[i][j])
                with for_range(b, tb, te, name=f"v{nh}x{lanes}") as t:
                    ps = [splat(b, load(b, sc, F32, t, F32), W) for sc in scs]
                    row = gep(b, vg, b.add(b.mul(t, row_stride), c0), F16)
                    later = gep(b, vg, b.add(b.mul(ahead(t), row_stride), c0), F16)
                    for off in range(0, lanes, 32):  # one per 64-byte line
                        prefetch(later, i64(off))
                    for j in range(nv):
                        v = widen(row, i64(W * j))
                        for i in range(nh):
                            b.store(_fmuladd(b, ps[i], v, get(accs[i][j])), accs[i][j])
                for i in range(nh):
                    for j in range(nv):
                        store(b, get(accs[i][j]), ohs[i], i64(W * j), F32)

            def v_chunk(heads: list[ir.Value], tb: ir.Value, te: ir.Value) -> None:
                lanes = 64 if len(heads) == 1 else 32  # nh * lanes / 8 <= 12 accumulators
                main = b.and_(hd, i64(~(lanes - 1)))
                with for_range(b, i64(0), main, lanes, name=f"vc{len(heads)}") as c0:
                    tile(heads, c0, lanes, tb, te)
                for rest in range(16, lanes, 16):  # hd % 16 == 0
                    with b.if_then(b.icmp_signed("==", b.sub(hd, main), i64(rest))):
                        tile(heads, main, rest, tb, te)

            with for_range(b, t0, t1, ATT_POS_BLOCK, name="vb") as tb:
                te = block_end(tb)
                chunks(lambda heads: v_chunk(heads, tb, te))

    def dispatch(sizes: tuple[int, ...]) -> None:
        if not sizes:
            body(hd_arg)
            return
        with b.if_else(b.icmp_signed("==", hd_arg, i64(sizes[0]))) as (then, otherwise):
            with then:
                body(i64(sizes[0]))
            with otherwise:
                dispatch(sizes[1:])

    dispatch(ATT_UNROLLED_HD)
    b.ret_void()


def emit_attention_merge(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Heads [h0, h1): out[h] = sum_j w_j out_j[h] / sum_j w_j s_j over the n_spans partials of one row (j in
    span order), w_j = exp(m_j - M), M = max_j m_j; partials as attention_f16kv writes them, span j's at
    po + j * n_heads * hd and st + j * n_heads * 2. Every sum is one f32 chain in span order, so the result
    depends only on the partials, never on which thread made which."""
    fn, b = define(module, spec.name, spec.signature)
    po, st, out, n_spans, n_heads, hd, h0, h1 = fn.args
    W = 8
    vf = _fvec(W)
    maxnum = intrinsic(module, "llvm.maxnum.f32", F32, [F32, F32])
    mx = entry_alloca(b, F32, name="mx")
    total = entry_alloca(b, F32, name="total")
    span_heads = b.mul(n_heads, i64(2))
    with for_range(b, h0, h1, name="h") as h:
        stat = lambda j, k: load(b, st, F32, b.add(b.add(b.mul(j, span_heads), b.mul(h, i64(2))), i64(k)), F32)  # noqa: E731
        b.store(_fconst(float("-inf")), mx)
        with for_range(b, i64(0), n_spans, name="mj") as j:
            b.store(b.call(maxnum, [b.load(mx, typ=F32), stat(j, 0)]), mx)
        m = b.load(mx, typ=F32)
        oh = gep(b, out, b.mul(h, hd), F32)
        with for_range(b, i64(0), hd, W, name="z") as c:
            store(b, ir.Constant(vf, None), oh, c, F32)
        b.store(_fconst(0.0), total)
        with for_range(b, i64(0), n_spans, name="j") as j:
            w = b.extract_element(vexp(b, splat(b, b.fsub(stat(j, 0), m), 1)), i32(0))
            b.store(_fmuladd(b, w, stat(j, 1), b.load(total, typ=F32)), total)
            pj = gep(b, po, b.add(b.mul(j, b.mul(n_heads, hd)), b.mul(h, hd)), F32)
            w_v = splat(b, w, W)
            with for_range(b, i64(0), hd, W, name="c") as c:
                store(b, _fmuladd(b, w_v, load(b, pj, vf, c, F32), load(b, oh, vf, c, F32)), oh, c, F32)
        inv = splat(b, b.fdiv(_fconst(1.0), b.load(total, typ=F32)), W)
        with for_range(b, i64(0), hd, W, name="n") as c:
            store(b, b.fmul(load(b, oh, vf, c, F32), inv), oh, c, F32)
    b.ret_void()


def emit_silu_mul(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    gate, up, out, n = fn.args

    def body(i, width):
        g = load(b, gate, _fvec(width), i, F32)
        sig = b.fdiv(_fconst(1.0, width), b.fadd(_fconst(1.0, width), _exp(b, b.fsub(_fconst(0.0, width), g))))
        store(b, b.fmul(b.fmul(g, sig), load(b, up, _fvec(width), i, F32)), out, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


GELU_C = 0.7978845608028654  # sqrt(2 / pi)
GELU_K = 0.044715


def emit_gelu_tanh_mul(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """out = gelu_tanh(gate) * up, gelu_tanh(g) = g/2 (1 + tanh(u)) = g / (1 + exp(-2u)),
    u = sqrt(2/pi) (g + 0.044715 g^3) (Gemma's FFN activation). exp by vexp (clamped: no inf, no NaN),
    16 lanes at a time."""
    fn, b = define(module, spec.name, spec.signature)
    gate, up, out, n = fn.args

    def body(i, width):
        g = load(b, gate, _fvec(width), i, F32)
        g3 = b.fmul(b.fmul(g, g), g)
        u = b.fmul(_fconst(GELU_C, width), _fmuladd(b, _fconst(GELU_K, width), g3, g))
        e = vexp(b, b.fmul(_fconst(-2.0, width), u))
        act = b.fdiv(g, b.fadd(_fconst(1.0, width), e))
        store(b, b.fmul(act, load(b, up, _fvec(width), i, F32)), out, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_scale(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """x f32[n] *= s, in place (Gemma's embedding scale; a query pre-scale)."""
    fn, b = define(module, spec.name, spec.signature)
    x, n, s = fn.args

    def body(i, width):
        store(b, b.fmul(load(b, x, _fvec(width), i, F32), splat(b, s, width)), x, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_add(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    x, y, n = fn.args

    def body(i, width):
        store(b, b.fadd(load(b, x, _fvec(width), i, F32), load(b, y, _fvec(width), i, F32)), x, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_add_q8_0(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """x f32[n, k] += dequantized Q8_0 rows q (f32(d) * i8: exact in f32, so no rounding before the add)."""
    fn, b = define(module, spec.name, spec.signature)
    x, q, k, n = fn.args
    v32f = vec(F32, QK)
    nb = b.lshr(k, i64(5))
    with for_range(b, i64(0), n, name="row") as row:
        xr = gep(b, x, b.mul(row, k), F32)
        qr = gep(b, q, b.mul(row, b.mul(nb, i64(Q8_0_BLOCK))))
        with for_range(b, i64(0), nb, name="blk") as blk:
            at = b.mul(blk, i64(Q8_0_BLOCK))
            d = b.fpext(load(b, qr, F16, at), F32)
            v = b.fmul(b.sitofp(load(b, qr, vec(I8, QK), b.add(at, i64(2))), v32f), splat(b, d, QK))
            off = b.shl(blk, i64(5))
            store(b, b.fadd(load(b, xr, v32f, off, F32), v), xr, off, F32)
    b.ret_void()


def emit_to_f16(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """out f16[n] = x f32[n] rounded to nearest even (fptrunc; vcvtps2ph with F16C), 16 at a time."""
    fn, b = define(module, spec.name, spec.signature)
    x, out, n = fn.args

    def body(i, width):
        store(b, b.fptrunc(load(b, x, _fvec(width), i, F32), vec(F16, width)), out, i, F16)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_embed(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """out = row `token` of w, dequantized (w packed for block types, row-major for F32/F16)."""
    fn, b = define(module, spec.name, spec.signature)
    w, token, out, k = fn.args
    if spec.qtype in (QType.F32, QType.F16):
        elem = F32 if spec.qtype == QType.F32 else F16
        row = gep(b, w, b.mul(token, k), elem)

        def body(i, width):
            v = load(b, row, vec(elem, width), i, elem)
            store(b, v if elem is F32 else b.fpext(v, _fvec(width)), out, i, F32)

        vector_loop(b, k, 16, body)
        b.ret_void()
        return
    _emit_embed_packed(b, spec.qtype, w, token, out, k)


def _emit_embed_packed(b: ir.IRBuilder, qtype: QType, w, token, out, k) -> None:
    cb = chunk_bytes(qtype)
    qbytes = cb - (4 if qtype == QType.Q4_1 else 2) * G
    nb = b.lshr(k, i64(5))
    lane = b.and_(token, i64(G - 1))
    wg = gep(b, w, b.mul(b.mul(b.lshr(token, i64(4)), nb), i64(cb)))
    lane4 = b.mul(lane, i64(4))
    with for_range(b, i64(0), nb, name="blk") as blk:
        wc = gep(b, wg, b.mul(blk, i64(cb)))
        ob = gep(b, out, b.mul(blk, i64(QK)), F32)
        d = b.fpext(load(b, gep(b, wc, i64(qbytes)), F16, lane, F16), F32)
        m = b.fpext(load(b, gep(b, wc, i64(qbytes + 2 * G)), F16, lane, F16), F32) if qtype == QType.Q4_1 else None

        def value(q: ir.Value) -> ir.Value:  # q: i32 (nibble, or u8 for Q8_0)
            if qtype == QType.Q4_1:
                return b.fadd(b.fmul(b.sitofp(q, F32), d), m)
            bias = 8 if qtype == QType.Q4_0 else 128
            return b.fmul(b.sitofp(b.sub(q, ir.Constant(I32, bias)), F32), d)

        steps = 8 if qtype == QType.Q8_0 else 4
        for j in range(steps):
            for e in range(4):
                byte = b.zext(load(b, wc, I8, b.add(lane4, i64(64 * j + e))), I32)
                if qtype == QType.Q8_0:
                    store(b, value(byte), ob, i64(4 * j + e), F32)
                else:
                    store(b, value(b.and_(byte, ir.Constant(I32, 15))), ob, i64(4 * j + e), F32)
                    store(b, value(b.lshr(byte, ir.Constant(I32, 4))), ob, i64(16 + 4 * j + e), F32)
    b.ret_void()


def emit_top_k(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """out[j] = (x[i_j], i_j + base) for the k largest x, largest first, equal values by lower index first
    (the order of numpy's stable argsort of -x), 1 <= k <= n; 8 bytes per record (f32, i32). One pass
    with a sorted list: x[i] enters when the list is not yet full or x[i] beats its last (a strict >:
    an equal later value stays out), moving down past the smaller ones only (strict <: it stays behind
    equal ones). A node's logits slice is ~10^4 values and k <= 64: a few microseconds."""
    fn, b = define(module, spec.name, spec.signature)
    x, n, k, base, out = fn.args
    count = entry_alloca(b, I64, i64(0), name="count")
    slot = entry_alloca(b, I64, name="slot")
    val = lambda j: load(b, out, F32, b.mul(j, i64(8)))  # noqa: E731
    idx = lambda j: load(b, out, I32, b.add(b.mul(j, i64(8)), i64(4)))  # noqa: E731

    def put(j: ir.Value, v: ir.Value, index: ir.Value) -> None:
        store(b, v, out, b.mul(j, i64(8)))
        store(b, index, out, b.add(b.mul(j, i64(8)), i64(4)))

    with for_range(b, i64(0), n, name="i") as i:
        v = load(b, x, F32, i, F32)
        c = b.load(count, typ=I64)
        room = b.icmp_signed("<", c, k)
        last = b.select(room, i64(0), b.sub(k, i64(1)))  # only read when full
        take = b.or_(room, b.fcmp_ordered(">", v, val(last)))
        with b.if_then(take):
            b.store(b.select(room, c, b.sub(k, i64(1))), slot)
            cond, move, done = (b.append_basic_block(s) for s in ("shift", "shift.move", "shift.done"))
            b.branch(cond)
            b.position_at_end(cond)
            j = b.load(slot, typ=I64)
            above = b.sub(j, i64(1))
            has_above = b.icmp_signed(">", j, i64(0))
            safe = b.select(has_above, above, i64(0))
            b.cbranch(b.and_(has_above, b.fcmp_ordered("<", val(safe), v)), move, done)
            b.position_at_end(move)
            put(j, val(above), idx(above))
            b.store(above, slot)
            b.branch(cond)
            b.position_at_end(done)
            put(b.load(slot, typ=I64), v, b.trunc(b.add(i, base), I32))
            b.store(b.select(room, b.add(c, i64(1)), c), count)
    b.ret_void()
