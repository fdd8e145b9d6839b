"""IR for activation quantization (f32 -> Q8S) and quantized matrix-vector / matrix-matrix products.

The heart is `_emit_tile`: for T activation rows and one group of 16 weight rows it walks the
group's blocks once (a linear weight stream), and per block and activation row accumulates the 16
rows' integer dots with u8 x s8 -> s32 dots of 4-byte groups (`vpdpbusd` on AVX512-VNNI), then
folds them into 16 f32 lanes with the block scales. Layouts: see layout.py.
"""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats.quant import QK, QType
from .compiler import Target
from .ir_dot import (
    V16I32, V64I8, V16F32, PAIR_GROUPS, TILE_SIG, dot4, bcast4, avx2_halves, prefetch, store_rows, tile_prefetch,
)
from .ir_matvec_extra import _emit_tile_extra
from .irutil import (
    F16, F32, I32, I8, define, entry_alloca, fmuladd, for_range, gep, hmax, hsum, i32, i64, intrinsic, load, mask,
    splat, splat_const, store, vec,
)
from .layout import EXTRA_TYPES, Q8_0_BLOCK, G, chunk_bytes
from .specs import KernelSpec

# --- activation quantization ----------------------------------------------------------------------------

def _quantize_block(b: ir.IRBuilder, xr: ir.Value, orow: ir.Value, k: ir.Value, blk: ir.Value) -> None:
    """Block blk of a Q8S row of k values: xr f32[k] -> orow (layout.py): q, d and the exact sum s."""
    module = b.module
    v32f, v32i8 = vec(F32, QK), vec(I8, QK)
    fabs = intrinsic(module, "llvm.fabs.v32f32", v32f, [v32f])
    rnd = intrinsic(module, "llvm.round.v32f32", v32f, [v32f])  # halves away from zero, like C roundf
    nb = b.lshr(k, i64(5))
    v = load(b, xr, v32f, b.shl(blk, i64(5)), F32)
    amax = hmax(b, module, b.call(fabs, [v]))
    d = b.fdiv(amax, ir.Constant(F32, 127.0))
    inv = b.select(b.fcmp_ordered("!=", d, ir.Constant(F32, 0.0)), b.fdiv(ir.Constant(F32, 1.0), d), ir.Constant(F32, 0.0))
    q = b.fptosi(b.call(rnd, [b.fmul(v, splat(b, inv, QK))]), v32i8)
    store(b, q, orow, b.shl(blk, i64(5)))
    store(b, d, gep(b, orow, k), blk, F32)
    store(b, hsum(b, b.sext(q, vec(I32, QK))), gep(b, orow, b.add(k, b.shl(nb, i64(2)))), blk, I32)


