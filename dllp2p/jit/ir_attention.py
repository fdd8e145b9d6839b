"""IR for attention over the f16 KV cache: one span's softmax partial per call (attention_f16kv) and the
merge of a row's span partials in span order (attention_merge). Shapes: see specs.py; the span scheme and
why results do not depend on thread count or prompt chunking: program.py."""

from __future__ import annotations

import llvmlite.ir as ir

from .compiler import Target
from .ir_ops import has_native_f16, vexp, widen_f16
from .irutil import (
    F16, F32, I32, PTR, define, entry_alloca, fconst, fminmax, fmuladd, for_range, fvec, gep, hmax, hsum, i32, i64,
    intrinsic, load, mask, splat, store, vec,
)
from .specs import KernelSpec

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


ATT_NEXT_PREFETCH = 64  # positions of the next item's K and V prefetched as an item starts (program_attention.py)


def prefetch_positions(b: ir.IRBuilder, k_head: ir.Value, v_head: ir.Value, t0: ir.Value, t1: ir.Value, hd: int) -> None:
    """Read hints (into L2) for the K and V rows of positions [t0, min(t1, t0 + ATT_NEXT_PREFETCH)) of one KV head
    (f16[ctx, hd] each, head-major): the start of the attention call a thread makes next, whose first lines the
    kernel's own prefetch (ATT_PREFETCH positions ahead of the one it reads) never covers. No effect on results."""
    fn = intrinsic(b.module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    end = b.add(t0, i64(ATT_NEXT_PREFETCH))
    end = b.select(b.icmp_signed("<", end, t1), end, t1)
    with for_range(b, b.mul(t0, i64(hd * 2)), b.mul(end, i64(hd * 2)), 64, name="pfn") as off:
        for head in (k_head, v_head):
            b.call(fn, [gep(b, head, off), i32(0), i32(2), i32(1)])


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
         scratch[h, t] = (q_h . k_t) / sqrt(hd). The K rows ATT_PREFETCH positions ahead are prefetched, and the
         V rows of the positions being scored into L2, for step 3 (which found the start of every span's V in
         memory: at 4 / 8 rows of 128-160 positions the steps were 1.11x faster with it, 2026-12-07).
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
    vf, vh = fvec(W), vec(F16, W)
    sqrt = intrinsic(module, "llvm.sqrt.f32", F32, [F32])
    maxnum = intrinsic(module, "llvm.maxnum.f32", F32, [F32, F32])
    prefetch_fn = intrinsic(module, "llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    scale = b.fdiv(fconst(1.0), b.call(sqrt, [b.sitofp(hd_arg, F32)]))
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

    def prefetch(ptr: ir.Value, offset: ir.Value, locality: int = 3) -> None:
        """A read hint for the line holding ptr + offset f16 elements: no effect on any result."""
        b.call(prefetch_fn, [gep(b, ptr, offset, F16), i32(0), i32(locality), i32(1)])

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

            def vrow(t: ir.Value) -> ir.Value:
                return gep(b, vg, b.mul(t, row_stride), F16)

            def scores(heads: list[ir.Value], tb: ir.Value, te: ir.Value) -> None:
                nh = len(heads)
                P = W if nh == 1 else 4  # positions per step: nh * P <= 12 accumulators
                qs = [gep(b, q, b.mul(h, hd), F32) for h in heads]
                tm = b.add(tb, b.and_(b.sub(te, tb), i64(~(P - 1))))
                with for_range(b, tb, tm, P, name=f"t{nh}") as t:
                    rows = [krow(b.add(t, i64(j))) for j in range(P)]
                    later = [krow(ahead(b.add(t, i64(j)))) for j in range(P)]
                    vrows = [vrow(b.add(t, i64(j))) for j in range(P)]  # for step 3, into L2
                    with for_range(b, i64(0), hd, 32, name=f"pf{nh}") as c:  # 32 f16: a 64-byte line
                        for row in later:
                            prefetch(row, c)
                        for row in vrows:
                            prefetch(row, c, 2)
                    accs = [[slots[i * P + j] for j in range(P)] for i in range(nh)]
                    for a in sum(accs, []):
                        b.store(zero, a)
                    with for_range(b, i64(0), hd, W, name=f"c{nh}") as c:
                        qc = [f32(qh, c) for qh in qs]
                        for j in range(P):
                            k = widen(rows[j], c)
                            for i in range(nh):
                                b.store(fmuladd(b, qc[i], k, get(accs[i][j])), accs[i][j])
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
                            b.store(fmuladd(b, f32(qs[i], c), k, get(slots[i])), slots[i])
                    for i, h in enumerate(heads):
                        store(b, b.fmul(hsum(b, get(slots[i])), scale), srow(h), t, F32)

            # 1. scores
            with for_range(b, t0, t1, ATT_POS_BLOCK, name="kb") as tb:
                te = block_end(tb)
                chunks(lambda heads: scores(heads, tb, te))

            # 2. exp(score - max) of each head's scores, in place, their sum; out[h] = 0
            with for_range(b, ha, hb, name="sh") as h:
                sc = srow(h)
                b.store(fconst(float("-inf"), W), mxv)
                with for_range(b, t0, n8, W, name="m") as t:
                    b.store(fminmax(b, "maxnum", get(mxv), f32(sc, t)), mxv)
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
                    e = vexp(b, b.fsub(load(b, sc, fvec(1), t, F32), splat(b, m, 1)))
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
                            b.store(fmuladd(b, ps[i], v, get(accs[i][j])), accs[i][j])
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
    vf = fvec(W)
    maxnum = intrinsic(module, "llvm.maxnum.f32", F32, [F32, F32])
    mx = entry_alloca(b, F32, name="mx")
    total = entry_alloca(b, F32, name="total")
    span_heads = b.mul(n_heads, i64(2))
    with for_range(b, h0, h1, name="h") as h:
        stat = lambda j, k: load(b, st, F32, b.add(b.add(b.mul(j, span_heads), b.mul(h, i64(2))), i64(k)), F32)  # noqa: E731
        b.store(fconst(float("-inf")), mx)
        with for_range(b, i64(0), n_spans, name="mj") as j:
            b.store(b.call(maxnum, [b.load(mx, typ=F32), stat(j, 0)]), mx)
        m = b.load(mx, typ=F32)
        oh = gep(b, out, b.mul(h, hd), F32)
        with for_range(b, i64(0), hd, W, name="z") as c:
            store(b, ir.Constant(vf, None), oh, c, F32)
        b.store(fconst(0.0), total)
        with for_range(b, i64(0), n_spans, name="j") as j:
            w = b.extract_element(vexp(b, splat(b, b.fsub(stat(j, 0), m), 1)), i32(0))
            b.store(fmuladd(b, w, stat(j, 1), b.load(total, typ=F32)), total)
            pj = gep(b, po, b.add(b.mul(j, b.mul(n_heads, hd)), b.mul(h, hd)), F32)
            w_v = splat(b, w, W)
            with for_range(b, i64(0), hd, W, name="c") as c:
                store(b, fmuladd(b, w_v, load(b, pj, vf, c, F32), load(b, oh, vf, c, F32)), oh, c, F32)
        inv = splat(b, b.fdiv(fconst(1.0), b.load(total, typ=F32)), W)
        with for_range(b, i64(0), hd, W, name="n") as c:
            store(b, b.fmul(load(b, oh, vf, c, F32), inv), oh, c, F32)
    b.ret_void()
