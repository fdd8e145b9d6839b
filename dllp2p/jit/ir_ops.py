"""IR for the f32 operations of a layer: RMSNorm, RoPE, SiLU / GELU-tanh gates, scale, residual adds, f16
rounding, top-k and the embedding lookup (one weight row dequantized); attention is ir_attention.py.
Shapes: see specs.py."""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats.quant import QK, QType
from .compiler import Target
from .irutil import (
    F16, F32, I32, I64, I8, define, entry_alloca, fconst, fminmax, fmuladd, for_range, fvec, gep, hsum, i64,
    intrinsic, load, splat, store, vec, vector_loop,
)
from .layout import Q8_0_BLOCK, G, chunk_bytes
from .specs import KernelSpec

V16F32 = vec(F32, 16)


def emit_rmsnorm(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    x, w, out, n, eps = fn.args
    acc16 = entry_alloca(b, V16F32, ir.Constant(V16F32, None), "acc16")
    acc1 = entry_alloca(b, fvec(1), ir.Constant(fvec(1), None), "acc1")

    def squares(i, width):
        v = load(b, x, fvec(width), i, F32)
        slot = acc16 if width == 16 else acc1
        b.store(fmuladd(b, v, v, b.load(slot, typ=fvec(width))), slot)

    vector_loop(b, n, 16, squares)
    ss = b.fadd(hsum(b, b.load(acc16, typ=V16F32)), b.extract_element(b.load(acc1, typ=fvec(1)), ir.Constant(I32, 0)))
    sqrt = intrinsic(module, "llvm.sqrt.f32", F32, [F32])
    mean = b.fdiv(ss, b.sitofp(n, F32))
    scale = b.fdiv(fconst(1.0), b.call(sqrt, [b.fadd(mean, eps)]))

    def apply(i, width):
        v = b.fmul(b.fmul(load(b, x, fvec(width), i, F32), splat(b, scale, width)), load(b, w, fvec(width), i, F32))
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




def vexp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp of a <n x float> in plain vector IR (no libm call; FMA where the target has it). Relative error
    <= 2U (U = 2^-24; 1.4U measured) where exp(x) is a normal f32; subnormal results within 2^-149 too (2^k is
    applied as two normal factors); x < EXP_LO (-inf included) -> 0 or 2^-149; x > EXP_HI -> exp(EXP_HI),
    finite; NaN -> as EXP_LO (maxnum drops NaN). Checked by test_vexp."""
    n = x.type.count
    vi32 = vec(I32, n)

    def c(v: float) -> ir.Constant:
        return fconst(v, n)

    def ci(v: int) -> ir.Constant:
        return ir.Constant(vi32, [ir.Constant(I32, v)] * n)

    x = fminmax(b, "minnum", fminmax(b, "maxnum", x, c(EXP_LO)), c(EXP_HI))
    k = b.fsub(fmuladd(b, x, c(_LOG2E), c(_ROUND_MAGIC)), c(_ROUND_MAGIC))  # round(x log2 e), exact integer
    r = fmuladd(b, k, c(-_LN2_HI), x)  # exact (Sterbenz)
    r = fmuladd(b, k, c(-_LN2_LO), r)
    p = c(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = fmuladd(b, p, r, c(coef))
    y = b.fadd(fmuladd(b, p, b.fmul(r, r), r), c(1.0))
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
        return b.fpext(raw, fvec(raw.type.count))
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
    sub = b.fsub(b.bitcast(b.add(o, ci(1 << 23)), fvec(n)), fconst(2.0**-14, n))  # 2^-14 (1 + m/1024) - 2^-14
    o = b.select(b.icmp_unsigned("==", e, ci(0)), b.bitcast(sub, vi), o)  # zero, subnormal
    return b.bitcast(b.or_(o, sign), fvec(n))


def emit_silu_mul(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """out = silu(gate) * up = gate / (1 + exp(-gate)) * up, 16 lanes at a time. exp by vexp (plain vector IR,
    clamped: no inf, no NaN), not llvm.exp, which x86 lowers to one libm expf call per lane: with it this
    kernel took ~6 % of a batched decode step's CPU time (perf, SmolLM2, 4 rows), ~3x what vexp takes."""
    fn, b = define(module, spec.name, spec.signature)
    gate, up, out, n = fn.args

    def body(i, width):
        g = load(b, gate, fvec(width), i, F32)
        act = b.fdiv(g, b.fadd(fconst(1.0, width), vexp(b, b.fsub(fconst(0.0, width), g))))
        store(b, b.fmul(act, load(b, up, fvec(width), i, F32)), out, i, F32)

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
        g = load(b, gate, fvec(width), i, F32)
        g3 = b.fmul(b.fmul(g, g), g)
        u = b.fmul(fconst(GELU_C, width), fmuladd(b, fconst(GELU_K, width), g3, g))
        e = vexp(b, b.fmul(fconst(-2.0, width), u))
        act = b.fdiv(g, b.fadd(fconst(1.0, width), e))
        store(b, b.fmul(act, load(b, up, fvec(width), i, F32)), out, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_scale(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """x f32[n] *= s, in place (Gemma's embedding scale; a query pre-scale)."""
    fn, b = define(module, spec.name, spec.signature)
    x, n, s = fn.args

    def body(i, width):
        store(b, b.fmul(load(b, x, fvec(width), i, F32), splat(b, s, width)), x, i, F32)

    vector_loop(b, n, 16, body)
    b.ret_void()


def emit_add(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    x, y, n = fn.args

    def body(i, width):
        store(b, b.fadd(load(b, x, fvec(width), i, F32), load(b, y, fvec(width), i, F32)), x, i, F32)

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
        store(b, b.fptrunc(load(b, x, fvec(width), i, F32), vec(F16, width)), out, i, F16)

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
            store(b, v if elem is F32 else b.fpext(v, fvec(width)), out, i, F32)

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
