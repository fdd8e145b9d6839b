"""ggml block quantization layouts in numpy: the slow, obvious twins of every quantized kernel.

A block format stores a row of K values as K / block_values blocks. Layouts are bit-exact with ggml
(all multi-byte fields little-endian):

    type   values bytes  fields                                          value
    Q4_0    32     18    f16 d, u8 qs[16]                                (nibble - 8) * d
    Q4_1    32     20    f16 d, f16 m, u8 qs[16]                         nibble * d + m
    Q5_0    32     22    f16 d, u8 qh[4], u8 qs[16]                      (q5 - 16) * d
    Q5_1    32     24    f16 d, f16 m, u8 qh[4], u8 qs[16]               q5 * d + m
    Q8_0    32     34    f16 d, i8 qs[32]                                q * d
    Q4_K   256    144    f16 d, f16 dmin, u8 scales[12], u8 qs[128]      (d * sc_j) * q4 - dmin * m_j
    Q5_K   256    176    f16 d, f16 dmin, u8 scales[12], u8 qh[32],      (d * sc_j) * q5 - dmin * m_j
                         u8 qs[128]
    Q6_K   256    210    u8 ql[128], u8 qh[64], i8 scales[16], f16 d     (d * sc_s) * (q6 - 32)
    IQ4_NL  32     18    f16 d, u8 qs[16]                                d * IQ4_VALUES[nibble]
    IQ4_XS 256    136    f16 d, u16 scales_h, u8 scales_l[4], u8 qs[128] (d * (ls_j - 32)) * IQ4_VALUES[nibble]

32-value blocks: byte j of qs holds element j in its low nibble and element j + 16 in its high nibble;
the 5th bit of element j is bit j of qh read as a little-endian u32.

K-quants ("super-blocks" of 256): Q4_K / Q5_K split a super-block into 8 sub-blocks j of 32 values with
6-bit scale sc_j and 6-bit min m_j, packed in 12 bytes (k_scale_min); qs byte 32c + l holds element l of
sub-block 2c in its low nibble and of sub-block 2c + 1 in its high nibble; Q5_K's 5th bit of element l
of sub-block j is bit j of qh[l]. Q6_K has 16 sub-blocks s of 16 values with i8 scales sc_s; in each
half h (128 values) element 32t + l (t < 4, l < 32) takes its low 4 bits from ql[64h + l + 32 (t & 1)]
(low nibble for t < 2, high for t >= 2) and its top 2 bits from bits 2t..2t+1 of qh[32h + l].

IQ4_NL's nibbles index a fixed table of 16 int8 values (IQ4_VALUES), in Q4_0's byte order. IQ4_XS has 8
sub-blocks j of 32 values, each in Q4_0's byte order in qs[16j : 16j + 16], with a 6-bit scale ls_j: low
4 bits in scales_l[j // 2] (low nibble for even j), high 2 bits at bits 2j of scales_h.

Raw tensors travel as uint8 arrays of shape (rows, K / block_values * block_bytes); the functions here
take and return that form. The `*_ints` decoders return the integer form (q values and scales) that
dequantization, the JIT packing (jit/layout.py) and the kernels' numpy twins (jit/reference.py) share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

QK = 32  # values per block of the 32-value formats, and per activation block (Q8S)
QK_K = 256  # values per K-quant super-block


class QType(enum.IntEnum):
    """Tensor element types, numbered as ggml numbers them (the GGUF on-disk type ids)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    IQ4_XS = 23
    BF16 = 30


FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
K_QUANTS = (QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS)  # 256-value super-blocks
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def is_block_type(qtype: QType) -> bool:
    """Any block-quantized type (every non-float type): its products take 8-bit quantized activations."""
    return qtype not in FLOAT_TYPES