def emit_quantize(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """n rows of k f32 values (stride k) -> n Q8S rows (stride act_bytes(k))."""
    fn, b = define(module, spec.name, spec.signature)
    x, out, k, n = fn.args
    row_bytes = b.add(k, b.shl(b.lshr(k, i64(5)), i64(3)))
    with for_range(b, i64(0), n, name="row") as row:
        xr = gep(b, x, b.mul(row, k), F32)
        orow = gep(b, out, b.mul(row, row_bytes))
        with for_range(b, i64(0), b.lshr(k, i64(5)), name="blk") as blk:
            _quantize_block(b, xr, orow, k, blk)
    b.ret_void()


def emit_quantize_part(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """Blocks [b0, b1) of one Q8S row of k values, x f32[k] -> out (the row's other blocks untouched): the
    same bytes quantize_f32_q8s writes there, so a row can be quantized piece by piece by the threads that
    computed its pieces (program.py, the FFN of several rows)."""
    fn, b = define(module, spec.name, spec.signature)
    x, out, k, b0, b1 = fn.args
    with for_range(b, b0, b1, name="blk") as blk:
        _quantize_block(b, x, out, k, blk)
    b.ret_void()


def emit_quantize_q8_0(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """ggml's Q8_0 (per 32 values: f16 d, then 32 i8), as formats.quant.quantize_q8_0: the wire format of
    the partial sums that tensor-parallel nodes add up (tp_program.py)."""
    fn, b = define(module, spec.name, spec.signature)
    x, out, k, n = fn.args
    v32f, v32i8 = vec(F32, QK), vec(I8, QK)
    fabs = intrinsic(module, "llvm.fabs.v32f32", v32f, [v32f])
    rnd = intrinsic(module, "llvm.round.v32f32", v32f, [v32f])
    nb = b.lshr(k, i64(5))
    with for_range(b, i64(0), n, name="row") as row:
        xr = gep(b, x, b.mul(row, k), F32)
        orow = gep(b, out, b.mul(row, b.mul(nb, i64(Q8_0_BLOCK))))
        with for_range(b, i64(0), nb, name="blk") as blk:
            v = load(b, xr, v32f, b.shl(blk, i64(5)), F32)
            d = b.fdiv(hmax(b, module, b.call(fabs, [v])), ir.Constant(F32, 127.0))
            inv = b.select(b.fcmp_ordered("!=", d, ir.Constant(F32, 0.0)), b.fdiv(ir.Constant(F32, 1.0), d), ir.Constant(F32, 0.0))
            at = b.mul(blk, i64(Q8_0_BLOCK))
            store(b, b.fptrunc(d, F16), orow, at)
            store(b, b.fptosi(b.call(rnd, [b.fmul(v, splat(b, inv, QK))]), v32i8), orow, b.add(at, i64(2)))
    b.ret_void()


# --- quantized products ---------------------------------------------------------------------------------

def _avx2_block_dots(b: ir.IRBuilder, qtype: QType, wc: ir.Value, xq: ir.Value, signed_q8: bool = False) -> ir.Value:
    """AVX2 has no u8 x s8 -> s32 dot; `vpmaddubsw` gives s16 sums of byte pairs (saturating), and
    `vpmaddwd` by ones folds pairs of s16 into s32.

    4-bit weights (u8 0..15): a pair sum is at most 2 * 15 * 127 = 3810, so the 8 products of a block
    (4 steps x low/high nibbles) are summed in s16 (<= 30480) and widened once per block.
    Q8_0 (stored as u8 q + 128): products are made signed-safe the usual way, |w| * (x * sign(w)),
    widened per step (a pair sum reaches 2 * 128 * 127); that signed dot is returned as it is with
    signed_q8 (the matvec tile's way), else the u8 bias 128 * sum(x) is added so it means what the other
    paths return.
    """
    v32i8, v16i16, v8i32 = vec(I8, 32), vec(ir.IntType(16), 16), vec(I32, 8)
    mod = b.module
    maddubs = intrinsic(mod, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = intrinsic(mod, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    ones = splat_const(ir.IntType(16), 16, 1)
    if qtype == QType.Q8_0:
        psign = intrinsic(mod, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
        absb = intrinsic(mod, "llvm.abs.v32i8", v32i8, [v32i8, ir.IntType(1)])
        flip = splat_const(I8, 32, -128)
        acc = [ir.Constant(v8i32, None)] * 2
        for j in range(8):
            w = avx2_halves(b, load(b, wc, V64I8, i64(64 * j)))
            x = avx2_halves(b, bcast4(b, xq, i64(4 * j)))
            for h in range(2):
                ws = b.xor(w[h], flip)  # u8 q + 128 -> s8 q
                prod = b.call(maddubs, [b.call(absb, [ws, ir.Constant(ir.IntType(1), 0)]), b.call(psign, [x[h], ws])])
                acc[h] = b.add(acc[h], b.call(maddwd, [prod, ones]))
        dot = b.shuffle_vector(acc[0], acc[1], mask(range(16)))
        if signed_q8:
            return dot
        sx = b.call(intrinsic(mod, "llvm.vector.reduce.add.v32i32", I32, [vec(I32, 32)]),
                    [b.sext(load(b, xq, vec(I8, 32)), vec(I32, 32))])
        return b.add(dot, splat(b, b.mul(sx, i32(128)), 16))
    lo_mask, four = splat_const(I8, 64, 15), splat_const(I8, 64, 4)
    acc16 = [ir.Constant(v16i16, None)] * 2
    for j in range(4):
        v = load(b, wc, V64I8, i64(64 * j))
        for nib, xoff in ((b.and_(v, lo_mask), 4 * j), (b.lshr(v, four), 16 + 4 * j)):
            w, x = avx2_halves(b, nib), avx2_halves(b, bcast4(b, xq, i64(xoff)))
            for h in range(2):
                acc16[h] = b.add(acc16[h], b.call(maddubs, [w[h], x[h]]))
    wide = [b.call(maddwd, [a, ones]) for a in acc16]
    return b.shuffle_vector(wide[0], wide[1], mask(range(16)))


def _high_nibbles(b: ir.IRBuilder, v: ir.Value, lo_mask: ir.Value) -> ir.Value:
    """<64 x i8> v >> 4 as a 16-bit shift and a mask (`vpsrlw` + `vpand`, which any vector pipe runs) rather
    than the byte shift LLVM lowers to `vgf2p8affineqb`, which competes with the dot instructions on Zen 4."""
    v16 = vec(ir.IntType(16), 32)
    shifted = b.bitcast(b.lshr(b.bitcast(v, v16), splat_const(ir.IntType(16), 32, 4)), V64I8)
    return b.and_(shifted, lo_mask)


def _block_dots(b, target, qtype, wc, xq, biased: bool = True, init: ir.Value | None = None, chains: int = 2,
                shift16: bool = False) -> ir.Value:
    """<16 x i32> integer dots of one packed block chunk `wc` with the 32 activation bytes at xq: raw u8
    sums, or for Q8_0 on AVX2 with biased=False the signed dot itself; plus `init` (<16 x i32>, added exactly)
    when given. chains: independent accumulators the dot instructions alternate between (1 saves an add and
    a zeroing; 2 halves the dependency chain, which a tile of few rows needs to keep the unit busy). shift16: the
    high nibbles by _high_nibbles (tiles of several rows, compute-bound) instead of a byte shift."""
    if target.dot_isa == "avx2":
        dot = _avx2_block_dots(b, qtype, wc, xq, signed_q8=not biased)
        return dot if init is None else b.add(dot, init)
    zero = ir.Constant(V16I32, None)
    acc = [zero if init is None else init, zero]
    if qtype == QType.Q8_0 and target.is_aarch64:  # u8 q + 128 -> s8 q; signed dots (+ the bias if asked)
        flip = splat_const(I8, 64, -128)
        for j in range(8):
            w = b.xor(load(b, wc, V64I8, i64(64 * j)), flip)
            acc[j % 2] = dot4(b, target, acc[j % 2], w, bcast4(b, xq, i64(4 * j)), wmax=127)
        dot = b.add(acc[0], acc[1])
        if not biased:
            return dot
        sx = b.call(intrinsic(b.module, "llvm.vector.reduce.add.v32i32", I32, [vec(I32, 32)]),
                    [b.sext(load(b, xq, vec(I8, 32)), vec(I32, 32))])
        return b.add(dot, splat(b, b.mul(sx, i32(128)), 16))
    if qtype == QType.Q8_0:
        for j in range(8):
            acc[j % chains] = dot4(b, target, acc[j % chains], load(b, wc, V64I8, i64(64 * j)), bcast4(b, xq, i64(4 * j)))
    else:
        lo_mask, four = splat_const(I8, 64, 15), splat_const(I8, 64, 4)
        hi = (lambda v: _high_nibbles(b, v, lo_mask)) if shift16 else (lambda v: b.lshr(v, four))
        for j in range(4):
            v = load(b, wc, V64I8, i64(64 * j))
            acc[0] = dot4(b, target, acc[0], b.and_(v, lo_mask), bcast4(b, xq, i64(4 * j)), wmax=15)
            acc[1 % chains] = dot4(b, target, acc[1 % chains], hi(v), bcast4(b, xq, i64(16 + 4 * j)), wmax=15)
    return acc[0] if chains == 1 else b.add(acc[0], acc[1])


# Which tiles prefetch their weight stream in software, and how: ir_dot.tile_prefetch. History (Zen 4 VM, same
# process, builds alternating: `python -m dllp2p.jit.batchbench --old REV --threads 2 --concurrency 1 2 4 8
# --prompt-tokens 128 --rounds 11`, SmolLM2): with the decode kernel's hint (1 KB ahead into L1) the tiles of 2 / 4
# rows ran 1.06x / 1.08x faster without it, so they went without (2026-12-07); into L2 (prefetcht1) at 1 KB 0.97x;
# prefetchnta in the tiles of 2 / 4 / 8 noise. The distance was what was wrong (later that day: ir_dot.py).
TILE_ONE_CHAIN = 8  # tiles of this many rows or more: one accumulator chain per block (see _block_dots)


def _emit_tile(module: ir.Module, qtype: QType, tile: int, target: Target) -> ir.Function:
    """Internal f(w, x, xs, y, ldy, k, r0, r1): y[t, r0:r1] = W[r0:r1] . x[t] for t < tile; x rows xs bytes apart.

    With one activation row (decode), two row groups are walked side by side: they share the
    activation loads and scale arithmetic, and two weight streams keep more loads in flight."""
    fn, b = define(module, f"_tile_{qtype.name.lower()}_q8s_x{tile}", TILE_SIG, internal=True)
    w, x, xs, y, ldy, k, r0, r1 = fn.args
    cb = chunk_bytes(qtype)
    qbytes = cb - (4 if qtype == QType.Q4_1 else 2) * G
    nb = b.lshr(k, i64(5))
    d_off, s_off = k, b.add(k, b.shl(nb, i64(2)))
    offset = {QType.Q4_0: 8, QType.Q8_0: 128}.get(qtype)  # the u8 bias folded into sum(q * xq)
    if qtype == QType.Q8_0 and (target.dot_isa == "avx2" or target.is_aarch64):
        offset = None  # the AVX2 and AArch64 Q8_0 dots are signed already (_block_dots(..., biased=False))
    per_iter = PAIR_GROUPS if tile == 1 else 1
    accs = [[entry_alloca(b, V16F32, name=f"acc{g}_{t}") for t in range(tile)] for g in range(per_iter)]
    chains = 1 if tile >= TILE_ONE_CHAIN else 2
    # Per activation row and block, what every row group adds the same way, worked out once per call: the
    # integer dot's starting value -offset * s_x (exact: the bias the 1-row kernel subtracted after the dot), or
    # Q4_1's f32 d_x * s_x (the same two roundings as before). The tile then loads it broadcast, no scalar work.
    pre_t = F32 if qtype == QType.Q4_1 else I32
    has_term = qtype == QType.Q4_1 or offset is not None

    def block_term(xt: ir.Value, blk: ir.Value) -> ir.Value:
        """Activation row xt's term of block blk: Q4_1's d_x * s_x (f32), else -offset * s_x (i32)."""
        sx = load(b, gep(b, xt, s_off), I32, blk, I32)
        if qtype == QType.Q4_1:
            return b.fmul(load(b, gep(b, xt, d_off), F32, blk, F32), b.sitofp(sx, F32))
        return b.mul(sx, i32(-offset))

    pre = None
    if tile > 1 and has_term:  # (1 row: worked out in the loop, the decode kernel as measured)
        pre = b.alloca(pre_t, size=b.mul(nb, i64(tile)), name="pre")
        for t in range(tile):
            xt = gep(b, x, b.mul(xs, i64(t)))
            with for_range(b, i64(0), nb, name=f"pre{t}") as blk:
                store(b, block_term(xt, blk), pre, b.add(b.mul(nb, i64(t)), blk), pre_t)

    def groups(rs: list[ir.Value]) -> None:
        """y rows of the groups starting at each r in rs, over all blocks."""
        wgs = [gep(b, w, b.mul(b.mul(b.lshr(r, i64(4)), nb), i64(cb))) for r in rs]
        for g in range(len(rs)):
            for a in accs[g]:
                b.store(ir.Constant(V16F32, None), a)
        with for_range(b, i64(0), nb, name="blk") as blk:
            for g, wg in enumerate(wgs):
                wc = gep(b, wg, b.mul(blk, i64(cb)))
                if (how := tile_prefetch(target, tile)) is not None:
                    prefetch(b, wc, cb, how)
                dw = b.fpext(load(b, wc, vec(F16, G), i64(qbytes)), V16F32)
                mw = b.fpext(load(b, wc, vec(F16, G), i64(qbytes + 2 * G)), V16F32) if qtype == QType.Q4_1 else None
                for t, a in enumerate(accs[g]):
                    xt = gep(b, x, b.mul(xs, i64(t)))
                    dx = load(b, gep(b, xt, d_off), F32, blk, F32)
                    if pre is not None:
                        pv = load(b, pre, pre_t, b.add(b.mul(nb, i64(t)), blk), pre_t)
                    else:
                        pv = block_term(xt, blk) if has_term else None
                    init = splat(b, pv, 16) if offset is not None else None  # - offset * s_x
                    dot = _block_dots(b, target, qtype, wc, gep(b, xt, b.shl(blk, i64(5))), biased=offset is not None,
                                      init=init, chains=chains, shift16=tile > 1)
                    acc = b.load(a, typ=V16F32)
                    if mw is not None:  # + m_w * (d_x * s_x)
                        acc = fmuladd(b, mw, splat(b, pv, 16), acc)
                    acc = fmuladd(b, dw, b.fmul(splat(b, dx, 16), b.sitofp(dot, V16F32)), acc)
                    b.store(acc, a)
        for g, r in enumerate(rs):
            for t, a in enumerate(accs[g]):
                store_rows(b, b.load(a, typ=V16F32), gep(b, y, b.mul(ldy, i64(t)), F32), r, r1)

    n_groups = b.sdiv(b.add(b.sub(r1, r0), i64(G - 1)), i64(G))
    paired_end = b.add(r0, b.mul(b.sdiv(n_groups, i64(per_iter)), i64(per_iter * G)))
    with for_range(b, r0, paired_end, per_iter * G, name="r") as r:
        groups([b.add(r, i64(g * G)) for g in range(per_iter)])
    with for_range(b, paired_end, r1, G, name="rt") as r:
        groups([r])
    b.ret_void()
    return fn


def emit_matvec_q(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    tile = _tile_fn(module, spec.qtype, 1, target)
    fn, b = define(module, spec.name, spec.signature)
    w, x, y, k, r0, r1 = fn.args
    b.call(tile, [w, x, i64(0), y, i64(0), k, r0, r1])
    b.ret_void()


MATMUL_ROW_BLOCK = 64  # weight rows (4 groups: ~20-60 KB of SmolLM2's) every tile of activation rows takes
# in turn before the next block, so a step of several tiles (a batch of sequences) streams the weights from
# memory once, not once per tile; each row's sum is the same whatever the blocking (groups are independent)


def matmul_tiles(tile: int) -> tuple[int, ...]:
    """The tile sizes a matmul kernel of spec.tile `tile` compiles and uses: the tile, then the powers of two
    below it, largest first (the rows left after the full tiles, fewer than `tile`, are one tile of each
    power in their binary form: 7 rows with tile 8 are tiles of 4, 2 and 1)."""
    return (tile,) + tuple(2**i for i in reversed(range(tile.bit_length())) if 2**i < tile)


def emit_matmul_q(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """y[t, r0:r1] = W[r0:r1] . x[t] for t < n: tiles of spec.tile activation rows, then the rows left in tiles
    of matmul_tiles(spec.tile), over blocks of MATMUL_ROW_BLOCK weight rows when that makes more than one
    pass. Every row's result is the same for any tile (the tile's rows share the weight loads; each row's
    arithmetic is the 1-row kernel's), so the blocking and the tiles are free to follow n: a batch of 2, 3
    or 8 sequences reads each weight from memory once per step, as a batch of 4 does."""
    sizes = matmul_tiles(spec.tile)
    tiles = {t: _tile_fn(module, spec.qtype, t, target) for t in sizes}
    fn, b = define(module, spec.name, spec.signature)
    w, x, y, k, r0, r1, n, ldy = fn.args
    xs = b.add(k, b.shl(b.lshr(k, i64(5)), i64(3)))  # act_bytes(k)
    full = b.mul(b.sdiv(n, i64(spec.tile)), i64(spec.tile))
    rest = b.sub(n, full)
    passes = b.sdiv(n, i64(spec.tile))
    for t in sizes[1:]:
        passes = b.add(passes, b.zext(b.icmp_signed("!=", b.and_(rest, i64(t)), i64(0)), n.type))
    block = b.select(b.icmp_signed(">", passes, i64(1)), i64(MATMUL_ROW_BLOCK), b.sub(r1, r0))
    block = b.select(b.icmp_signed(">", block, i64(0)), block, i64(1))

    def call(t: int, c: ir.Value, rb: ir.Value, re: ir.Value) -> None:
        b.call(tiles[t], [w, gep(b, x, b.mul(c, xs)), xs, gep(b, y, b.mul(c, ldy), F32), ldy, k, rb, re])

    with for_range(b, r0, r1, block, name="rb") as rb:
        re = b.select(b.icmp_signed("<", b.add(rb, block), r1), b.add(rb, block), r1)
        with for_range(b, i64(0), full, spec.tile, name="c") as c:
            call(spec.tile, c, rb, re)
        for t in sizes[1:]:  # rows full + (the bits of rest above t) onwards
            with b.if_then(b.icmp_signed("!=", b.and_(rest, i64(t)), i64(0))):
                call(t, b.add(full, b.and_(rest, i64(~(2 * t - 1)))), rb, re)
    b.ret_void()


def _tile_fn(module: ir.Module, qtype: QType, tile: int, target: Target) -> ir.Function:
    name = f"_tile_{qtype.name.lower()}_q8s_x{tile}"
    if name in module.globals:
        return module.globals[name]
    return (_emit_tile_extra if qtype in EXTRA_TYPES else _emit_tile)(module, qtype, tile, target)


# --- float products -------------------------------------------------------------------------------------

def emit_matvec_f(module: ir.Module, spec: KernelSpec, target: Target) -> None:
    """y[r] = sum_k w[r, k] * x[k] with 16 f32 lanes; w is f32 or f16 (converted on load)."""
    fn, b = define(module, spec.name, spec.signature)
    w, x, y, k, r0, r1 = fn.args
    welem = F32 if spec.qtype == QType.F32 else F16
    acc = entry_alloca(b, V16F32, name="acc")
    with for_range(b, r0, r1, name="r") as r:
        wr = gep(b, w, b.mul(r, k), welem)
        b.store(ir.Constant(V16F32, None), acc)
        with for_range(b, i64(0), k, 16, name="c") as c:
            wv = load(b, wr, vec(welem, 16), c, welem)
            if welem is F16:
                wv = b.fpext(wv, V16F32)
            b.store(fmuladd(b, wv, load(b, x, V16F32, c, F32), b.load(acc, typ=V16F32)), acc)
        store(b, hsum(b, b.load(acc, typ=V16F32)), y, r, F32)
    b.ret_void()
