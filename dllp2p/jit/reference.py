"""The slow, obvious numpy twin of every JIT kernel: the test oracle. Weights here are in ggml's
own layout (formats.quant), not the packed one, so a test also checks the repacking.

Quantized products are computed exactly: integer block dots in int64, scales combined in float64 (for
every block type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, decoded by formats.quant).
"""

from __future__ import annotations

import numpy as np

from ..formats import quant
from ..formats.quant import BLOCK_DTYPES, QK, QType, dequantize
from .layout import CANDIDATE, act_bytes


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf, exactly (no +0.5 rounding error): halves away from zero."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(np.where(a - fl >= 0.5, fl + 1, fl), v)


def quantize_f32_q8s(x: np.ndarray) -> np.ndarray:
    """f32[..., K] -> Q8S u8[..., act_bytes(K)] (layout.py), bit-exact with the kernel."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    blocks = x.reshape(-1, k // QK, QK)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    q = round_half_away((blocks * inv[..., None]).astype(np.float32)).astype(np.int8)
    out = np.empty((blocks.shape[0], act_bytes(k)), np.uint8)
    out[:, :k] = q.reshape(-1, k).view(np.uint8)
    out[:, k : k + 4 * (k // QK)] = d.view(np.uint8)
    out[:, k + 4 * (k // QK) :] = q.astype(np.int32).sum(axis=-1).astype(np.int32).view(np.uint8)
    return out.reshape(*x.shape[:-1], act_bytes(k))


def split_q8s(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8S u8[act_bytes(k)] -> (q i8[k], d f32[k/32], s i32[k/32])."""
    nb = k // QK
    a = np.ascontiguousarray(a, np.uint8)
    return a[:k].view(np.int8), a[k : k + 4 * nb].view(np.float32), a[k + 4 * nb :].view(np.int32)


def dequantize_q8s(a: np.ndarray, k: int) -> np.ndarray:
    q, d, _ = split_q8s(a, k)
    return (q.reshape(-1, QK).astype(np.float32) * d[:, None]).reshape(k)


