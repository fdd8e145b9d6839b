"""The llvmlite-JIT kernels (dllp2p/jit) against their numpy twins (dllp2p/jit/reference.py).

Every kernel of specs.all_specs() runs on random inputs over many shapes, edge sizes included, and is
compared with its twin. Tolerances are stated per kernel and derived from the f32 rounding of the
operations the kernel performs (U = 2^-24, the f32 unit roundoff), never fitted to observed errors:

  * quantize_f32_q8s, quantize_f32_q8_0, add_q8_0_f32, embed_*, add_f32, to_f16, barrier_demo, pack/unpack: bit-exact.
  * quantized matvec/matmul: the twin is exact (integer dots, f64 scales); the kernel adds, per row,
    `terms` f32 products (one per 32-value block, two for Q4_1, Q5_1 and the K-quants: a min term, or
    Q6_K's two 16-value halves) each rounded ~2 times (K-quant scales d * sc are exact in f32), so
    |y - exact| <= (terms + 3) * U * bound, bound = reference.matvec_q_q8s_bound (sum of |terms|).
  * float matvec: 16 lanes of k/16 fused terms, then a 4-level horizontal sum:
    |y - exact| <= (k/16 + 6) * U * sum|w x|.
  * rmsnorm, rope, silu_mul, attention: first-order error bounds spelled out at each test.

The library is compiled once per module (no disk cache); a few extra builds check the generic
(non-VNNI) dot path, the assembly and the disk cache.
"""

from __future__ import annotations

import ctypes
import re
import threading

import llvmlite.ir as ir
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllp2p.formats.quant import BLOCK_DTYPES, QK, QType, dequantize, quantize
from dllp2p.jit import ir_attention, ir_dot, ir_ops
from dllp2p.jit import reference as ref
from dllp2p.jit.compiler import ObjectCache, Target, compile_module, emit_assembly, host_target
from dllp2p.jit.layout import (
    EXTRA_TYPES, G, PACKED_TYPES, chunk_bytes, unit_values, act_bytes, q8_0_bytes, aligned_empty, aligned_zeros, kv_cache, pack_weights, rope_table, unpack_weights,
)
from dllp2p.jit.ir_barrier import BARRIER_WORDS
from dllp2p.jit.irutil import F16, F32, Signature, define, for_range, i64, load, store, vec
from dllp2p.jit.library import build_module, compile_kernels
from dllp2p.jit.specs import FLOAT_WEIGHTS, QUANT_WEIGHTS, KernelSpec, Op, all_specs

U = 2.0**-24  # f32 unit roundoff
TINY = float(np.finfo(np.float32).tiny)
SENTINEL = np.float32(-12345.5)  # written around every output: a kernel must not touch it
EXTRA_TILES = (1, 3, 8)  # matmul tiles besides all_specs()'s default 4
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def lib():
    extra = tuple(KernelSpec(Op.MATMUL, q, t) for q in QUANT_WEIGHTS for t in EXTRA_TILES)
    return compile_kernels(all_specs() + extra, cache_dir=None)


def P(a: np.ndarray) -> int:
    return a.ctypes.data


def round_up(n: int, m: int = G) -> int:
    return (n + m - 1) // m * m


# --- random inputs ------------------------------------------------------------------------------------

def kk(qtype: QType, k: int) -> int:
    """k rounded up to whole blocks of qtype (256 for the K-quants)."""
    return round_up(k, unit_values(qtype)) if qtype in EXTRA_TYPES else k


