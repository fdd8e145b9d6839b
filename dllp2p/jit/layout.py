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
Q5_0, Q5_1, Q4_K, Q5_K and Q6_K follow the same design: see "the 5- and 6-bit and K-quant types" below.
"""

from __future__ import annotations

from dataclasses import dataclass

import mmap

import numpy as np

from ..formats import quant as fq
from ..memlimit import MADV_DONTNEED, advise
from ..formats.quant import BLOCK_DTYPES, QK, TRAITS, QType

G = 16  # rows interleaved per group: one 512-bit vector of i32 lanes
ALIGN = 64  # bytes; every buffer built here starts on a cache line
PACKED_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K,
                QType.IQ4_NL, QType.IQ4_XS)


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


def lazy_zeros(shape, dtype) -> np.ndarray:
    """A zeroed array whose memory the OS gives page by page (4 KiB) as it is first written: an anonymous
    mapping that asks for no transparent huge pages. np.zeros of 4 MiB or more asks for them (numpy's
    madvise), and then a write anywhere in 2 MiB brings in all 2 MiB: the KV slots (engine.py), 256 KiB a
    sequence and head for SmolLM2 at 2048 positions, held 25 MiB for one 100-token prompt and 259 MiB for
    eight (2026-12-07), where their rows are 2.3 / 18 MiB (now 2.8 / 22.5 MiB). Page-aligned (64-byte too)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        m = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # as np.zeros would say it
        raise MemoryError(f"cannot map {nbytes} bytes for a {dtype} array of shape {tuple(shape)}: {e.strerror}") from e
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            m.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages
            pass
    return np.frombuffer(m, np.uint8, count=nbytes).view(dtype).reshape(shape)