def _q_terms(raw: np.ndarray, qtype: QType, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (row, 32-value block) float64 terms of the product, the two f32 terms the kernel adds per
    block: (scale term d_w d_x dot, offset term); for Q6_K the two 16-value halves' terms."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(-1).view(BLOCK_DTYPES[qtype])
    xq, dx, sx = split_q8s(a, k)
    xq = xq.reshape(-1, QK).astype(np.int64)
    dx, sx = dx.astype(np.float64), sx.astype(np.float64)
    if qtype in (QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS):
        return _k_terms(blocks, qtype, rows, xq, dx, sx)
    blocks = blocks.reshape(rows, -1)
    if qtype == QType.Q8_0:
        wq = blocks["qs"].astype(np.int64)
    elif qtype in (QType.Q5_0, QType.Q5_1):
        wq = quant.q5_ints(blocks.reshape(-1)).reshape(rows, -1, QK).astype(np.int64) - (16 if qtype == QType.Q5_0 else 0)
    else:
        qs = blocks["qs"].astype(np.int64)
        wq = np.concatenate([qs & 15, qs >> 4], axis=-1)
        if qtype == QType.Q4_0:
            wq = wq - 8
        elif qtype == QType.IQ4_NL:
            wq = quant.IQ4_VALUES.astype(np.int64)[wq]
    dots = np.einsum("rbj,bj->rb", wq, xq)
    dw = blocks["d"].astype(np.float64)
    main = dw * dx * dots
    with_min = qtype in (QType.Q4_1, QType.Q5_1)
    offset = blocks["m"].astype(np.float64) * (dx * sx) if with_min else np.zeros_like(main)
    return main, offset


def _k_terms(blocks, qtype, rows, xq, dx, sx) -> tuple[np.ndarray, np.ndarray]:
    """K-quants: per sub-block of 32, (d sc_j) dx dot(q, xq) and -(dmin m_j) dx sx; for Q6_K per 32-value
    block, the terms of its two 16-value sub-blocks (d sc_s) dx dot(q - 32, xq)."""
    d = blocks["d"].astype(np.float64).reshape(rows, -1, 1)
    if qtype == QType.IQ4_XS:
        q, ls = quant.iq4_xs_ints(blocks)
        wq = quant.IQ4_VALUES.astype(np.int64)[q].reshape(rows, -1, QK)
        dots = np.einsum("rbj,bj->rb", wq, xq)
        main = (d * ls.astype(np.float64).reshape(rows, -1, 8)).reshape(rows, -1) * dx * dots
        return main, np.zeros_like(main)
    if qtype == QType.Q6_K:
        q, sc = quant.q6_k_ints(blocks)
        wq = q.reshape(rows, -1, 2, 16).astype(np.int64) - 32  # [row, 32-block, half, 16]
        dots = np.einsum("rbhj,bhj->rbh", wq, xq.reshape(-1, 2, 16))
        scale = (d * sc.astype(np.float64).reshape(rows, -1, 16)).reshape(rows, -1, 2)
        terms = scale * dx[None, :, None] * dots
        return terms[..., 0], terms[..., 1]
    q, sc, m = (quant.q4_k_ints if qtype == QType.Q4_K else quant.q5_k_ints)(blocks)
    dots = np.einsum("rbj,bj->rb", q.reshape(rows, -1, QK).astype(np.int64), xq)
    main = (d * sc.reshape(rows, -1, 8)).reshape(rows, -1) * dx * dots
    dmin = blocks["dmin"].astype(np.float64).reshape(rows, -1, 1)
    offset = -(dmin * m.reshape(rows, -1, 8)).reshape(rows, -1) * (dx * sx)
    return main, offset


def matvec_q_q8s(raw: np.ndarray, qtype: QType, a: np.ndarray, k: int) -> np.ndarray:
    """ggml u8[rows, row_bytes] . Q8S activation -> f64[rows], exact up to the final f64 sum."""
    main, offset = _q_terms(raw, qtype, a, k)
    return (main + offset).sum(axis=1)


def matvec_q_q8s_bound(raw: np.ndarray, qtype: QType, a: np.ndarray, k: int) -> np.ndarray:
    """f64[rows]: sum of |terms| the kernel adds in f32, the scale of its rounding error."""
    main, offset = _q_terms(raw, qtype, a, k)
    return (np.abs(main) + np.abs(offset)).sum(axis=1)


def matvec_q4_0_q8s(raw, a, k):
    return matvec_q_q8s(raw, QType.Q4_0, a, k)


def matvec_q4_1_q8s(raw, a, k):
    return matvec_q_q8s(raw, QType.Q4_1, a, k)


def matvec_q8_0_q8s(raw, a, k):
    return matvec_q_q8s(raw, QType.Q8_0, a, k)


def matmul_q_q8s(raw: np.ndarray, qtype: QType, acts: np.ndarray, k: int) -> np.ndarray:
    """u8[rows, row_bytes] x Q8S u8[n, act_bytes(k)] -> f64[n, rows]."""
    return np.stack([matvec_q_q8s(raw, qtype, a, k) for a in acts])


def matvec_f32_f32(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(w, np.float64) @ np.asarray(x, np.float64)


def matvec_f16_f32(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(w, np.float16).astype(np.float64) @ np.asarray(x, np.float64)


def embed(raw: np.ndarray, qtype: QType, shape: tuple[int, int], token: int) -> np.ndarray:
    """Row `token` of a ggml-layout matrix, dequantized: f32[k]."""
    return dequantize(np.asarray(raw)[token : token + 1], qtype, (1, shape[1]))[0]


def rmsnorm_f32(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64) + eps) * w


def rope_f32(x: np.ndarray, table: np.ndarray, pos: int, rope_dim: int) -> np.ndarray:
    """x f32[n_heads, head_dim] -> rotated copy: (x[2i], x[2i+1]) by the angle in table[pos, i]."""
    out = np.asarray(x, np.float64).copy()
    c, s = table[pos, :, 0].astype(np.float64), table[pos, :, 1].astype(np.float64)
    a0, a1 = out[:, 0:rope_dim:2].copy(), out[:, 1:rope_dim:2].copy()
    out[:, 0:rope_dim:2] = a0 * c - a1 * s
    out[:, 1:rope_dim:2] = a0 * s + a1 * c
    return out


def attention_f16kv(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, pos: int) -> np.ndarray:
    """q f32[n_heads, hd], kc/vc f16[ctx, n_kv, hd] -> f64[n_heads, hd] over positions 0..pos."""
    n_heads, hd = q.shape
    group = n_heads // kc.shape[1]
    out = np.empty((n_heads, hd))
    for h in range(n_heads):
        k = kc[: pos + 1, h // group].astype(np.float64)
        v = vc[: pos + 1, h // group].astype(np.float64)
        s = k @ q[h].astype(np.float64) / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v
    return out


attention_f32 = attention_f16kv  # the earlier name (any float cache dtype works)


def attention_span_f16kv(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """One span's partial over positions [t0, t1): (out f64[n_heads, hd] = sum_t e_t v_t, stats f64[n_heads, 2]
    = (m, sum_t e_t)), with s_t = q . k_t / sqrt(hd), m = max_t s_t, e_t = exp(s_t - m)."""
    n_heads, hd = q.shape
    group = n_heads // kc.shape[1]
    out, stats = np.empty((n_heads, hd)), np.empty((n_heads, 2))
    for h in range(n_heads):
        k = kc[t0:t1, h // group].astype(np.float64)
        v = vc[t0:t1, h // group].astype(np.float64)
        s = k @ q[h].astype(np.float64) / np.sqrt(hd)
        e = np.exp(s - s.max())
        out[h], stats[h] = e @ v, (s.max(), e.sum())
    return out, stats


def attention_merge(po: np.ndarray, st: np.ndarray) -> np.ndarray:
    """Spans' partials po f[n_spans, n_heads, hd], st f[n_spans, n_heads, 2] -> softmax attention f64[n_heads, hd]."""
    m = np.asarray(st[..., 0], np.float64)
    w = np.exp(m - m.max(axis=0))  # [n_spans, n_heads]
    return np.einsum("jh,jhd->hd", w, np.asarray(po, np.float64)) / (w * st[..., 1]).sum(axis=0)[:, None]


def silu_mul_f32(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.asarray(gate, np.float64)
    return g / (1 + np.exp(-g)) * up


def add_f32(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) + y


def to_f16(x: np.ndarray) -> np.ndarray:
    """f32 -> f16, round to nearest even, overflow to inf (IEEE, as numpy's astype)."""
    with np.errstate(over="ignore"):  # overflow to inf is the defined result
        return np.asarray(x, np.float32).astype(np.float16)


def top_k_f32(x: np.ndarray, k: int, base: int = 0) -> np.ndarray:
    """The k largest of x, largest first, ties by lower index: CANDIDATE[k] with index + base."""
    x = np.asarray(x, np.float32)
    order = np.argsort(-x, kind="stable")[:k]
    out = np.empty(len(order), CANDIDATE)
    out["value"], out["index"] = x[order], order + base
    return out


def barrier_demo(n_threads: int, n_phases: int) -> np.ndarray:
    """i64[n_phases, n_threads], what barrier_demo leaves in buf."""
    buf = np.zeros((n_phases, n_threads), np.int64)
    tid1 = np.arange(1, n_threads + 1, dtype=np.int64)
    buf[0] = tid1
    for p in range(1, n_phases):
        buf[p] = buf[p - 1].sum() * tid1 + p
    return buf
