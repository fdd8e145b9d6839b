"""Data layouts the JIT kernels read and write, built with numpy (at load time, not per token).

Activations, "Q8S" (Q8 with exact sum): a row of K f32 values (K % 32 == 0, nb = K / 32 blocks)
is stored as u8[act_bytes(K)] = u8[K + 8 * nb], three sections back to back:

    [0, K)              i8  q[K]      q = round_half_away(x / d), |q| <= 127
    [K, K + 4 nb)       f32 d[nb]     d = max|x_block| / 127
    [K + 4 nb, K + 8 nb) i32 s[nb]    s = sum of the block's 32 q values, exact

Several rows (matmul) are u8[n, act_bytes(K)].

Weights, "packed" (same bytes as ggml, reordered): rows are taken in groups of G = 16 (the last
group padded with zero rows); a group stores all its blocks in order, each block as one chunk of
16 * ggml_block_bytes bytes:

    Q4_0  288 B: u8 qs[4][16][4], f16 d[16]            value = (nibble - 8) * d
    Q4_1  320 B: u8 qs[4][16][4], f16 d[16], f16 m[16]  value = nibble * d + m
    Q8_0  544 B: u8 qs[8][16][4], f16 d[16]            value = (u - 128) * d

qs[j][r][0:4] is row r's ggml bytes qs[4j : 4j + 4]. For the 4-bit types that 4-byte lane holds
elements 4j..4j+3 in its low nibbles and 16+4j..16+4j+3 in its high nibbles; for Q8_0 it holds
elements 4j..4j+3, stored as u8 = q + 128. So one 64-byte load is one `vpdpbusd` operand covering
16 rows, and the kernel reads the weights strictly front to back. Scales stay f16 (no extra bytes;
F16C converts 16 at once). The only size cost is the padding of the last group to 16 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats.quant import BLOCK_DTYPES, QK, TRAITS, QType

G = 16  # rows interleaved per group: one 512-bit vector of i32 lanes
ALIGN = 64  # bytes; every buffer built here starts on a cache line
PACKED_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q8_0)


Q8_0_BLOCK = 34  # ggml Q8_0: f16 scale + 32 i8, the wire format of tensor-parallel partial sums


def q8_0_bytes(k: int) -> int:
    """Bytes of one Q8_0 row of k values."""
    if k % QK:
        raise ValueError(f"row length {k} is not a multiple of {QK}")
    return k // QK * Q8_0_BLOCK


CANDIDATE = np.dtype([("value", "<f4"), ("index", "<i4")])  # a top_k_f32 record: one of a node's best logits


def act_bytes(k: int) -> int:
    """Bytes of one Q8S activation row of k values."""
    if k % QK:
        raise ValueError(f"activation length {k} is not a multiple of {QK}")
    return k + 8 * (k // QK)


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + n].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    a = aligned_empty(shape, dtype)
    a[...] = 0
    return a


@dataclass(frozen=True)
class PackedMatrix:
    """A weight matrix in the packed layout above (or row-major for F32/F16).

    data: u8[n_groups * nb * chunk_bytes] for block types; f32/f16[rows, k] otherwise.
    """

    qtype: QType
    rows: int  # logical rows (the output length of a matvec)
    k: int  # values per row (the input length)
    data: np.ndarray

    @property
    def padded_rows(self) -> int:
        return _round_up(self.rows, G) if self.qtype in PACKED_TYPES else self.rows

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def chunk_bytes(qtype: QType) -> int:
    """Bytes of one packed block of 16 rows."""
    return G * TRAITS[qtype].block_bytes


def pack_weights(raw: np.ndarray, qtype: QType, shape: tuple[int, int]) -> PackedMatrix:
    """ggml storage (u8[rows, row_bytes] for block types, f32/f16[rows, k] otherwise) -> PackedMatrix."""
    rows, k = shape
    if qtype in (QType.F32, QType.F16):
        data = aligned_empty((rows, k), np.float32 if qtype == QType.F32 else np.float16)
        data[...] = np.asarray(raw).reshape(rows, k)
        return PackedMatrix(qtype, rows, k, data)
    if qtype not in PACKED_TYPES:
        raise ValueError(f"no packed layout for {qtype.name}")
    nb = k // QK
    bdt = BLOCK_DTYPES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, TRAITS[qtype].row_bytes(k))
    padded = np.zeros((_round_up(rows, G), nb), bdt)  # zero rows: every scale 0, so outputs 0
    padded[:rows] = raw.reshape(-1).view(bdt).reshape(rows, nb)
    blocks = padded.reshape(-1, G, nb).transpose(0, 2, 1)  # [group, block, row]
    qs = np.ascontiguousarray(blocks["qs"]).view(np.uint8)  # [group, block, row, 16 or 32]
    if qtype == QType.Q8_0:
        qs = qs ^ np.uint8(0x80)  # i8 q -> u8 q + 128
    steps = qs.shape[-1] // 4
    qs = qs.reshape(*qs.shape[:3], steps, 4).transpose(0, 1, 3, 2, 4)  # [group, block, step, row, 4]
    lead = qs.shape[:2]
    parts = [qs.reshape(*lead, -1), np.ascontiguousarray(blocks["d"]).view(np.uint8).reshape(*lead, -1)]
    if qtype == QType.Q4_1:
        parts.append(np.ascontiguousarray(blocks["m"]).view(np.uint8).reshape(*lead, -1))
    chunks = np.concatenate(parts, axis=-1)
    assert chunks.shape[-1] == chunk_bytes(qtype)
    data = aligned_empty(chunks.size, np.uint8)
    data[:] = chunks.reshape(-1)
    return PackedMatrix(qtype, rows, k, data)


def unpack_weights(m: PackedMatrix) -> np.ndarray:
    """The inverse of pack_weights: ggml storage u8[rows, row_bytes] (for tests)."""
    if m.qtype not in PACKED_TYPES:
        return np.asarray(m.data).copy()
    nb = m.k // QK
    bdt = BLOCK_DTYPES[m.qtype]
    steps = 4 if m.qtype != QType.Q8_0 else 8
    chunks = m.data.reshape(-1, nb, chunk_bytes(m.qtype))
    n_groups = chunks.shape[0]
    out = np.zeros((n_groups, nb, G), bdt)
    qs = chunks[..., : steps * G * 4].reshape(n_groups, nb, steps, G, 4).transpose(0, 1, 3, 2, 4)
    qs = qs.reshape(n_groups, nb, G, steps * 4)
    if m.qtype == QType.Q8_0:
        qs = qs ^ np.uint8(0x80)
    out["qs"] = qs.view(bdt["qs"].base)
    off = steps * G * 4
    out["d"] = chunks[..., off : off + 2 * G].copy().view(np.float16)
    if m.qtype == QType.Q4_1:
        out["m"] = chunks[..., off + 2 * G : off + 4 * G].copy().view(np.float16)
    rows = out.transpose(0, 2, 1).reshape(-1, nb)[: m.rows]
    return np.ascontiguousarray(rows).view(np.uint8).reshape(m.rows, -1)


def rope_table(ctx: int, rope_dim: int, base: float) -> np.ndarray:
    """f32[ctx, rope_dim / 2, 2]: (cos, sin) of pos * base^(-2i / rope_dim), computed in f64."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    angle = np.arange(ctx, dtype=np.float64)[:, None] * base ** (-2.0 * i / rope_dim)[None, :]
    out = aligned_empty((ctx, rope_dim // 2, 2), np.float32)
    out[..., 0] = np.cos(angle)
    out[..., 1] = np.sin(angle)
    return out


def kv_cache(ctx: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """f16[ctx, n_kv_heads, head_dim], zeroed: K or V for every position, one token's row contiguous
    (attention_f16kv reads it; to_f16 writes a new row)."""
    return aligned_zeros((ctx, n_kv_heads, head_dim), np.float16)
