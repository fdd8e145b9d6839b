"""IR for the f32 operations of a Llama layer: RMSNorm, RoPE, attention, SiLU-gate, residual add, and
embedding lookup (one weight row dequantized). Shapes: see specs.py."""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats.quant import QK, QType
from .compiler import Target
from .irutil import (
    F16, F32, I8, I32, define, entry_alloca, for_range, gep, hsum, i64, intrinsic, load, splat, store, vec,
    vector_loop,
)
from .layout import G, chunk_bytes
from .specs import KernelSpec

V16F32 = vec(F32, 16)


def _fvec(n: int) -> ir.Type:
    return vec(F32, n)


def _exp(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    n = v.type.count if isinstance(v.type, ir.VectorType) else 0
    name = f"llvm.exp.v{n}f32" if n else "llvm.exp.f32"
    return b.call(intrinsic(b.module, name, v.type, [v.type]), [v])


def _fmuladd(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    n = x.type.count
    return b.call(intrinsic(b.module, f"llvm.fmuladd.v{n}f32", x.type, [x.type] * 3), [x, y, z])


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


def emit_attention(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Heads [h0, h1): softmax(q . k[0..pos] / sqrt(hd)) . v[0..pos], KV head = h / (n_heads / n_kv).

    kc, vc are f16[ctx, n_kv, hd], widened to f32 16 lanes at a time. Pass 1: scores into scratch[h];
    pass 2: exp(score - max) in place and their sum; pass 3: out[h] = sum_t p_t v_t, walking V once
    front to back (accumulating in out's row, which stays in L1), then out[h] *= 1 / sum.
    """
    fn, b = define(module, spec.name, spec.signature)
    q, kc, vc, out, scratch, pos, n_heads, n_kv, hd, ctx, h0, h1 = fn.args
    v16f16 = vec(F16, 16)
    sqrt = intrinsic(module, "llvm.sqrt.f32", F32, [F32])
    maxnum = intrinsic(module, "llvm.maxnum.f32", F32, [F32, F32])
    scale = b.fdiv(_fconst(1.0), b.call(sqrt, [b.sitofp(hd, F32)]))
    group = b.sdiv(n_heads, n_kv)
    n_pos = b.add(pos, i64(1))
    row_stride = b.mul(n_kv, hd)  # f16 elements from one position's row to the next
    acc = entry_alloca(b, V16F32, name="acc")
    mx = entry_alloca(b, F32, name="mx")
    total = entry_alloca(b, F32, name="total")

    def load_kv(base: ir.Value, offset: ir.Value) -> ir.Value:
        return b.fpext(load(b, base, v16f16, offset, F16), V16F32)

    with for_range(b, h0, h1, name="h") as h:
        kvh = b.sdiv(h, group)
        qh = gep(b, q, b.mul(h, hd), F32)
        oh = gep(b, out, b.mul(h, hd), F32)
        sc = gep(b, scratch, b.mul(h, ctx), F32)
        kh = gep(b, kc, b.mul(kvh, hd), F16)
        vh = gep(b, vc, b.mul(kvh, hd), F16)
        b.store(_fconst(float("-inf")), mx)
        with for_range(b, i64(0), n_pos, name="t") as t:
            kt = gep(b, kh, b.mul(t, row_stride), F16)
            b.store(ir.Constant(V16F32, None), acc)
            with for_range(b, i64(0), hd, 16, name="c") as c:
                b.store(_fmuladd(b, load(b, qh, V16F32, c, F32), load_kv(kt, c), b.load(acc, typ=V16F32)), acc)
            s = b.fmul(hsum(b, b.load(acc, typ=V16F32)), scale)
            store(b, s, sc, t, F32)
            b.store(b.call(maxnum, [b.load(mx, typ=F32), s]), mx)
        b.store(_fconst(0.0), total)
        m = b.load(mx, typ=F32)
        with for_range(b, i64(0), n_pos, name="t2") as t:
            e = _exp(b, b.fsub(load(b, sc, F32, t, F32), m))
            store(b, e, sc, t, F32)
            b.store(b.fadd(b.load(total, typ=F32), e), total)
        with for_range(b, i64(0), hd, 16, name="z") as c:
            store(b, ir.Constant(V16F32, None), oh, c, F32)
        with for_range(b, i64(0), n_pos, name="t3") as t:
            vt = gep(b, vh, b.mul(t, row_stride), F16)
            p = splat(b, load(b, sc, F32, t, F32), 16)
            with for_range(b, i64(0), hd, 16, name="c2") as c:
                store(b, _fmuladd(b, p, load_kv(vt, c), load(b, oh, V16F32, c, F32)), oh, c, F32)
        inv = splat(b, b.fdiv(_fconst(1.0), b.load(total, typ=F32)), 16)
        with for_range(b, i64(0), hd, 16, name="c3") as c:
            store(b, b.fmul(load(b, oh, V16F32, c, F32), inv), oh, c, F32)
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


def emit_add(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    fn, b = define(module, spec.name, spec.signature)
    x, y, n = fn.args

    def body(i, width):
        store(b, b.fadd(load(b, x, _fvec(width), i, F32), load(b, y, _fvec(width), i, F32)), x, i, F32)

    vector_loop(b, n, 16, body)
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