BLOCK_DTYPES: dict[QType, np.dtype] = {
    QType.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))]),
    QType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (QK // 2,))]),
    QType.Q5_0: np.dtype([("d", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (QK // 2,))]),
    QType.Q5_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (QK // 2,))]),
    QType.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", (QK,))]),
    QType.Q4_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK_K // 2,))]),
    QType.Q5_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (QK_K // 8,)),
                          ("qs", "u1", (QK_K // 2,))]),
    QType.Q6_K: np.dtype([("ql", "u1", (QK_K // 2,)), ("qh", "u1", (QK_K // 4,)), ("scales", "i1", (QK_K // 16,)),
                          ("d", "<f2")]),
    QType.IQ4_NL: np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))]),
    QType.IQ4_XS: np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", (4,)), ("qs", "u1", (QK_K // 2,))]),
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
    **{q: TypeTraits(QK_K if q in K_QUANTS else QK, dt.itemsize) for q, dt in BLOCK_DTYPES.items()},
}


def _as_blocks(x: np.ndarray, n: int = QK) -> np.ndarray:
    """f32[..., K] -> f32[n_blocks, n], with K checked."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % n:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {n}")
    return x.reshape(-1, n)


def _blocks_out(blocks: np.ndarray, shape: tuple[int, ...], n: int = QK) -> np.ndarray:
    """Structured blocks -> u8[..., K / n * block_bytes]."""
    per_row = shape[-1] // n * blocks.dtype.itemsize
    return blocks.view(np.uint8).reshape(*shape[:-1], per_row)


def blocks_of(raw: np.ndarray, qtype: QType) -> tuple[np.ndarray, tuple[int, ...]]:
    """u8[..., row_bytes] -> (structured blocks[n], value shape)."""
    bdt = BLOCK_DTYPES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % bdt.itemsize:
        raise ValueError(f"{raw.shape[-1]} bytes per row is not a whole number of {qtype.name} blocks")
    n_per_row = raw.shape[-1] // bdt.itemsize
    return raw.reshape(-1).view(bdt), (*raw.shape[:-1], n_per_row * TRAITS[qtype].block_values)



def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """u8[n, 32] in 0..15 -> u8[n, 16]: element j low, element j + 16 high."""
    return (q[:, : QK // 2] | (q[:, QK // 2 :] << 4)).astype(np.uint8)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[n, 16] -> u8[n, 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d in f32, 0 where d is 0."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


# --- integer forms ----------------------------------------------------------------------------------------

def q5_ints(blocks: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 blocks[n] -> u8[n, 32], q5 in 0..31."""
    high = np.unpackbits(blocks["qh"], axis=-1, bitorder="little")  # bit j of the u32 = element j
    return _unpack_nibbles(blocks["qs"]) | (high << 4)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """u8[n, 12] -> (sc u8[n, 8], m u8[n, 8]), 6 bits each: j < 4 in the low 6 bits of bytes j, j + 4;
    j >= 4 as 4 low bits in byte j + 4 (sc low nibble, m high) and 2 high bits in bytes j - 4, j."""
    s = scales.astype(np.uint8)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def k_scale_min_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The inverse of k_scale_min: (sc, m) u8[n, 8] in 0..63 -> u8[n, 12]."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K qs u8[n, 128] -> low 4 bits u8[n, 8, 32] (sub-block, element)."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 15).reshape(-1, 8, 32)


def _k4_nibble_bytes(q: np.ndarray) -> np.ndarray:
    """The inverse of _k4_nibbles: u8[n, 8, 32] in 0..15 -> u8[n, 128]."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


def q4_k_ints(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks[n] -> (q u8[n, 8, 32] in 0..15, sc u8[n, 8], m u8[n, 8])."""
    sc, m = k_scale_min(blocks["scales"])
    return _k4_nibbles(blocks["qs"]), sc, m


def q5_k_ints(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_K blocks[n] -> (q u8[n, 8, 32] in 0..31, sc u8[n, 8], m u8[n, 8])."""
    sc, m = k_scale_min(blocks["scales"])
    high = (blocks["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, sub-block, l]
    return _k4_nibbles(blocks["qs"]) | (high << 4), sc, m


def q6_k_ints(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks[n] -> (q u8[n, 256] in 0..63 (value q - 32), sc i8[n, 16])."""
    ql = blocks["ql"].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 15).reshape(-1, 2, 4, 32)  # [n, half, t, l]
    qh = blocks["qh"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ql | ((qh & 3) << 4)
    return q.reshape(-1, QK_K).astype(np.uint8), blocks["scales"].astype(np.int8)


def iq4_xs_ints(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_XS blocks[n] -> (table index u8[n, 8, 32] in 0..15, ls - 32 i8[n, 8])."""
    j = np.arange(8)
    low = (blocks["scales_l"][:, j // 2] >> (4 * (j % 2)).astype(np.uint8)) & 15
    high = (blocks["scales_h"][:, None] >> (2 * j).astype(np.uint16)) & 3
    ls = low.astype(np.int16) | (high.astype(np.int16) << 4)
    q = _unpack_nibbles(blocks["qs"].reshape(-1, 16)).reshape(-1, 8, 32)
    return q, (ls - 32).astype(np.int8)


def _q6_k_bytes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of q6_k_ints' q: u8[n, 256] in 0..63 -> (ql u8[n, 128], qh u8[n, 64])."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    low, top = q & 15, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


# --- quantizers -------------------------------------------------------------------------------------------

def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    imax = np.abs(b).argmax(axis=1)
    vmax = b[np.arange(len(b)), imax]
    d = (vmax / np.float32(-8)).astype(np.float32)
    q = np.minimum(np.trunc(b * _inverse(d)[:, None] + np.float32(8.5)), 15).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q4_0])
    out["d"] = d.astype(np.float16)
    out["qs"] = _pack_nibbles(q)
    return _blocks_out(out, np.shape(x))


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    q = np.minimum(np.trunc((b - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)), 15).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q4_1])
    out["d"] = d.astype(np.float16)
    out["m"] = lo.astype(np.float16)
    out["qs"] = _pack_nibbles(q)
    return _blocks_out(out, np.shape(x))


def _q5_fields(out: np.ndarray, q: np.ndarray) -> None:
    """q u8[n, 32] in 0..31 -> out's qs and qh."""
    out["qs"] = _pack_nibbles(q & 15)
    out["qh"] = np.packbits(q >> 4, axis=-1, bitorder="little")


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """As ggml: d = (value of largest magnitude) / -16, q = trunc(x / d + 16.5) capped at 31."""
    b = _as_blocks(x)
    imax = np.abs(b).argmax(axis=1)
    d = (b[np.arange(len(b)), imax] / np.float32(-16)).astype(np.float32)
    q = np.minimum(np.trunc(b * _inverse(d)[:, None] + np.float32(16.5)), 31).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q5_0])
    out["d"] = d.astype(np.float16)
    _q5_fields(out, q)
    return _blocks_out(out, np.shape(x))


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """As ggml: d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5) capped at 31."""
    b = _as_blocks(x)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / np.float32(31)).astype(np.float32)
    q = np.minimum(np.trunc((b - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)), 31).astype(np.uint8)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q5_1])
    out["d"] = d.astype(np.float16)
    out["m"] = lo.astype(np.float16)
    _q5_fields(out, q)
    return _blocks_out(out, np.shape(x))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    b = _as_blocks(x)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    out = np.empty(len(b), BLOCK_DTYPES[QType.Q8_0])
    out["d"] = d.astype(np.float16)
    out["qs"] = _round_away(b * _inverse(d)[:, None]).astype(np.int8)
    return _blocks_out(out, np.shape(x))


def _quantize_k_min(x: np.ndarray, qtype: QType) -> np.ndarray:
    """Q4_K / Q5_K by a simple min/max rule (not llama.cpp's iterative search; the gguf package has no
    K-quantizer to match): per sub-block j, scale_j = (max - min') / L and min_j = -min' with
    min' = min(0, min) and L = 15 or 31; d = max_j scale_j / 63, dmin = max_j min_j / 63 (stored f16);
    sc_j = round(scale_j / d), m_j = round(min_j / dmin) (6 bits); q = round((x + dmin m_j) / (d sc_j))
    clipped to 0..L. Good enough for random-weight test models; every block dequantizes as ggml's."""
    levels = 15 if qtype == QType.Q4_K else 31
    sub = _as_blocks(x, QK_K).reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0)
    scale = ((sub.max(axis=2) - lo) / np.float32(levels)).astype(np.float32)
    mins = -lo
    d = (scale.max(axis=1) / np.float32(63)).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=1) / np.float32(63)).astype(np.float16).astype(np.float32)
    sc = np.clip(_round_away(scale * _inverse(d)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(_round_away(mins * _inverse(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc).astype(np.float32)
    offset = (dmin[:, None] * m).astype(np.float32)
    q = np.clip(_round_away((sub + offset[..., None]) * _inverse(step)[..., None]), 0, levels).astype(np.uint8)
    out = np.empty(len(sub), BLOCK_DTYPES[qtype])
    out["d"], out["dmin"] = d.astype(np.float16), dmin.astype(np.float16)
    out["scales"] = k_scale_min_bytes(sc, m)
    out["qs"] = _k4_nibble_bytes(q & 15)
    if qtype == QType.Q5_K:
        out["qh"] = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return _blocks_out(out, np.shape(x), QK_K)


def _nearest_iq4(v: np.ndarray) -> np.ndarray:
    """f32 values (in table units) -> u8 index of the nearest IQ4_VALUES entry."""
    return np.abs(v[..., None] - IQ4_VALUES.astype(np.float32)).argmin(axis=-1).astype(np.uint8)


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """A simple rule (not llama.cpp's search; gguf.quants has no IQ4 quantizer): d = (value of largest
    magnitude) / -127, each value the nearest table entry of x / d."""
    b = _as_blocks(x)
    d = (b[np.arange(len(b)), np.abs(b).argmax(axis=1)] / np.float32(-127)).astype(np.float16)
    q = _nearest_iq4(b * _inverse(d.astype(np.float32))[:, None])
    out = np.empty(len(b), BLOCK_DTYPES[QType.IQ4_NL])
    out["d"], out["qs"] = d, _pack_nibbles(q)
    return _blocks_out(out, np.shape(x))


def quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    """A simple rule: per sub-block j, scale_j = (value of largest magnitude) / -127; d = (scale of largest
    magnitude) / -32 (f16), ls_j - 32 = round(scale_j / d) in -32..31; values the nearest table entries."""
    sub = _as_blocks(x, QK_K).reshape(-1, 8, 32)
    n = len(sub)
    scale = (np.take_along_axis(sub, np.abs(sub).argmax(axis=2)[..., None], axis=2)[..., 0] / np.float32(-127))
    top = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = (top / np.float32(-32)).astype(np.float16).astype(np.float32)
    ls = np.clip(_round_away(scale * _inverse(d)[:, None]), -32, 31).astype(np.int16)
    step = (d[:, None] * ls).astype(np.float32)
    q = _nearest_iq4(sub * _inverse(step)[..., None])
    u = (ls + 32).astype(np.uint16)
    out = np.empty(n, BLOCK_DTYPES[QType.IQ4_XS])
    out["d"] = d.astype(np.float16)
    out["scales_h"] = ((u >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    low = (u & 15).astype(np.uint8)
    out["scales_l"] = low[:, 0::2] | (low[:, 1::2] << 4)
    out["qs"] = _pack_nibbles(q.reshape(-1, 32)).reshape(n, 128)
    return _blocks_out(out, np.shape(x), QK_K)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    return _quantize_k_min(x, QType.Q4_K)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    return _quantize_k_min(x, QType.Q5_K)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K by a simple rule (not llama.cpp's search): per sub-block s of 16, scale_s = (value of largest
    magnitude) / -32; d = (scale of largest magnitude) / -128 (stored f16), sc_s = round(scale_s / d)
    capped to -128..127; q = round(x / (d sc_s)) + 32 clipped to 0..63."""
    sub = _as_blocks(x, QK_K).reshape(-1, 16, 16)
    n = len(sub)
    big = np.take_along_axis(sub, np.abs(sub).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = (big / np.float32(-32)).astype(np.float32)
    top = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = (top / np.float32(-128)).astype(np.float16).astype(np.float32)
    sc = np.clip(_round_away(scale * _inverse(d)[:, None]), -128, 127).astype(np.int8)
    step = (d[:, None] * sc).astype(np.float32)
    q = np.clip(_round_away(sub * _inverse(step)[..., None]) + 32, 0, 63).astype(np.uint8)
    out = np.empty(n, BLOCK_DTYPES[QType.Q6_K])
    out["ql"], out["qh"] = _q6_k_bytes(q.reshape(n, QK_K))
    out["scales"] = sc
    out["d"] = d.astype(np.float16)
    return _blocks_out(out, np.shape(x), QK_K)


# --- dequantizers (the operation order of gguf.quants, so results are bit-identical) -------------------------

def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q4_0)
    q = _unpack_nibbles(blocks["qs"]).astype(np.float32) - np.float32(8)
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q4_1)
    q = _unpack_nibbles(blocks["qs"]).astype(np.float32)
    d = blocks["d"].astype(np.float32)[:, None]
    m = blocks["m"].astype(np.float32)[:, None]
    return (q * d + m).reshape(shape)


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q5_0)
    q = q5_ints(blocks).astype(np.float32) - np.float32(16)
    return (blocks["d"].astype(np.float32)[:, None] * q).reshape(shape)


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q5_1)
    q = q5_ints(blocks).astype(np.float32)
    return (blocks["d"].astype(np.float32)[:, None] * q + blocks["m"].astype(np.float32)[:, None]).reshape(shape)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q8_0)
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def dequantize_q4_k(raw: np.ndarray, qtype: QType = QType.Q4_K) -> np.ndarray:
    blocks, shape = blocks_of(raw, qtype)
    q, sc, m = (q4_k_ints if qtype == QType.Q4_K else q5_k_ints)(blocks)
    step = blocks["d"].astype(np.float32)[:, None] * sc.astype(np.float32)  # exact: 11 x 6 bits
    offset = blocks["dmin"].astype(np.float32)[:, None] * m.astype(np.float32)
    return (step[..., None] * q.astype(np.float32) - offset[..., None]).reshape(shape)


def dequantize_q5_k(raw: np.ndarray) -> np.ndarray:
    return dequantize_q4_k(raw, QType.Q5_K)


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.Q6_K)
    q, sc = q6_k_ints(blocks)
    step = blocks["d"].astype(np.float32)[:, None] * sc.astype(np.float32)  # exact: 11 x 8 bits
    values = (q.astype(np.int8) - np.int8(32)).astype(np.float32).reshape(-1, 16, 16)
    return (step[..., None] * values).reshape(shape)


def dequantize_iq4_nl(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.IQ4_NL)
    values = IQ4_VALUES[_unpack_nibbles(blocks["qs"])].astype(np.float32)
    return (blocks["d"].astype(np.float32)[:, None] * values).reshape(shape)


def dequantize_iq4_xs(raw: np.ndarray) -> np.ndarray:
    blocks, shape = blocks_of(raw, QType.IQ4_XS)
    q, ls = iq4_xs_ints(blocks)
    step = blocks["d"].astype(np.float32)[:, None] * ls.astype(np.float32)  # exact: 11 x 6 bits
    return (step[..., None] * IQ4_VALUES[q].astype(np.float32)).reshape(shape)


_DEQUANTIZE = {
    QType.Q4_0: dequantize_q4_0, QType.Q4_1: dequantize_q4_1, QType.Q5_0: dequantize_q5_0,
    QType.Q5_1: dequantize_q5_1, QType.Q8_0: dequantize_q8_0, QType.Q4_K: dequantize_q4_k,
    QType.Q5_K: dequantize_q5_k, QType.Q6_K: dequantize_q6_k, QType.IQ4_NL: dequantize_iq4_nl,
    QType.IQ4_XS: dequantize_iq4_xs,
}
_QUANTIZE = {
    QType.Q4_0: quantize_q4_0, QType.Q4_1: quantize_q4_1, QType.Q5_0: quantize_q5_0, QType.Q5_1: quantize_q5_1,
    QType.Q8_0: quantize_q8_0, QType.Q4_K: quantize_q4_k, QType.Q5_K: quantize_q5_k, QType.Q6_K: quantize_q6_k,
    QType.IQ4_NL: quantize_iq4_nl, QType.IQ4_XS: quantize_iq4_xs,
}


def dequantize(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """Any supported tensor's raw storage -> f32 of the given logical shape (rows..., K)."""
    if qtype == QType.F32:
        out = np.asarray(raw).view(np.float32)
    elif qtype == QType.F16:
        out = np.asarray(raw).view(np.float16).astype(np.float32)
    elif qtype == QType.BF16:
        bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
        out = bits.view(np.float32)
    elif qtype in _DEQUANTIZE:
        out = _DEQUANTIZE[qtype](raw)
    else:  # pragma: no cover - QType is closed
        raise ValueError(f"no dequantizer for {qtype!r}")
    return np.asarray(out, dtype=np.float32).reshape(shape)


def quantize(x: np.ndarray, qtype: QType) -> np.ndarray:
    """f32[..., K] -> raw storage (u8 blocks for block types, f16/bf16/f32 arrays otherwise). Q4_0, Q4_1,
    Q5_0, Q5_1 and Q8_0 are ggml's own quantizers; the K- and IQ4 types use the simple rules documented above."""
    if qtype == QType.F32:
        return np.asarray(x, dtype=np.float32)
    if qtype == QType.F16:
        return np.asarray(x, dtype=np.float32).astype(np.float16)
    if qtype == QType.BF16:
        bits = np.asarray(x, dtype=np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))  # round to nearest even
        return (rounded >> 16).astype(np.uint16)
    return _QUANTIZE[qtype](x)
