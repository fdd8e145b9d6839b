"""numpy block quantization vs the gguf package's own quantize/dequantize: bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dllp2p.formats import quant
from dllp2p.formats.quant import QType

BLOCK_TYPES = [(QType.Q4_0, G.Q4_0), (QType.Q4_1, G.Q4_1), (QType.Q5_0, G.Q5_0), (QType.Q5_1, G.Q5_1),
               (QType.Q8_0, G.Q8_0)]  # those with a quantizer in gguf.quants
ALL_BLOCK_TYPES = [*BLOCK_TYPES, (QType.Q4_K, G.Q4_K), (QType.Q5_K, G.Q5_K), (QType.Q6_K, G.Q6_K),
                   (QType.IQ4_NL, G.IQ4_NL), (QType.IQ4_XS, G.IQ4_XS)]
K_TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS]  # our own quantizers
ids = lambda t: getattr(t, "name", str(t))  # noqa: E731


def _inputs(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    zeros = np.zeros((2, 64), np.float32)  # a zero scale must not divide by zero
    ties = (np.arange(64, dtype=np.float32) - 32).reshape(2, 32) / 4  # exact halves stress rounding
    const = np.full((1, 32), 3.25, np.float32)  # max == min for Q4_1
    wide = (rng.standard_normal((3, 128)) * 1e3).astype(np.float32)
    tiny = (rng.standard_normal((3, 32)) * 1e-6).astype(np.float32)
    return [x, zeros, ties, const, wide, tiny]


@pytest.mark.parametrize("ours,theirs", BLOCK_TYPES, ids=ids)
@pytest.mark.parametrize("seed", range(3))
def test_quantize_bit_exact_with_gguf(ours, theirs, seed):
    for x in _inputs(seed):
        mine = quant.quantize(x, ours)
        ref = gq.quantize(x, theirs)
        assert mine.dtype == np.uint8 and mine.shape == ref.shape
        np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("ours,theirs", BLOCK_TYPES, ids=ids)
def test_dequantize_bit_exact_with_gguf(ours, theirs):
    rng = np.random.default_rng(11)
    raw = gq.quantize(rng.standard_normal((5, 160)).astype(np.float32), theirs)
    np.testing.assert_array_equal(quant.dequantize(raw, ours, (5, 160)), gq.dequantize(raw, theirs))


@pytest.mark.parametrize("qtype,max_err", [(QType.Q4_0, 0.15), (QType.Q4_1, 0.08), (QType.Q5_0, 0.07), (QType.Q5_1, 0.04),
                                           (QType.Q8_0, 0.01), (QType.Q4_K, 0.08), (QType.Q5_K, 0.04), (QType.Q6_K, 0.04),
                                           (QType.IQ4_NL, 0.13), (QType.IQ4_XS, 0.15)])
def test_round_trip_error_is_bounded(qtype, max_err):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (4, 256)).astype(np.float32)
    back = quant.dequantize(quant.quantize(x, qtype), qtype, x.shape)
    assert np.abs(back - x).max() < max_err


def test_float_types_round_trip():
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(quant.dequantize(quant.quantize(x, QType.F32), QType.F32, x.shape), x)
    np.testing.assert_array_equal(
        quant.dequantize(quant.quantize(x, QType.F16), QType.F16, x.shape), x.astype(np.float16).astype(np.float32)
    )
    bf = quant.dequantize(quant.quantize(x, QType.BF16), QType.BF16, x.shape)
    np.testing.assert_allclose(bf, x, rtol=2**-8)
    ref = gq.dequantize(gq.quantize(x, G.BF16), G.BF16)
    np.testing.assert_array_equal(bf, ref)


def test_bad_row_length_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.zeros(33, np.float32), QType.Q8_0)


def _random_blocks(qtype: QType, n_blocks: int, seed: int) -> np.ndarray:
    """u8[n_blocks, block_bytes]: random bytes with every f16 scale field set to a finite value (random
    bytes there could be inf/NaN, which compare unequal to themselves)."""
    rng = np.random.default_rng(seed)
    bdt = quant.BLOCK_DTYPES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, bdt.itemsize), dtype=np.uint8).reshape(-1).view(bdt)
    for field in ("d", "m", "dmin"):
        if field in bdt.names:
            blocks[field] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
    return blocks.view(np.uint8).reshape(n_blocks, bdt.itemsize)


@pytest.mark.parametrize("ours,theirs", ALL_BLOCK_TYPES, ids=ids)
@pytest.mark.parametrize("seed", range(2))
def test_dequantize_random_bytes_bit_exact_with_gguf(ours, theirs, seed):
    """Every bit pattern of the quant fields, not just what a quantizer emits (6-bit K scales, signs)."""
    n_per_row = 3
    raw = _random_blocks(ours, 4 * n_per_row, seed).reshape(4, -1)
    k = n_per_row * quant.TRAITS[ours].block_values
    np.testing.assert_array_equal(quant.dequantize(raw, ours, (4, k)), gq.dequantize(raw, theirs))


@pytest.mark.parametrize("qtype", K_TYPES, ids=ids)
@pytest.mark.parametrize("seed", range(3))
def test_k_quantizer_output_dequantizes_as_gguf_reads_it(qtype, seed):
    """Our K- and IQ4 quantizers are our own (the gguf package has none); what they write must mean the
    same to gguf's dequantizer, and stay close to the input."""
    for x in _inputs(seed):
        if x.shape[-1] % 256:
            x = np.tile(x, (1, 256 // np.gcd(x.shape[-1], 256)))
        raw = quant.quantize(x, qtype)
        t = quant.TRAITS[qtype]
        assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // t.block_values * t.block_bytes)
        back = quant.dequantize(raw, qtype, x.shape)
        np.testing.assert_array_equal(back, gq.dequantize(raw, G(int(qtype))))
        assert np.all(np.isfinite(back))
        spread = np.abs(x).max(axis=-1, keepdims=True)
        if spread.min() > 1e-3:  # below, d / 63 underflows f16 (as in ggml): only finiteness is promised
            assert np.all(np.abs(back - x) <= 0.13 * spread)  # a few percent of the row's range


def test_k_scale_min_round_trip():
    rng = np.random.default_rng(3)
    sc, m = rng.integers(0, 64, (2, 50, 8), dtype=np.uint8)
    got = quant.k_scale_min(quant.k_scale_min_bytes(sc, m))
    np.testing.assert_array_equal(got[0], sc)
    np.testing.assert_array_equal(got[1], m)


def test_traits_match_gguf():
    from gguf import GGML_QUANT_SIZES

    for ours, theirs in ALL_BLOCK_TYPES:
        t = quant.TRAITS[ours]
        assert int(ours) == int(theirs)
        assert (t.block_values, t.block_bytes) == GGML_QUANT_SIZES[theirs]
    assert [q for q in QType if quant.is_block_type(q)] == [q for q, _ in sorted(ALL_BLOCK_TYPES)]


def test_bad_k_row_length_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.quantize(np.zeros((2, 640), np.float32), QType.Q4_K)


@pytest.fixture(scope="module")
def gemma_tensors(gemma3_model):
    """The real Gemma 3 270M Q4_K_M file's tensors (Q5_0, Q4_K, Q6_K, Q8_0): conftest's session model."""
    return gemma3_model.tensors


def test_dequantize_real_tensors_bit_exact_with_gguf(gemma_tensors):
    seen = set()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.0.ffn_down.weight", "blk.3.ffn_down.weight", "blk.5.ffn_gate.weight"):
        t = gemma_tensors[name]
        seen.add(t.qtype)
        np.testing.assert_array_equal(t.dequantize(), gq.dequantize(np.asarray(t.data), G(int(t.qtype))), err_msg=name)
    assert {QType.Q5_0, QType.Q4_K, QType.Q6_K, QType.Q8_0} <= seen
    embd = gemma_tensors["token_embd.weight"].rows(1000, 1100)
    np.testing.assert_array_equal(embd.dequantize(), gq.dequantize(np.asarray(embd.data), G.Q8_0))


def test_columns_keep_k_super_blocks(gemma_tensors):
    t = gemma_tensors["blk.0.ffn_down.weight"]  # Q6_K (640, 2048)
    assert t.qtype == QType.Q6_K
    half = t.columns(1024, 2048)
    np.testing.assert_array_equal(half.dequantize(), t.dequantize()[:, 1024:])
    with pytest.raises(ValueError, match="cut Q6_K blocks of 256"):
        t.columns(0, 1024 + 32)
