"""numpy block quantization vs the gguf package's own quantize/dequantize: bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from dllp2p.formats import quant
from dllp2p.formats.quant import QType

BLOCK_TYPES = [(QType.Q4_0, G.Q4_0), (QType.Q4_1, G.Q4_1), (QType.Q8_0, G.Q8_0)]


def _inputs(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    zeros = np.zeros((2, 64), np.float32)  # a zero scale must not divide by zero
    ties = (np.arange(64, dtype=np.float32) - 32).reshape(2, 32) / 4  # exact halves stress rounding
    const = np.full((1, 32), 3.25, np.float32)  # max == min for Q4_1
    wide = (rng.standard_normal((3, 128)) * 1e3).astype(np.float32)
    tiny = (rng.standard_normal((3, 32)) * 1e-6).astype(np.float32)
    return [x, zeros, ties, const, wide, tiny]


@pytest.mark.parametrize("ours,theirs", BLOCK_TYPES, ids=lambda t: getattr(t, "name", str(t)))
@pytest.mark.parametrize("seed", range(3))
def test_quantize_bit_exact_with_gguf(ours, theirs, seed):
    for x in _inputs(seed):
        mine = quant.quantize(x, ours)
        ref = gq.quantize(x, theirs)
        assert mine.dtype == np.uint8 and mine.shape == ref.shape
        np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("ours,theirs", BLOCK_TYPES, ids=lambda t: getattr(t, "name", str(t)))
def test_dequantize_bit_exact_with_gguf(ours, theirs):
    rng = np.random.default_rng(11)
    raw = gq.quantize(rng.standard_normal((5, 160)).astype(np.float32), theirs)
    np.testing.assert_array_equal(quant.dequantize(raw, ours, (5, 160)), gq.dequantize(raw, theirs))


@pytest.mark.parametrize("qtype,max_err", [(QType.Q4_0, 0.15), (QType.Q4_1, 0.08), (QType.Q8_0, 0.01)])
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