def random_raw(rng: np.random.Generator, qtype: QType, rows: int, k: int) -> np.ndarray:
    """ggml-layout u8[rows, row_bytes]: either a quantized Gaussian, or arbitrary blocks (every nibble,
    Q8_0's -128 included, scales over decades, some zero) to reach the corners of the integer dots."""
    if qtype in FLOAT_WEIGHTS:
        return quantize(rng.standard_normal((rows, k)).astype(np.float32), qtype)
    if rng.random() < 0.3:
        return quantize((rng.standard_normal((rows, k)) * rng.uniform(0.01, 3)).astype(np.float32), qtype)
    if qtype in EXTRA_TYPES:  # random bytes (every bit pattern of values and 6/8-bit scales), f16 fields set
        bdt = BLOCK_DTYPES[qtype]
        nb = k // unit_values(qtype)
        blocks = rng.integers(0, 256, (rows * nb, bdt.itemsize), dtype=np.uint8).reshape(-1).view(bdt)
        for field in ("d", "m", "dmin"):
            if field in bdt.names:
                d = rng.uniform(-1, 1, rows * nb) * 10.0 ** rng.integers(-4, 1, rows * nb)
                d[rng.random(rows * nb) < 0.05] = 0
                blocks[field] = d.astype(np.float16)
        return blocks.view(np.uint8).reshape(rows, -1)
    nb = k // QK
    blocks = np.zeros((rows, nb), BLOCK_DTYPES[qtype])
    d = rng.uniform(-1, 1, (rows, nb)) * 10.0 ** rng.integers(-4, 1, (rows, nb))
    d[rng.random((rows, nb)) < 0.05] = 0
    blocks["d"] = d.astype(np.float16)
    if qtype == QType.Q4_1:
        blocks["m"] = (rng.standard_normal((rows, nb)) * 0.1).astype(np.float16)
    if qtype == QType.Q8_0:
        blocks["qs"] = rng.integers(-128, 128, (rows, nb, QK), dtype=np.int8)
    else:
        blocks["qs"] = rng.integers(0, 256, (rows, nb, QK // 2), dtype=np.uint8)
    return blocks.view(np.uint8).reshape(rows, -1)


def random_acts(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """f32[n, k] with per-block scales over decades, zero blocks, and blocks whose scaled values are exact
    halves (d = 1 or d = 0.5 exactly), where round-half-away-from-zero decides."""
    x = rng.standard_normal((n, k // QK, QK)) * 10.0 ** rng.integers(-3, 3, (n, k // QK, 1))
    kind = rng.integers(0, 8, (n, k // QK))
    x[kind == 0] = 0
    halves = rng.integers(-254, 255, (n, k // QK, QK)) / 2.0  # multiples of 0.5 in [-127, 127]
    halves[..., 0] = 127.0 * rng.choice([-1, 1], (n, k // QK))  # |max| = 127: d = 1, x / d = x
    x = np.where((kind == 1)[..., None], halves, x)
    x = np.where((kind == 2)[..., None], halves / 2, x)  # |max| = 63.5: d = 0.5, x / d = 2x
    x[kind == 3] *= 1e-20  # tiny but normal scales
    return x.reshape(n, k).astype(np.float32)


def q8s(lib, x: np.ndarray) -> np.ndarray:
    """Q8S rows of f32[n, k], by the kernel (checked bit-exact with the twin below)."""
    n, k = x.shape
    out = aligned_zeros((n, act_bytes(k)), np.uint8)
    lib["quantize_f32_q8s"](P(np.ascontiguousarray(x)), P(out), k, n)
    return out


def draw_range(data, rows: int, whole: float = 0.3) -> tuple[int, int]:
    """A row range [r0, r1) with r0 % 16 == 0, r1 <= rows; often the whole range."""
    if data.draw(st.floats(0, 1)) < whole:
        return 0, rows
    r0 = data.draw(st.integers(0, (rows - 1) // G)) * G
    return r0, data.draw(st.integers(r0 + 1, rows))


def q_tol(qtype: QType, k: int, bound: np.ndarray) -> np.ndarray:
    terms = k // QK * (2 if qtype in (QType.Q4_1, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K) else 1)
    return (terms + 3) * U * bound + TINY


def assert_within(got, want, tol, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bad = ~(err <= tol)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[:5]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} outside tolerance; at flat {i}: got "
                             f"{got.reshape(-1)[i]}, want {want.reshape(-1)[i]}, tol {np.broadcast_to(tol, err.shape).reshape(-1)[i]}")


# --- layout -------------------------------------------------------------------------------------------

@SETTINGS
@given(qtype=st.sampled_from([q for q in PACKED_TYPES if q not in EXTRA_TYPES]), rows=st.integers(1, 40),
       nb=st.integers(1, 8), seed=seeds)
def test_pack_unpack_round_trip(qtype, rows, nb, seed):
    rng = np.random.default_rng(seed)
    k = nb * QK
    raw = rng.integers(0, 256, (rows, k // QK * BLOCK_DTYPES[qtype].itemsize), dtype=np.uint8)  # any bytes, NaNs too
    m = pack_weights(raw, qtype, (rows, k))
    assert m.data.ctypes.data % 64 == 0
    assert m.padded_rows == round_up(rows) and m.nbytes == m.padded_rows * raw.shape[1]
    np.testing.assert_array_equal(unpack_weights(m), raw)


@pytest.mark.parametrize("qtype", EXTRA_TYPES)
def test_pack_extra_types_sizes_and_cut_blocks(qtype):
    """Packed bytes = padded rows x ggml row bytes x the documented ratio (K scales unpacked to bytes);
    a row that cuts a block (a bad column slice) is a clear error."""
    unit = unit_values(qtype)
    raw = quantize(np.random.default_rng(2).standard_normal((21, 2 * unit)).astype(np.float32), qtype)
    m = pack_weights(raw, qtype, (21, 2 * unit))
    assert m.padded_rows == 32 and m.data.ctypes.data % 64 == 0
    assert m.nbytes == 2 * 2 * chunk_bytes(qtype)
    ratio = {QType.Q4_K: 148 / 144, QType.Q5_K: 180 / 176, QType.IQ4_XS: 138 / 136}.get(qtype, 1.0)
    assert m.nbytes == pytest.approx(32 * raw.shape[1] * ratio)
    if unit > QK:
        with pytest.raises(ValueError, match="multiple of 256"):
            pack_weights(raw[:, : raw.shape[1] // 2 + 2], qtype, (21, unit + 64))


@pytest.mark.parametrize("qtype", [q for q in PACKED_TYPES if q not in FLOAT_WEIGHTS])
def test_packing_in_slices_gives_the_bytes_of_one_pass(qtype, monkeypatch):
    """pack_weights packs a slice of 16-row groups at a time (layout.PACK_SLICE_BYTES, to bound its memory): slices
    of 1, 2 or 3 groups, the last one short and padded, give the bytes of one pass over the whole matrix."""
    from dllp2p.jit import layout

    rows, k = 53, 2 * unit_values(qtype)
    raw = quantize(np.random.default_rng(5).standard_normal((rows, k)).astype(np.float32), qtype)
    whole = pack_weights(raw, qtype, (rows, k)).data
    assert layout.PACK_SLICE_BYTES >= raw.nbytes  # one slice: the whole matrix
    for groups in (1, 2, 3):
        monkeypatch.setattr(layout, "PACK_SLICE_BYTES", groups * G * raw.shape[1])
        np.testing.assert_array_equal(pack_weights(raw, qtype, (rows, k)).data, whole)


@pytest.mark.parametrize("qtype", FLOAT_WEIGHTS)
def test_pack_unpack_float(qtype):
    raw = quantize(np.random.default_rng(1).standard_normal((7, 64)).astype(np.float32), qtype)
    m = pack_weights(raw, qtype, (7, 64))
    assert m.padded_rows == 7
    np.testing.assert_array_equal(unpack_weights(m), raw)


def test_kv_cache_is_f16():
    c = kv_cache(8192, 3, 64)
    assert c.dtype == np.float16 and c.shape == (8192, 3, 64) and not c.any() and c.ctypes.data % 64 == 0


# --- activation quantization --------------------------------------------------------------------------

def test_round_half_away_reference():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 126.5, -126.5, 3.0, 0.0], np.float32)
    np.testing.assert_array_equal(ref.round_half_away(v), [1, 2, 3, -1, -3, 0, 127, -127, 3, 0])


@SETTINGS
@given(n=st.integers(1, 6), nb=st.integers(1, 40), seed=seeds)
def test_quantize_bit_exact(lib, n, nb, seed):
    k = nb * QK
    x = random_acts(np.random.default_rng(seed), n, k)
    out = np.full(n * act_bytes(k) + 64, 0xA5, np.uint8)
    lib["quantize_f32_q8s"](P(x), P(out), k, n)
    want = ref.quantize_f32_q8s(x)
    np.testing.assert_array_equal(out[: n * act_bytes(k)].reshape(n, -1), want)
    assert (out[n * act_bytes(k):] == 0xA5).all()
    q, d, s = ref.split_q8s(want[0], k)  # the twin's own invariants: exact sums, |q| <= 127
    assert (s == q.reshape(-1, QK).astype(np.int32).sum(1)).all() and np.abs(q.astype(np.int32)).max() <= 127


@SETTINGS
@given(nb=st.integers(1, 40), data=st.data(), seed=seeds)
def test_quantize_part_bit_exact(lib, nb, data, seed):
    """Blocks [b0, b1) of a row: exactly quantize_f32_q8s's bytes there (q, d, s sections), nothing else written;
    the pieces of a row quantized in any cut give the whole row's bytes."""
    k = nb * QK
    x = random_acts(np.random.default_rng(seed), 1, k)[0]
    want = ref.quantize_f32_q8s(x[None])[0]
    b0 = data.draw(st.integers(0, nb - 1))
    b1 = data.draw(st.integers(b0 + 1, nb))
    out = np.full(act_bytes(k) + 64, 0xA5, np.uint8)
    lib["quantize_part_f32_q8s"](P(x), P(out), k, b0, b1)
    mine = np.zeros(act_bytes(k), bool)  # the bytes of blocks [b0, b1): q, then d (f32), then s (i32)
    mine[b0 * QK: b1 * QK] = True
    mine[k + 4 * b0: k + 4 * b1] = True
    mine[k + 4 * nb + 4 * b0: k + 4 * nb + 4 * b1] = True
    np.testing.assert_array_equal(out[: act_bytes(k)][mine], want[mine])
    assert (out[: act_bytes(k)][~mine] == 0xA5).all() and (out[act_bytes(k):] == 0xA5).all()
    cuts = sorted({0, nb, *data.draw(st.lists(st.integers(1, nb), max_size=4))})
    whole = np.zeros(act_bytes(k), np.uint8)
    for lo, hi in zip(cuts, cuts[1:]):
        lib["quantize_part_f32_q8s"](P(x), P(whole), k, lo, hi)
    np.testing.assert_array_equal(whole, want)


def test_quantize_ties_round_away_from_zero(lib):
    x = np.zeros((1, 64), np.float32)
    x[0, :6] = [127, 2.5, -2.5, 0.5, -0.5, 126.5]  # d = 1: q = x rounded
    x[0, 32:36] = [-63.5, 1.25, -1.25, 0.25]  # d = 0.5: q = 2x rounded
    q, d, s = ref.split_q8s(q8s(lib, x)[0], 64)
    np.testing.assert_array_equal(q[:6], [127, 3, -3, 1, -1, 127])
    np.testing.assert_array_equal(q[32:36], [-127, 3, -3, 1])
    np.testing.assert_array_equal(d, [1.0, 0.5])
    np.testing.assert_array_equal(s, [q[:32].sum(), q[32:].sum()])


# --- Q8_0: the wire format of tensor-parallel partial sums -------------------------------------------

@SETTINGS
@given(n=st.integers(1, 5), nb=st.integers(1, 70), seed=seeds)
def test_quantize_q8_0_bit_exact(lib, n, nb, seed):
    k = nb * QK
    x = random_acts(np.random.default_rng(seed), n, k)
    x[0, :QK] = 0  # an all-zero block: d = 0, q = 0
    out = np.full(n * q8_0_bytes(k) + 64, 0xA5, np.uint8)
    lib["quantize_f32_q8_0"](P(x), P(out), k, n)
    np.testing.assert_array_equal(out[: n * q8_0_bytes(k)], quantize(x, QType.Q8_0).reshape(-1))
    assert (out[n * q8_0_bytes(k):] == 0xA5).all()


@SETTINGS
@given(n=st.integers(1, 5), nb=st.integers(1, 70), seed=seeds)
def test_add_q8_0_bit_exact(lib, n, nb, seed):
    """x += dequantize(q): f32(d) * q is exact in f32, so the twin's one f32 add is the kernel's result."""
    rng = np.random.default_rng(seed)
    k = nb * QK
    q = quantize(random_acts(rng, n, k), QType.Q8_0).reshape(n, -1)
    x = random_acts(rng, n, k)
    want = (x + dequantize(q, QType.Q8_0, (n, k))).astype(np.float32)
    padded = np.concatenate([x.reshape(-1), np.full(16, SENTINEL, np.float32)])
    lib["add_q8_0_f32"](P(padded), P(np.ascontiguousarray(q)), k, n)
    np.testing.assert_array_equal(padded[: n * k].reshape(n, k), want)
    assert (padded[n * k:] == SENTINEL).all()


# --- quantized products -------------------------------------------------------------------------------

def run_matvec_q(lib, qtype, raw, rows, k, x, r0, r1, padded_out=False):
    m = pack_weights(raw, qtype, (rows, k))
    a = q8s(lib, x[None])[0]
    y = np.full(m.padded_rows + 16, SENTINEL, np.float32)
    lib[KernelSpec(Op.MATVEC, qtype).name](P(m.data), P(a), P(y), k, r0, r1)
    exact = ref.matvec_q_q8s(raw, qtype, a, k)
    assert_within(y[r0:min(r1, rows)], exact[r0:r1], q_tol(qtype, k, ref.matvec_q_q8s_bound(raw, qtype, a, k)[r0:r1]),
                  f"{qtype.name} rows={rows} k={k} [{r0},{r1})")
    assert (y[:r0] == SENTINEL).all() and (y[r1:] == SENTINEL).all()
    if padded_out:
        assert (y[rows:r1] == 0).all()  # the zero rows padding the last group


@SETTINGS
@given(qtype=st.sampled_from(QUANT_WEIGHTS), rows=st.integers(1, 70), nb=st.integers(1, 24), data=st.data(), seed=seeds)
def test_matvec_q(lib, qtype, rows, nb, data, seed):
    rng = np.random.default_rng(seed)
    k = kk(qtype, nb * QK)
    r0, r1 = draw_range(data, rows)
    run_matvec_q(lib, qtype, random_raw(rng, qtype, rows, k), rows, k, random_acts(rng, 1, k)[0], r0, r1)


@pytest.mark.parametrize("qtype", QUANT_WEIGHTS)
@pytest.mark.parametrize("rows,k,r0,r1", [(1, 32, 0, 1), (16, 32, 0, 16), (17, 32, 16, 17), (33, 64, 16, 32),
                                           (48, 4096, 16, 48), (40, 8192, 0, 40), (21, 14336, 16, 21)])
def test_matvec_q_edges(lib, qtype, rows, k, r0, r1):
    rng = np.random.default_rng(rows * k)
    k = kk(qtype, k)
    run_matvec_q(lib, qtype, random_raw(rng, qtype, rows, k), rows, k, random_acts(rng, 1, k)[0], r0, r1)


@pytest.mark.parametrize("qtype", QUANT_WEIGHTS)
def test_matvec_q_padding_rows_give_zero(lib, qtype):
    rng = np.random.default_rng(5)
    k = kk(qtype, 64)
    run_matvec_q(lib, qtype, random_raw(rng, qtype, 21, k), 21, k, random_acts(rng, 1, k)[0], 16, 32, padded_out=True)


@SETTINGS
@given(qtype=st.sampled_from(QUANT_WEIGHTS), tile=st.sampled_from((4,) + EXTRA_TILES), n=st.integers(1, 11),
       rows=st.integers(1, 50), nb=st.integers(1, 12), data=st.data(), seed=seeds)
def test_matmul_q(lib, qtype, tile, n, rows, nb, data, seed):
    rng = np.random.default_rng(seed)
    k = kk(qtype, nb * QK)
    r0, r1 = draw_range(data, rows)
    ldy = r1 + data.draw(st.integers(0, 20))
    raw = random_raw(rng, qtype, rows, k)
    m = pack_weights(raw, qtype, (rows, k))
    acts = q8s(lib, random_acts(rng, n, k))
    y = np.full((n + 1, ldy), SENTINEL, np.float32)
    lib[KernelSpec(Op.MATMUL, qtype, tile).name](P(m.data), P(acts), P(y), k, r0, r1, n, ldy)
    exact = ref.matmul_q_q8s(raw, qtype, acts, k)
    for c in range(n):
        bound = ref.matvec_q_q8s_bound(raw, qtype, acts[c], k)
        assert_within(y[c, r0:r1], exact[c, r0:r1], q_tol(qtype, k, bound[r0:r1]), f"row {c}")
    mask = np.ones(y.shape, bool)
    mask[:n, r0:r1] = False
    assert (y[mask] == SENTINEL).all()


@pytest.mark.parametrize("qtype", QUANT_WEIGHTS)
def test_matmul_of_many_tiles_is_each_row_alone(lib, qtype):
    """Any number of activation rows (a batch of sequences: full tiles, then one tile of the rows left, in
    blocks of MATMUL_ROW_BLOCK weight rows when that makes more than one pass): every output bit-identical
    to that activation row's product alone (n = 1), for the tiles of 4 and 8."""
    rng = np.random.default_rng(11)
    rows, k, most, r0 = 200, kk(qtype, 2 * QK), 13, 16
    m = pack_weights(random_raw(rng, qtype, rows, k), qtype, (rows, k))
    acts = q8s(lib, random_acts(rng, most, k))
    alone = np.full((most, rows), SENTINEL, np.float32)
    one = lib[KernelSpec(Op.MATMUL, qtype, 4).name]
    for c in range(most):
        one(P(m.data), P(acts[c:]), P(alone[c]), k, r0, rows, 1, rows)
    for tile in (4, 8):
        fn = lib[KernelSpec(Op.MATMUL, qtype, tile).name]
        for n in (2, 3, 4, 7, 8, 9, 13):
            y = np.full((n, rows), SENTINEL, np.float32)
            fn(P(m.data), P(acts), P(y), k, r0, rows, n, rows)
            for c in range(n):
                assert np.array_equal(y[c], alone[c]), f"tile {tile}, {n} rows: row {c}"


# --- float products -----------------------------------------------------------------------------------

@SETTINGS
@given(qtype=st.sampled_from(FLOAT_WEIGHTS), rows=st.integers(1, 40), k16=st.integers(1, 64), data=st.data(), seed=seeds)
def test_matvec_float(lib, qtype, rows, k16, data, seed):
    rng = np.random.default_rng(seed)
    k = 16 * k16
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0 + 1, rows))
    raw = random_raw(rng, qtype, rows, k)
    w = pack_weights(raw, qtype, (rows, k)).data
    x = rng.standard_normal(k).astype(np.float32)
    y = np.full(rows + 1, SENTINEL, np.float32)
    lib[KernelSpec(Op.MATVEC, qtype).name](P(w), P(x), P(y), k, r0, r1)
    twin = ref.matvec_f32_f32 if qtype == QType.F32 else ref.matvec_f16_f32
    bound = np.abs(raw.astype(np.float64)) @ np.abs(x.astype(np.float64))
    assert_within(y[r0:r1], twin(raw, x)[r0:r1], (k // 16 + 6) * U * bound[r0:r1] + TINY)
    assert (y[:r0] == SENTINEL).all() and (y[r1:] == SENTINEL).all()


# --- embedding ----------------------------------------------------------------------------------------

@SETTINGS
@given(qtype=st.sampled_from(QUANT_WEIGHTS + FLOAT_WEIGHTS), rows=st.integers(1, 40), nb=st.integers(1, 10),
       data=st.data(), seed=seeds)
def test_embed_bit_exact(lib, qtype, rows, nb, data, seed):
    rng = np.random.default_rng(seed)
    k = kk(qtype, nb * QK)
    raw = random_raw(rng, qtype, rows, k)
    m = pack_weights(raw, qtype, (rows, k))
    for token in {0, rows - 1, data.draw(st.integers(0, rows - 1))}:
        out = np.full(k + 16, SENTINEL, np.float32)
        lib[KernelSpec(Op.EMBED, qtype).name](P(m.data), token, P(out), k)
        np.testing.assert_array_equal(out[:k], ref.embed(raw, qtype, (rows, k), token))
        assert (out[k:] == SENTINEL).all()


# --- elementwise and normalization --------------------------------------------------------------------

@SETTINGS
@given(n=st.integers(1, 300), eps=st.sampled_from([1e-5, 1e-6]), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=seeds)
def test_rmsnorm(lib, n, eps, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    out = np.full(n + 16, SENTINEL, np.float32)
    lib["rmsnorm_f32"](P(x), P(w), P(out), n, eps)
    # sum of squares: <= n/16 + 4 (lanes, tree) + 15 (tail) + 1 roundings, relative (all terms >= 0);
    # mean, + eps, sqrt (halves the relative error), 1 /, two products: a few more.
    want = ref.rmsnorm_f32(x, w, np.float32(eps))
    assert_within(out[:n], want, ((n // 16 + 20) / 2 + 6) * U * np.abs(want) + TINY)
    assert (out[n:] == SENTINEL).all()


@SETTINGS
@given(n=st.integers(1, 100), seed=seeds)
def test_silu_mul(lib, n, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * rng.choice([1.0, 10.0, 40.0])).astype(np.float32)
    g[: n // 10] = rng.uniform(-100, 100, n // 10)  # exp overflow / underflow territory
    up = rng.standard_normal(n).astype(np.float32)
    out = np.full(n + 16, SENTINEL, np.float32)
    lib["silu_mul_f32"](P(g), P(up), P(out), n)
    # expf (< 1 ulp, 2U), 1 + e, 1 / (.), g * sig, * up: <= 7U relative. Below -88.7 exp(-g) overflows to inf,
    # so sigmoid -> 0 where it is < 1e-38: the output there is < 1e-35 in magnitude, hence the absolute term.
    want = ref.silu_mul_f32(g, up)
    assert_within(out[:n], want, 8 * U * np.abs(want) + 1e-34)
    assert (out[n:] == SENTINEL).all()


@SETTINGS
@given(n=st.integers(1, 100), seed=seeds)
def test_gelu_tanh_mul(lib, n, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * rng.choice([0.3, 1.0, 3.0, 10.0])).astype(np.float32)
    g[: n // 10] = rng.uniform(-100, 100, n // 10)  # exp clamping territory
    up = rng.standard_normal(n).astype(np.float32)
    out = np.full(n + 16, SENTINEL, np.float32)
    lib["gelu_tanh_mul_f32"](P(g), P(up), P(out), n)
    # u = c (g + k g^3): ~5 roundings, relative; exp(-2u) (vexp, 2U) then carries u's relative error times |2u|;
    # 1 + e, g / (.), * up: 3 more. Where exp is clamped (2u < -88.7) the output is < 1e-36 * |g up|: absolute term.
    want = ref.gelu_tanh_mul_f32(g, up)
    u = np.sqrt(2 / np.pi) * (g.astype(np.float64) + 0.044715 * g.astype(np.float64) ** 3)
    assert_within(out[:n], want, (10 + 12 * np.abs(u)) * U * np.abs(want) + 1e-34 * np.abs(g * up) + 1e-37)
    assert (out[n:] == SENTINEL).all()


@SETTINGS
@given(n=st.integers(1, 100), s=st.floats(-100, 100, width=32), seed=seeds)
def test_scale_bit_exact(lib, n, s, seed):
    rng = np.random.default_rng(seed)
    x = np.full(n + 16, SENTINEL, np.float32)
    x[:n] = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)
    want = ref.scale_f32(x[:n], s).astype(np.float32)  # one product: the f64 one rounded is the f32 one
    lib["scale_f32"](P(x), n, s)
    np.testing.assert_array_equal(x[:n], want)
    assert (x[n:] == SENTINEL).all()


@SETTINGS
@given(n=st.integers(1, 100), seed=seeds)
def test_add_bit_exact(lib, n, seed):
    rng = np.random.default_rng(seed)
    x = np.full(n + 16, SENTINEL, np.float32)
    x[:n] = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)
    y = rng.standard_normal(n + 16).astype(np.float32)
    # the f64 sum rounded to f32 is the correctly rounded f32 sum (53 >= 2 * 24 + 2: double rounding is innocuous)
    want = ref.add_f32(x[:n], y[:n]).astype(np.float32)
    lib["add_f32"](P(x), P(y), n)
    np.testing.assert_array_equal(x[:n], want)
    assert (x[n:] == SENTINEL).all()


def _f16_specials(rng: np.random.Generator, n: int) -> np.ndarray:
    """f32 values that make f32 -> f16 rounding interesting: ties between neighbouring f16 values,
    subnormal f16 range, the overflow edge (65504, 65520), infinities, NaN, and arbitrary bit patterns."""
    h = rng.integers(0, 0x7C00, n, dtype=np.uint16).view(np.float16)
    nxt = np.nextafter(h, np.float16(np.inf))
    mid = (h.astype(np.float32) + nxt.astype(np.float32)) / 2  # exact in f32: a tie
    anybits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    pick = rng.integers(0, 5, n)
    x = np.where(pick == 0, mid, anybits)
    x = np.where(pick == 1, rng.standard_normal(n) * 1e-5, x)
    x = np.where(pick == 2, np.nextafter(mid, np.float32(np.inf)), x)
    x = np.where(pick == 3, rng.choice(np.array([65504, 65519.996, 65520, -65520, np.inf, -np.inf, np.nan, 0.0, -0.0,
                                                 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8], np.float32), n), x)
    return (x * rng.choice([-1, 1], n)).astype(np.float32)


@SETTINGS
@given(n=st.integers(1, 100), seed=seeds)
def test_to_f16_bit_exact(lib, n, seed):
    x = _f16_specials(np.random.default_rng(seed), n)
    out = np.full(n + 16, 0x5A5A, np.uint16)
    lib["to_f16"](P(x), P(out), n)
    want = ref.to_f16(x)
    got = out[:n].view(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(out[:n][~nan], want.view(np.uint16)[~nan])
    assert (out[n:] == 0x5A5A).all()


@SETTINGS
@given(n=st.integers(1, 300), data=st.data(), ties=st.booleans(), seed=seeds)
def test_top_k_matches_stable_argsort(lib, n, data, ties, seed):
    """The k best values and their indices, in numpy's stable-argsort order, ties included (few distinct
    values when `ties`), -inf and duplicates at the cut; nothing written past k records."""
    k = data.draw(st.integers(1, n))
    base = data.draw(st.integers(0, 1 << 20))
    rng = np.random.default_rng(seed)
    x = (rng.integers(-3, 4, n) if ties else rng.standard_normal(n) * 10).astype(np.float32)
    x[rng.random(n) < 0.05] = -np.inf
    out = np.zeros(k + 2, ref.CANDIDATE)
    out["value"], out["index"] = SENTINEL, -7
    lib["top_k_f32"](P(x), n, k, base, P(out))
    want = ref.top_k_f32(x, k, base)
    np.testing.assert_array_equal(out["value"][:k], want["value"])
    np.testing.assert_array_equal(out["index"][:k], want["index"])
    assert (out["index"][k:] == -7).all()


# --- rope ---------------------------------------------------------------------------------------------

@SETTINGS
@given(n_heads=st.integers(1, 8), half_hd=st.integers(1, 64), data=st.data(), ctx=st.integers(1, 64), seed=seeds)
def test_rope(lib, n_heads, half_hd, data, ctx, seed):
    rng = np.random.default_rng(seed)
    head_dim = 2 * half_hd
    rope_dim = 2 * data.draw(st.integers(1, half_hd))
    pos = data.draw(st.sampled_from([0, ctx - 1, int(rng.integers(0, ctx))]))
    table = rope_table(ctx, rope_dim, 10000.0)
    x = np.full((n_heads + 1, head_dim), SENTINEL, np.float32)
    x[:n_heads] = rng.standard_normal((n_heads, head_dim))
    x0 = x[:n_heads].copy()
    lib["rope_f32"](P(x), P(table), pos, n_heads, head_dim, rope_dim)
    want = ref.rope_f32(x0, table, pos, rope_dim)
    # each output is a0 c -/+ a1 s: two products and one sum, <= 2U (|a0 c| + |a1 s|)
    c, s = np.abs(table[pos, :, 0]).astype(np.float64), np.abs(table[pos, :, 1]).astype(np.float64)
    a0, a1 = np.abs(x0[:, 0:rope_dim:2]).astype(np.float64), np.abs(x0[:, 1:rope_dim:2]).astype(np.float64)
    tol = np.zeros_like(want)
    tol[:, 0:rope_dim:2] = tol[:, 1:rope_dim:2] = 2 * U * (a0 * c + a1 * s + a0 * s + a1 * c)
    assert_within(x[:n_heads], want, tol + TINY)
    np.testing.assert_array_equal(x[:n_heads, rope_dim:], x0[:, rope_dim:])  # past rope_dim: untouched
    assert (x[n_heads] == SENTINEL).all()
    if pos == 0:
        np.testing.assert_array_equal(x[:n_heads], x0)  # cos 0 = 1, sin 0 = 0: exact


# --- attention ----------------------------------------------------------------------------------------

def attention_tol(q, kc, vc, pos, n_spans=1):
    """Per-element bound on |merged spans - exact| (first order), f64[n_heads, hd].

    Scores: a chain of hd/8 fused multiply-adds per lane, a 3-level tree, then the 1/sqrt(hd) scale (itself
    rounded twice): e_t <= (hd/8 + 6) U sum|q k_t| / sqrt(hd). Each weight exp(s_t - m_span) exp(m_span - max)
    then carries a relative error <= d = max_t(e_t) + e_max + U |s_t - max| + 4U (subtractions; two vexp,
    each < 2U, see test_vexp). out = sum p_t v_t / sum p_t moves by <= 2 d sum w_t |v_t| (w = softmax), and
    the f32 sums (over a span's positions, then over the n_spans spans: one chain per lane each, for the
    values and for the weights) and the final 1 / sum and product add (2 n_pos + 2 n_spans + 6) U sum w_t |v_t|."""
    n_heads, hd = q.shape
    group = n_heads // kc.shape[1]
    n_pos = pos + 1
    tol = np.empty((n_heads, hd))
    for h in range(n_heads):
        k = kc[:n_pos, h // group].astype(np.float64)
        v = vc[:n_pos, h // group].astype(np.float64)
        qh = q[h].astype(np.float64)
        s = k @ qh / np.sqrt(hd)
        e = (hd / 8 + 6) * U * (np.abs(k) @ np.abs(qh)) / np.sqrt(hd)
        d = (e + e.max() + U * np.abs(s - s.max()) + 4 * U).max()
        w = np.exp(s - s.max())
        w /= w.sum()
        tol[h] = (2 * d + (2 * n_pos + 2 * n_spans + 6) * U) * (w @ np.abs(v))
    return tol + TINY


def run_attention(lib, rng, n_kv, group, hd, ctx, pos, h0, h1, q_scale=1.0, split=ir_attention.ATT_SPLIT):
    """Positions 0..pos in spans of `split` (as the engine cuts them): each span's stats from attention_f16kv
    against its twin, attention_merge against its twin on the kernel's partials, and the merged result
    against the exact softmax attention."""
    n_heads = n_kv * group
    q = (rng.standard_normal((n_heads, hd)) * q_scale).astype(np.float32)
    kc, vc = kv_cache(ctx, n_kv, hd), kv_cache(ctx, n_kv, hd)
    kc[: pos + 1] = rng.standard_normal((pos + 1, n_kv, hd))
    vc[: pos + 1] = rng.standard_normal((pos + 1, n_kv, hd))
    kc[pos + 1:] = vc[pos + 1:] = np.nan  # positions past pos must not be read
    spans = [(t0, min(t0 + split, pos + 1)) for t0 in range(0, pos + 1, split)]
    po = np.full((len(spans), n_heads, hd), SENTINEL, np.float32)
    stats = np.full((len(spans), n_heads, 2), SENTINEL, np.float32)
    scratch = aligned_zeros((n_heads, ctx), np.float32)
    where = f"n_kv={n_kv} group={group} hd={hd} ctx={ctx} pos={pos} heads [{h0},{h1})"
    for j, (t0, t1) in enumerate(spans):
        lib["attention_f16kv"](P(q), P(kc), P(vc), P(po[j]), P(stats[j]), P(scratch), t0, t1, n_heads, n_kv, hd, ctx, h0, h1)
        _, want_s = ref.attention_span_f16kv(q, kc, vc, t0, t1)
        # the span's max is one score (bound as in attention_tol); its sum moves by the weights'
        # relative error d (< 1e-4 for these unit-scale inputs: checked loosely, the merged result tightly below)
        np.testing.assert_allclose(stats[j, h0:h1, 0], want_s[h0:h1, 0], rtol=1e-5, atol=1e-4 * max(1.0, q_scale), err_msg=where)
        np.testing.assert_allclose(stats[j, h0:h1, 1], want_s[h0:h1, 1], rtol=1e-3 * max(1.0, q_scale), err_msg=where)
    merged = ref.attention_merge(po, stats)  # the twin of attention_merge on the kernel's own partials
    out = np.full((n_heads + 1, hd), SENTINEL, np.float32)
    lib["attention_merge"](P(po), P(stats), P(out), len(spans), n_heads, hd, h0, h1)
    np.testing.assert_allclose(out[h0:h1], merged[h0:h1], rtol=(2 * len(spans) + 8) * U,
                               atol=(2 * len(spans) + 8) * U * np.abs(merged[h0:h1]).max() + TINY, err_msg=where)
    want = ref.attention_f16kv(q, kc, vc, pos)
    assert_within(out[h0:h1], want[h0:h1], attention_tol(q, kc, vc, pos, len(spans))[h0:h1], where)
    mask = np.ones(out.shape, bool)
    mask[h0:h1] = False
    assert (out[mask] == SENTINEL).all()
    assert (po[:, :h0] == SENTINEL).all() and (po[:, h1:] == SENTINEL).all() and (stats[:, h1:] == SENTINEL).all()


@SETTINGS
@given(n_kv=st.integers(1, 4), group=st.integers(1, 4), hd16=st.sampled_from([1, 2, 3, 4, 8]), ctx=st.integers(1, 40),
       q_scale=st.sampled_from([0.1, 1.0, 4.0]), split=st.sampled_from([3, 8, 16, ir_attention.ATT_SPLIT]), data=st.data(),
       seed=seeds)
def test_attention_f16kv(lib, n_kv, group, hd16, ctx, q_scale, split, data, seed):
    """Random shapes, head ranges and span lengths (short spans: many partials merged, ragged ends)."""
    n_heads = n_kv * group
    pos = data.draw(st.sampled_from([0, ctx - 1, data.draw(st.integers(0, ctx - 1))]))
    h0 = data.draw(st.integers(0, n_heads - 1))
    h1 = data.draw(st.integers(h0 + 1, n_heads))
    run_attention(lib, np.random.default_rng(seed), n_kv, group, 16 * hd16, ctx, pos, h0, h1, q_scale, split)


@pytest.mark.parametrize("n_kv,group,hd,ctx,pos", [(1, 1, 16, 1, 0), (3, 3, 64, 300, 299), (2, 4, 128, 64, 0),
                                                   (8, 1, 64, 513, 400), (1, 32, 32, 2048, 2047),
                                                   (2, 3, 256, 140, 133), (1, 7, 48, 200, 197), (1, 5, 80, 70, 66)])
def test_attention_f16kv_edges(lib, n_kv, group, hd, ctx, pos):
    """Many position blocks (64) with ragged ends, groups of 3 heads plus 1 or 2, both kernel copies (hd = 64, and
    the generic one: 16/32/48-lane tails, hd = 256)."""
    run_attention(lib, np.random.default_rng(ctx), n_kv, group, hd, ctx, pos, 0, n_kv * group)


@pytest.mark.parametrize("n_kv,group,hd,pos,h0,h1", [(3, 3, 64, 1000, 0, 1), (3, 3, 64, 1000, 4, 5),
                                                     (2, 5, 128, 300, 3, 9), (1, 7, 48, 129, 2, 7),
                                                     (2, 4, 32, 77, 1, 7)])
def test_attention_f16kv_head_ranges(lib, n_kv, group, hd, pos, h0, h1):
    """One head (as the engine calls it), and ranges that cut groups: each group's share of [h0, h1) in chunks."""
    run_attention(lib, np.random.default_rng(pos + h0), n_kv, group, hd, pos + 1, pos, h0, h1)


@pytest.mark.parametrize("q_scale", [8.0, 30.0])
def test_attention_f16kv_peaked(lib, q_scale):
    """Scores spread over hundreds: most exp(s - max) underflow (vexp's clamp, subnormal and zero results)."""
    run_attention(lib, np.random.default_rng(5), 2, 3, 64, 150, 149, 0, 6, q_scale)


def _elementwise_module(name: str, width: int, emit_one, in_type) -> ir.Module:
    """A module with name(x, out, n): out[i] = emit_one(b, <width x in_type> at x[i]) for i in 0..n step width
    (n a multiple of width)."""
    t = host_target()
    m = ir.Module(name="test_" + name)
    m.triple = t.triple
    fn, b = define(m, name, Signature((("x", "p"), ("out", "p"), ("n", "i"))))
    x, out, n = fn.args
    with for_range(b, i64(0), n, width, name="i") as i:
        store(b, emit_one(b, load(b, x, vec(in_type, width), i, in_type)), out, i, F32)
    b.ret_void()
    return m


def _run_elementwise(m: ir.Module, name: str, x: np.ndarray) -> np.ndarray:
    assert len(x) % 8 == 0
    compiled = compile_module(m, host_target(), None)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(compiled.address(name))
    out = np.full(len(x), SENTINEL, np.float32)
    fn(P(x), P(out), len(x))
    return out


@pytest.mark.parametrize("width", [8, 1])
def test_vexp(width):
    """ir_ops.vexp (attention's exp): relative error <= 2U wherever exp(x) is a normal f32 (measured: 1.4U),
    <= 2U relative + 2^-149 absolute in the subnormal range, 0 below; clamped at EXP_HI; exp(0) = 1 exactly."""
    m = _elementwise_module("vexp", width, ir_ops.vexp, F32)
    rng = np.random.default_rng(9)
    specials = [0.0, -0.0, -1e-30, 1e-30, 1e-7, -1e-7, -87.3, -87.4, -103.9, -149 * np.log(2), -150 * np.log(2),
                -105, -1e30, -np.inf, 89, 1e30]
    x = np.concatenate([np.linspace(ir_ops.EXP_LO, ir_ops.EXP_HI, 1 << 20), rng.uniform(-1, 1, 1 << 16),
                        rng.uniform(-110, -80, 1 << 14), specials]).astype(np.float32)
    got = _run_elementwise(m, "vexp", x).astype(np.float64)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    normal = (want >= TINY) & (x <= ir_ops.EXP_HI)
    assert_within(got[normal], want[normal], 2 * U * want[normal], "normal results")
    small = want < TINY
    assert_within(got[small], want[small], 2 * U * want[small] + 2.0**-149, "subnormal results")
    assert (got[x < ir_ops.EXP_LO] <= 2.0**-149).all() and got[x == -np.inf][0] == 0.0
    assert (got[x == 0] == 1.0).all()
    assert (got[x > ir_ops.EXP_HI] == got[x == np.float32(ir_ops.EXP_HI)][0]).all()  # clamped, finite


@pytest.mark.parametrize("native", [True, False])
def test_widen_f16_every_value(native):
    """f16 -> f32 as attention widens K/V rows, for all 65536 bit patterns: bit-exact with numpy (NaN: a NaN),
    by fpext (F16C) and by the integer path used where the target has no f16 conversion instruction."""
    if native and not ir_ops.has_native_f16(host_target()):
        pytest.skip("host has no f16 conversion instruction")
    m = _elementwise_module("widen", 8, lambda b, v: ir_ops.widen_f16(b, v, native), F16)
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _run_elementwise(m, "widen", h.view(np.float16))
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_attention_generic_target():
    """attention_f16kv built for the host with AVX, AVX2, FMA, F16C (and AVX-512) switched off: SSE2 code with
    the integer f16 widening (no __extendhfsf2 call), still within the tolerance, one head or all."""
    h = host_target()
    off = ("avx", "avx2", "fma", "f16c", "avx512f") if h.is_x86 else ()
    t = Target(h.triple, h.cpu, ",".join([f for f in h.features.split(",") if f and f[1:] not in off] +
                                         [f"-{f}" for f in off]))
    if h.is_x86:
        asm = emit_assembly(build_module([KernelSpec(Op.ATTENTION)], t), t)
        assert "ymm" not in asm and "vcvtph2ps" not in asm and "__extendhfsf2" not in asm
    glib = compile_kernels([KernelSpec(Op.ATTENTION), KernelSpec(Op.ATTENTION_MERGE)], cache_dir=None, target=t)
    rng = np.random.default_rng(4)
    for n_kv, group, hd, pos, h0, h1 in [(3, 3, 64, 200, 0, 9), (3, 3, 64, 200, 4, 5), (2, 5, 48, 70, 1, 10)]:
        run_attention(glib, rng, n_kv, group, hd, pos + 2, pos, h0, h1)


# --- barrier ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_barrier_demo_threads(lib, n_threads):
    """Python threads each run barrier_demo (ctypes drops the GIL): every phase reads all the previous phase's
    writes. The same state is reused across rounds (the generation keeps counting)."""
    n_phases = 50
    state = aligned_zeros(BARRIER_WORDS, np.int64)
    fn = lib["barrier_demo"]
    for _ in range(3):
        buf = np.full((n_phases, n_threads), -1, np.int64)
        threads = [threading.Thread(target=fn, args=(P(state), P(buf), n_threads, t, n_phases), daemon=True)
                   for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "barrier deadlock"
        np.testing.assert_array_equal(buf, ref.barrier_demo(n_threads, n_phases))
        assert state[0] == 0  # nobody left counted in


# --- code generation: instruction set, generic path, disk cache ---------------------------------------

def _matvec_module(target: Target):
    return build_module([KernelSpec(Op.MATVEC, q) for q in QUANT_WEIGHTS], target)


def test_host_uses_vnni_dot_instruction():
    t = host_target()
    if t.dot_isa not in ("avx512vnni", "avxvnni"):
        pytest.skip(f"host CPU {t.cpu} has no AVX512-VNNI / AVX-VNNI (dot_isa = {t.dot_isa})")
    assert "vpdpbusd" in emit_assembly(_matvec_module(t), t)


@pytest.mark.parametrize("cpu,features,isa", [
    ("sapphirerapids", "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+avx2,+fma,+f16c", "avx512vnni"),
    ("alderlake", "+avxvnni,+avx2,+fma,+f16c", "avxvnni"),
])
def test_vnni_targets_emit_vpdpbusd(cpu, features, isa):
    """Assembly only (the host need not run it): the VNNI paths type-check in LLVM and select vpdpbusd."""
    t = Target("x86_64-unknown-linux-gnu", cpu, features)
    assert t.dot_isa == isa
    asm = emit_assembly(_matvec_module(t), t)
    assert "vpdpbusd" in asm and ("zmm" in asm) == (isa == "avx512vnni")


@pytest.mark.parametrize("qtype", EXTRA_TYPES)
@pytest.mark.parametrize("cpu,features,isa", [
    ("sapphirerapids", "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+avx2,+fma,+f16c", "vpdpbusd"),
    ("haswell", "+avx2,+fma,+f16c", "vpmaddubsw"),
])
def test_extra_types_select_the_dot_instruction(qtype, cpu, features, isa):
    """Each new type on its own: its matvec and matmul select the path's dot instruction."""
    t = Target("x86_64-unknown-linux-gnu", cpu, features)
    asm = emit_assembly(build_module([KernelSpec(Op.MATVEC, qtype), KernelSpec(Op.MATMUL, qtype, 4)], t), t)
    assert isa in asm


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q5_0, QType.Q4_K])
def test_prefetch_hints_per_kernel(qtype):
    """ir_dot.py's measured choices: the decode matvec prefetches its weight stream into L2 (prefetcht1), K-quant
    super-blocks not at all; every type's tiles of 4 rows, and of 8 with AVX-512 VNNI, 8 KB ahead into L2
    (ir_dot.tile_prefetch 'far'); AVX2's 8-row tiles 1 KB ahead into L1 (compute-bound there); the 2-row tile:
    Q4_0/Q4_1/Q8_0 none, the other types prefetcht0."""
    z4 = Target("x86_64-unknown-linux-gnu", "znver4", "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,+avx2,+fma,+f16c")
    z3 = Target("x86_64-unknown-linux-gnu", "znver3", "+avx2,+fma,+f16c")
    matvec = emit_assembly(build_module([KernelSpec(Op.MATVEC, qtype)], z4), z4)
    if qtype == QType.Q4_K:
        assert "prefetch" not in matvec
    else:
        assert "prefetcht1" in matvec and "prefetcht0" not in matvec
    far, near, none = ("2", True), ("3", False), None
    want = {z4: {8: far, 4: far, 2: none if qtype == QType.Q8_0 else near},
            z3: {8: near, 4: far, 2: none if qtype == QType.Q8_0 else near}}
    for t, tiles in want.items():
        ir_text = str(build_module([KernelSpec(Op.MATMUL, qtype, 8)], t))
        bodies = {m.group(1): m.group(2) for m in re.finditer(r'define internal void @"?(_tile_\w+)"?\((.*?)\n}', ir_text, re.S)}
        for tile, hint in tiles.items():
            body = bodies[f"_tile_{qtype.name.lower()}_q8s_x{tile}"]
            hints = set(re.findall(r"call void @\"?llvm\.prefetch\.p0\"?\(ptr [^,]+, i32 0, i32 (\d), i32 1\)", body))
            where = f"{t.cpu} {qtype.name} x{tile}: {hints}"
            if hint is None:
                assert not hints, where
            else:  # 'far': the first line of a chunk 8 KB past it (the chunk's other lines 64 B apart after it)
                assert hints == {hint[0]}, where
                if hint[1]:
                    assert f"i64 {ir_dot.TILE_PREFETCH_AHEAD_X86}" in body, where


# Features to switch off, per dot path, to make the host compile that path (x86's, or AArch64's plain NEON).
_PATH_OFF = {"avx2": ("avx512vnni", "avxvnni"), "generic": ("avx512vnni", "avxvnni", "avx2"), "neon": ("dotprod",)}


def extreme_values(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """raw with every row's last block at its largest values (q = 31 or 63; K scales and mins 63; IQ4's
    extreme table entries), the
    largest products the AVX2 i16 sums must hold; scales stay as they were."""
    bdt = BLOCK_DTYPES[qtype]
    raw = raw.copy()
    last = raw[:, -bdt.itemsize :].copy().reshape(-1).view(bdt)
    for field in ("qs", "qh", "ql", "scales"):
        if field in bdt.names:
            last[field] = 0x7F if (qtype == QType.Q6_K and field == "scales") else 0xFF
    if qtype in (QType.IQ4_NL, QType.IQ4_XS):
        last["qs"] = 0xF0  # table entries -127 and 113: the largest |s8| and the largest u8 (+ 128)
    raw[:, -bdt.itemsize :] = last.view(np.uint8).reshape(raw.shape[0], -1)
    return raw


@pytest.mark.parametrize("isa", ["avx2", "generic", "neon"])
def test_fallback_dot_paths(lib, isa):
    """The host CPU with its dot-product features switched off compiles the AVX2 (vpmaddubsw) and the
    portable u8 x s8 dot (plain IR), or on AArch64 the plain NEON dot (smull) instead of sdot, runs them,
    and they agree with the twin and with the host build."""
    h = host_target()
    if isa == "avx2" and not (h.is_x86 and h.has("avx2")):
        pytest.skip(f"host CPU {h.cpu} cannot run AVX2 code")
    if (isa == "neon") != h.is_aarch64:
        pytest.skip(f"the {isa} path is not one of {h.triple}'s (AArch64: tests/test_aarch64.py under qemu)")
    off = _PATH_OFF[isa]
    feats = [f for f in h.features.split(",") if f and f[1:] not in off] + [f"-{f}" for f in off]
    t = Target(h.triple, h.cpu, ",".join(feats))
    assert t.dot_isa == isa
    # matmul tile 2: tiles of 2 and 1 rows (the sizes the engine's batched steps end on), 5 rows = 2 + 2 + 1; a
    # third tile size would only add compile time (the portable dot's: ~9-13 s a K-quant or IQ4_XS type)
    specs = [KernelSpec(Op.MATVEC, q) for q in QUANT_WEIGHTS] + [KernelSpec(Op.MATMUL, q, 2) for q in QUANT_WEIGHTS]
    plib = compile_kernels(specs, cache_dir=None, target=t)
    if h.is_x86:
        asm = emit_assembly(_matvec_module(t), t)
        assert "vpdpbusd" not in asm and ("vpmaddubsw" in asm) == (isa == "avx2")
    rng = np.random.default_rng(11)
    for qtype in QUANT_WEIGHTS:
        rows, k, n = 37, 256, 5
        raw = random_raw(rng, qtype, rows, k)
        if qtype in EXTRA_TYPES:
            raw = extreme_values(raw, qtype)
        else:
            raw[:, -QK // 2 * (2 if qtype == QType.Q8_0 else 1):] = 0xFF if qtype != QType.Q8_0 else 0x80  # extremes
        m = pack_weights(raw, qtype, (rows, k))
        x = random_acts(rng, n, k)
        x[:, -QK:] = 127.0 * np.sign(rng.standard_normal(QK))  # |q| = 127 everywhere: the largest products
        acts = q8s(lib, x)
        y = np.full((n, rows), SENTINEL, np.float32)
        plib[KernelSpec(Op.MATMUL, qtype, 2).name](P(m.data), P(acts), P(y), k, 0, rows, n, rows)
        y1 = np.full(rows, SENTINEL, np.float32)
        plib[KernelSpec(Op.MATVEC, qtype).name](P(m.data), P(acts[0]), P(y1), k, 16, rows)
        y2 = np.full(rows, SENTINEL, np.float32)
        lib[KernelSpec(Op.MATVEC, qtype).name](P(m.data), P(acts[0]), P(y2), k, 16, rows)
        for c in range(n):
            bound = ref.matvec_q_q8s_bound(raw, qtype, acts[c], k)
            assert_within(y[c], ref.matvec_q_q8s(raw, qtype, acts[c], k), q_tol(qtype, k, bound), f"{isa} {qtype.name}")
        bound = ref.matvec_q_q8s_bound(raw, qtype, acts[0], k)[16:]
        assert_within(y1[16:], y2[16:], 2 * q_tol(qtype, k, bound), f"{isa} vs host")
        assert (y1[:16] == SENTINEL).all()


def test_disk_cache(tmp_path):
    specs = [KernelSpec(Op.QUANTIZE), KernelSpec(Op.MATVEC, QType.Q4_1), KernelSpec(Op.ADD)]
    first = compile_kernels(specs, cache_dir=tmp_path)
    assert not first.compiled.stats.from_cache
    key = first.compiled.stats.key
    assert ObjectCache(tmp_path).path(key).stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.o"]  # no temp files left behind

    target = host_target()
    again = compile_module(build_module(specs, target), target, ObjectCache(tmp_path))  # a fresh cache object
    assert again.stats.from_cache and again.stats.key == key
    second = compile_kernels(specs, cache_dir=tmp_path)
    assert second.compiled.stats.from_cache

    rng = np.random.default_rng(3)
    rows, k = 50, 128
    raw = random_raw(rng, QType.Q4_1, rows, k)
    m = pack_weights(raw, QType.Q4_1, (rows, k))
    x = random_acts(rng, 1, k)
    results = []
    for lb in (first, second):
        a = aligned_zeros(act_bytes(k), np.uint8)
        lb["quantize_f32_q8s"](P(x), P(a), k, 1)
        y = np.zeros(rows, np.float32)
        lb["matvec_q4_1_q8s"](P(m.data), P(a), P(y), k, 0, rows)
        results.append((a, y))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert first.address("matvec_q4_1_q8s") != second.address("matvec_q4_1_q8s")  # two loaded copies

    other = compile_kernels([KernelSpec(Op.ADD)], cache_dir=tmp_path)  # other IR: another key, compiled
    assert not other.compiled.stats.from_cache and other.compiled.stats.key != key


def test_all_specs_names_and_signatures():
    names = {s.name: s.signature for s in all_specs()}
    assert "attention_f32" not in names
    assert [a for a, _ in names["attention_f16kv"].args] == [
        "q", "kc", "vc", "out", "stats", "scratch", "t0", "t1", "n_heads", "n_kv", "hd", "ctx", "h0", "h1"]
    assert [a for a, _ in names["attention_merge"].args] == ["po", "st", "out", "n_spans", "n_heads", "hd", "h0", "h1"]
    assert names["to_f16"].args == (("x", "p"), ("out", "p"), ("n", "i"))
    for n in ("quantize_f32_q8s", "matvec_q4_0_q8s", "matvec_q4_1_q8s", "matvec_q8_0_q8s", "matvec_f32_f32",
              "matvec_f16_f32", "matmul_q4_1_q8s_x4", "embed_q8_0", "embed_f16", "rmsnorm_f32", "rope_f32",
              "silu_mul_f32", "gelu_tanh_mul_f32", "scale_f32", "add_f32", "barrier_wait", "barrier_demo"):
        assert n in names
    assert aligned_empty((3, 5), np.float32).ctypes.data % 64 == 0


# --- real weights: the Gemma 3 270M Q4_K_M file (Q5_0, Q4_K, Q6_K, Q8_0) -------------------------------

@pytest.fixture(scope="module")
def gemma_tensors(gemma3_model):
    """The real Gemma 3 270M Q4_K_M file's tensors (Q5_0, Q4_K, Q6_K, Q8_0): conftest's session model."""
    return gemma3_model.tensors


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                                  "blk.0.ffn_down.weight"])
def test_real_gemma_matrices(lib, gemma_tensors, name):
    """Matvec, a 3-row matmul and a few embedding rows of real Q5_0 / Q8_0 / Q4_K / Q6_K matrices."""
    t = gemma_tensors[name]
    rows, k = t.shape
    raw = np.asarray(t.data)
    m = pack_weights(raw, t.qtype, (rows, k))
    rng = np.random.default_rng(7)
    acts = q8s(lib, rng.standard_normal((3, k)).astype(np.float32))
    y = np.full((3, rows), SENTINEL, np.float32)
    lib[KernelSpec(Op.MATMUL, t.qtype, 3).name](P(m.data), P(acts), P(y), k, 0, rows, 3, rows)
    y1 = np.full(rows, SENTINEL, np.float32)
    lib[KernelSpec(Op.MATVEC, t.qtype).name](P(m.data), P(acts[0]), P(y1), k, 0, rows)
    for c in range(3):
        tol = q_tol(t.qtype, k, ref.matvec_q_q8s_bound(raw, t.qtype, acts[c], k))
        assert_within(y[c], ref.matvec_q_q8s(raw, t.qtype, acts[c], k), tol, f"{name} row {c}")
    np.testing.assert_array_equal(y1, y[0])  # same sums in the same order
    for token in (0, 17, rows - 1):
        out = np.zeros(k, np.float32)
        lib[KernelSpec(Op.EMBED, t.qtype).name](P(m.data), token, P(out), k)
        np.testing.assert_array_equal(out, t.rows(token, token + 1).dequantize()[0])
