"""ggml block quantization layouts in numpy: the slow, obvious twins of every quantized kernel.

A block format stores a row of K values as K/32 blocks. Layouts are bit-exact with ggml:

    Q4_0  18 bytes: f16 d,          u8 qs[16]   value = (nibble - 8) * d
    Q4_1  20 bytes: f16 d, f16 m,   u8 qs[16]   value = nibble * d + m
    Q8_0  34 bytes: f16 d,          i8 qs[32]   value = q * d

In a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high nibble.
Raw tensors travel as uint8 arrays of shape (rows, K / 32 * block_bytes); the functions here take
and return that form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

QK = 32  # values per block, every block format here


class QType(enum.IntEnum):
    """Tensor element types, numbered as ggml numbers them (the GGUF on-disk type ids)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    BF16 = 30


BLOCK_DTYPES: dict[QType, np.dtype] = {
    QType.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))]),
    QType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (QK // 2,))]),
    QType.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", (QK,))]),
}


@dataclass(frozen=True)
class TypeTraits:
    block_values: int  # values per block (1 for plain float types)
    block_bytes: int  # bytes per block

    def row_bytes(self, k: int) -> int:
        if k % self.block_values:
            raise ValueError(f"row length {k} is not a multiple of the block size {self.block_values}")
        return k // self.block_values * self.block_bytes


TRAITS: dict[QType, TypeTraits] = {
    QType.F32: TypeTraits(1, 4),
    QType.F16: TypeTraits(1, 2),
    QType.BF16: TypeTraits(1, 2),
    QType.Q4_0: TypeTraits(QK, BLOCK_DTYPES[QType.Q4_0].itemsize),
    QType.Q4_1: TypeTraits(QK, BLOCK_DTYPES[QType.Q4_1].itemsize),
    QType.Q8_0: TypeTraits(QK, BLOCK_DTYPES[QType.Q8_0].itemsize),
}


def _as_blocks(x: np.ndarray) -> np.ndarray:
    """f32[..., K] -> f32[n_blocks, 32], with K checked."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {QK}")
    return x.reshape(-1, QK)


def _blocks_out(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Structured blocks -> u8[..., K / 32 * block_bytes]."""
    per_row = shape[-1] // QK * blocks.dtype.itemsize
    return blocks.view(np.uint8).reshape(*shape[:-1], per_row)


def _blocks_in(raw: np.ndarray, qtype: QType) -> tuple[np.ndarray, tuple[int, ...]]:
    """u8[..., row_bytes] -> (structured blocks[n], value shape)."""
    bdt = BLOCK_DTYPES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % bdt.itemsize:
        raise ValueError(f"{raw.shape[-1]} bytes per row is not a whole number of {qtype.name} blocks")
    n_per_row = raw.shape[-1] // bdt.itemsize
    return raw.reshape(-1).view(bdt), (*raw.shape[:-1], n_per_row * QK)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """u8[n, 32] in 0..15 -> u8[n, 16]: element j low, element j + 16 high."""
    return (q[:, : QK // 2] | (q[:, QK // 2 :] << 4)).astype(np.uint8)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[n, 16] -> u8[n, 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    imax = np.abs(b).argmax(axis=1)
    vmax = b[np.arange(len(b)), imax]
    d = (vmax / np.float32(-8)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.trunc(b * inv[:, None] + np.float32(8.5)), 15).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q4_0])
    out["d"] = d.astype(np.float16)
    out["qs"] = _pack_nibbles(q)
    return _blocks_out(out, np.shape(x))


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.trunc((b - lo[:, None]) * inv[:, None] + np.float32(0.5)), 15).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q4_1])
    out["d"] = d.astype(np.float16)
    out["m"] = lo.astype(np.float16)
    out["qs"] = _pack_nibbles(q)
    return _blocks_out(out, np.shape(x))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q8_0])
    out["d"] = d.astype(np.float16)
    out["qs"] = _round_away(b * inv[:, None]).astype(np.int8)
    return _blocks_out(out, np.shape(x))


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks, shape = _blocks_in(raw, QType.Q4_0)
    q = _unpack_nibbles(blocks["qs"]).astype(np.float32) - np.float32(8)
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks, shape = _blocks_in(raw, QType.Q4_1)
    q = _unpack_nibbles(blocks["qs"]).astype(np.float32)
    d = blocks["d"].astype(np.float32)[:, None]
    m = blocks["m"].astype(np.float32)[:, None]
    return (q * d + m).reshape(shape)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks, shape = _blocks_in(raw, QType.Q8_0)
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def dequantize(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Any supported tensor's raw storage -> f32 of the given logical shape (rows..., K)."""
    if qtype == QType.F32:
        out = np.asarray(raw).view(np.float32)
    elif qtype == QType.F16:
        out = np.asarray(raw).view(np.float16).astype(np.float32)
    elif qtype == QType.BF16:
        bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
        out = bits.view(np.float32)
    elif qtype == QType.Q4_0:
        out = dequantize_q4_0(raw)
    elif qtype == QType.Q4_1:
        out = dequantize_q4_1(raw)
    elif qtype == QType.Q8_0:
        out = dequantize_q8_0(raw)
    else:  # pragma: no cover - QType is closed
        raise ValueError(f"no dequantizer for {qtype!r}")
    return np.asarray(out, dtype=np.float32).reshape(shape)


def quantize(x: np.ndarray, qtype: QType) -> np.ndarray:
    """f32[..., K] -> raw storage (u8 blocks for block types, f16/bf16/f32 arrays otherwise)."""
    if qtype == QType.F32:
        return np.asarray(x, dtype=np.float32)
    if qtype == QType.F16:
        return np.asarray(x, dtype=np.float32).astype(np.float16)
    if qtype == QType.BF16:
        bits = np.asarray(x, dtype=np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))  # round to nearest even
        return (rounded >> 16).astype(np.uint16)
    return {QType.Q4_0: quantize_q4_0, QType.Q4_1: quantize_q4_1, QType.Q8_0: quantize_q8_0}[qtype](x)