def drop_pages(view: np.ndarray) -> int:
    """Give the OS back the whole pages inside `view`, a C-contiguous part of a lazy_zeros array: they read as
    zeros again and take no memory until written (MADV_DONTNEED on a private anonymous mapping). The pages
    its ends share with the values around it are kept. -> bytes given back (what was asked: pages never
    written were not held)."""
    if not view.flags.c_contiguous:
        raise ValueError("drop_pages needs a C-contiguous view")
    lo = view.ctypes.data
    start = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (lo + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return 0
    advise([(start, end - start)], MADV_DONTNEED)
    return end - start


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
    """Bytes of one packed block (32 values, or a 256-value super-block for the K-quants) of 16 rows."""
    extra = {QType.Q4_K: 4, QType.Q5_K: 4, QType.IQ4_XS: 2}.get(qtype, 0)  # scales unpacked to bytes
    return G * (TRAITS[qtype].block_bytes + extra)


PACK_SLICE_BYTES = 8 << 20  # a matrix is packed this many bytes of its ggml rows at a time (whole 16-row groups)


def pack_weights(raw: np.ndarray, qtype: QType, shape: tuple[int, int]) -> PackedMatrix:
    """ggml storage (u8[rows, row_bytes] for block types, f32/f16[rows, k] otherwise) -> PackedMatrix.

    Block types go a slice of 16-row groups at a time into the packed buffer (each group's bytes depend on its
    rows alone, so slices give the same bytes as one pass): a pass over a whole matrix held ~5 copies of it at
    once, 0.8 GB more than the engine's resident set for Gemma 3's 178 MB embedding (262k rows)."""
    rows, k = shape
    if qtype in (QType.F32, QType.F16):
        data = aligned_empty((rows, k), np.float32 if qtype == QType.F32 else np.float16)
        data[...] = np.asarray(raw).reshape(rows, k)
        return PackedMatrix(qtype, rows, k, data)
    if qtype not in PACKED_TYPES:
        raise ValueError(f"no packed layout for {qtype.name}")
    extra = qtype in EXTRA_TYPES and qtype != QType.IQ4_NL  # IQ4_NL has Q4_0's fields: packed as Q4_0
    unit = unit_values(qtype)
    if extra and k % unit:
        raise ValueError(f"{qtype.name} rows of {k} values: not whole {unit}-value blocks (a column slice of a "
                         f"{qtype.name} matrix must start and end on a multiple of {unit})")
    row_bytes = TRAITS[qtype].row_bytes(k)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, row_bytes)  # a view of the map (a column slice: a copy)
    groups, per_group = -(-rows // G), k // unit * chunk_bytes(qtype)
    step = max(1, PACK_SLICE_BYTES // (G * row_bytes))  # groups a slice
    data = aligned_empty(groups * per_group, np.uint8)
    for g0 in range(0, groups, step):
        part = raw[g0 * G: (g0 + step) * G]
        packed = _pack_extra(part, qtype, k) if extra else _pack_blocks(part, qtype, k)
        data[g0 * per_group: g0 * per_group + packed.size] = packed.reshape(-1)
    return PackedMatrix(qtype, rows, k, data)


def _pack_blocks(raw: np.ndarray, qtype: QType, k: int) -> np.ndarray:
    """Q4_0 / Q4_1 / Q8_0 / IQ4_NL ggml rows u8[rows, row_bytes] -> u8[groups, blocks, chunk_bytes]."""
    rows, nb, bdt = len(raw), k // QK, BLOCK_DTYPES[qtype]
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
    return chunks


def unpack_weights(m: PackedMatrix) -> np.ndarray:
    """The inverse of pack_weights: ggml storage u8[rows, row_bytes] (for tests; Q4_0, Q4_1, Q8_0 and
    float types only: the other types are checked through the embed kernel, which reads every value)."""
    if m.qtype in EXTRA_TYPES and m.qtype != QType.IQ4_NL:
        raise ValueError(f"no unpacking for {m.qtype.name}")
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
    (attention_f16kv reads it; to_f16 writes a new row). The engine's slots are head-major instead,
    f16[n_kv_heads, ctx, head_dim] (program.kv_head): each head is this with n_kv_heads = 1."""
    return aligned_zeros((ctx, n_kv_heads, head_dim), np.float16)


# --- the 5- and 6-bit and K-quant types ------------------------------------------------------------------
#
# Same design as above: 16-row groups, one 64-byte load = one `vpdpbusd` operand of 16 rows x 4 bytes,
# weights read front to back. The unit is ggml's block: 32 values (Q5_0, Q5_1) or a 256-value
# super-block (K-quants), whose 8 sub-blocks of 32 line up with the Q8S activation blocks. Every 32
# values of a row are stored as the 4-bit nibble lanes of Q4_0 (qs[4][16][4]: a lane's byte e of step j
# holds element 4j + e in its low nibble, 16 + 4j + e in its high nibble), plus the extra high bits in
# planes of 4 bytes per row that one more 64-byte load brings in for all 16 rows:
#
#   5-bit qh[16][4]:      bit j of byte e = bit 4 of element 4j + e, bit 4 + j = bit 4 of element 16 + 4j + e
#   6-bit qh[2][16][4]:   plane 0 for elements 0..15, plane 1 for 16..31: bits 2j, 2j+1 of byte e are
#                         bits 4, 5 of element 4j + e (plane 0) or 16 + 4j + e (plane 1)
#
# The kernel rebuilds a u8 value 0..31 or 0..63 with a shift, a mask and an or per 64 bytes, and feeds
# u8 x s8 dots like the 4-bit types (AVX2: vpmaddubsw pair sums stay < 2^15 for 6-bit values). Chunks:
#
#   Q5_0  352 B / 32 values:  qs[4][16][4] | qh[16][4] | f16 d[16]               (q - 16) * d
#   Q5_1  384 B / 32 values:  qs | qh | f16 d[16] | f16 m[16]                    q * d + m
#   Q4_K 2368 B / 256 values: f16 d[16] | f16 dmin[16] | u8 sc[8][16] | u8 m[8][16] | 8 x qs
#   Q5_K 2880 B / 256 values: f16 d[16] | f16 dmin[16] | u8 sc[8][16] | u8 m[8][16] | 8 x (qs | qh)
#   Q6_K 3360 B / 256 values: f16 d[16] | i8 sc[16][16] | 8 x (qs | qh[2])       (d * sc_s) * (q - 32)
#   IQ4_NL 288 B / 32 values: qs[4][16][4] | f16 d[16]  (Q4_0's packing)         d * IQ4_VALUES[nibble]
#   IQ4_XS 2208 B / 256 values: f16 d[16] | i8 ls[8][16] (ls_j - 32) | 8 x qs     (d * ls_j) * IQ4_VALUES[nibble]
#
# IQ4 nibbles index a 16-entry table: the kernel looks them up with one byte shuffle per 64 bytes
# (vpshufb; a select chain on the generic path).
#
# K-quant scales and mins are unpacked from ggml's 12-byte 6-bit form to one byte each at pack time (the
# kernel widens 16 at once; d * sc_j is exact in f32). Packed bytes per ggml byte: Q5_0 1.000, Q5_1 1.000,
# Q4_K 148/144 = 1.028, Q5_K 180/176 = 1.023, Q6_K 210/210 = 1.000, IQ4_NL 1.000, IQ4_XS 138/136 = 1.015
# (plus the last group's padding rows).
# Q6_K's 16-value sub-blocks are the low and high nibble halves of a 32-value block, so the kernel keeps
# two dots per block (it needs them anyway, one per scale) and no extra shuffles: see ir_matvec.py.

EXTRA_TYPES = (QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS)


def unit_values(qtype: QType) -> int:
    """Values per row in one packed chunk: 32, or 256 for the K-quants."""
    return TRAITS[qtype].block_values


def _nibble_lanes(q: np.ndarray) -> np.ndarray:
    """u8[..., 32] values -> the low 4 bits as u8[..., 4 steps, 4 bytes] (Q4_0's byte order)."""
    return ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).reshape(*q.shape[:-1], 4, 4).astype(np.uint8)


def _high_planes(q: np.ndarray, bits: int) -> np.ndarray:
    """u8[..., 32] values -> their bits above 4 as u8[..., planes, 4] (see above)."""
    top = (q >> 4).reshape(*q.shape[:-1], 2, 4, 4).astype(np.uint8)  # [..., half, step j, byte e]
    if bits == 5:
        shifts = np.arange(4, dtype=np.uint8)[:, None]
        low_half = (top[..., 0, :, :] << shifts).sum(-2, dtype=np.uint8)
        high_half = (top[..., 1, :, :] << (shifts + 4)).sum(-2, dtype=np.uint8)
        return (low_half | high_half)[..., None, :]
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (top << shifts).sum(-2, dtype=np.uint8)  # [..., half, 4]


def _fields(raw: np.ndarray, qtype: QType, rows: int, k: int) -> list[np.ndarray]:
    """ggml rows -> the chunk's fields in chunk order, each u8[rows, units, slots, width] (a slot of a
    field is laid out [16 rows][width] in the chunk)."""
    blocks, _ = fq.blocks_of(raw, qtype)
    units = k // unit_values(qtype)
    blocks = blocks.reshape(rows, units)

    def f16(name: str) -> np.ndarray:
        return np.ascontiguousarray(blocks[name]).view(np.uint8).reshape(rows, units, 1, 2)

    if qtype in (QType.Q5_0, QType.Q5_1):
        q = fq.q5_ints(blocks.reshape(-1)).reshape(rows, units, 32)
        out = [_nibble_lanes(q), _high_planes(q, 5), f16("d")]
        return out + [f16("m")] if qtype == QType.Q5_1 else out
    if qtype in (QType.Q4_K, QType.Q5_K):
        decode = fq.q4_k_ints if qtype == QType.Q4_K else fq.q5_k_ints
        q, sc, m = decode(blocks.reshape(-1))
        q = q.reshape(rows, units, 8, 32)
        lanes = [_nibble_lanes(q)]  # [rows, units, 8, 4, 4]
        if qtype == QType.Q5_K:
            lanes.append(_high_planes(q, 5))
        body = np.concatenate(lanes, axis=3).reshape(rows, units, -1, 4)
        return [f16("d"), f16("dmin"), sc.reshape(rows, units, 8, 1), m.reshape(rows, units, 8, 1), body]
    if qtype == QType.IQ4_XS:
        q, ls = fq.iq4_xs_ints(blocks.reshape(-1))
        body = _nibble_lanes(q.reshape(rows, units, 8, 32)).reshape(rows, units, -1, 4)
        return [f16("d"), ls.view(np.uint8).reshape(rows, units, 8, 1), body]
    q, sc = fq.q6_k_ints(blocks.reshape(-1))
    q = q.reshape(rows, units, 8, 32)
    body = np.concatenate([_nibble_lanes(q), _high_planes(q, 6)], axis=3).reshape(rows, units, -1, 4)
    return [f16("d"), sc.view(np.uint8).reshape(rows, units, 16, 1), body]


def _pack_extra(raw: np.ndarray, qtype: QType, k: int) -> np.ndarray:
    """The 5/6-bit, K-quant and IQ4_XS ggml rows u8[rows, row_bytes] -> u8[groups, units, chunk_bytes]."""
    padded = np.zeros((_round_up(len(raw), G), raw.shape[1]), np.uint8)  # zero rows: every scale 0, so outputs 0
    padded[:len(raw)] = raw
    parts = []
    for f in _fields(padded, qtype, len(padded), k):
        g, units, slots, width = len(padded) // G, f.shape[1], f.shape[2], f.shape[3]
        f = f.reshape(g, G, units, slots, width).transpose(0, 2, 3, 1, 4)  # [group, unit, slot, row, width]
        parts.append(f.reshape(g, units, -1))
    chunks = np.concatenate(parts, axis=-1)
    assert chunks.shape[-1] == chunk_bytes(qtype), (chunks.shape, chunk_bytes(qtype))
    return chunks
