"""The reference forward pass: float32 numpy, readable first. The oracle for every fast engine.

One token's path, top to bottom (shapes for T tokens at once; T = 1 when decoding). The bracketed
steps are the family switches of ModelConfig (formats/arch.py), off for plain Llama:

    x = embed[tokens] [* embed_scale]                   (T, dim)
    for each layer:
        h = rmsnorm(x) * attn_norm                      (T, dim)
        q = h @ Wq.T [+ bq], k = h @ Wk.T [+ bk], v = h @ Wv.T [+ bv]
                                                        (T, n_heads, hd), (T, n_kv, hd), (T, n_kv, hd)
        [q, k = rmsnorm(q) * q_norm, rmsnorm(k) * k_norm  over hd, per head: qk_norm]
        q, k = rope(q, pos), rope(k, pos)               pairs (2i, 2i+1), or (i, i + rope_dim/2) if
                                                        rope_neox; angles pos * base^(-2i/rope_dim)
                                                        [/ rope_freq_factors[i]] [/ linear factor];
                                                        the layer's base and factor: config.layer_rope
        cache.k[pos], cache.v[pos] = k, v               (ctx, n_kv, hd) each
        a = causal softmax(q k^T * score_scale) v       per head, KV head = head // group; a sliding
                                                        layer sees only keys with pos - key < window
        a = a @ Wo.T  [; a = rmsnorm(a) * post_attention_norm: post_norms]
        x = x + a                                       (T, dim)
        h = rmsnorm(x) * ffn_norm
        f = (act(h @ Wg.T) * (h @ Wu.T)) @ Wd.T          act: silu or gelu_tanh
        [f = rmsnorm(f) * post_ffw_norm: post_norms]
        x = x + f
    logits = (rmsnorm(x[-1]) * out_norm) @ Wout.T       (vocab,)

Weights are dequantized layer by layer from the memory-mapped file as they are needed; with
`keep_weights=True` the float32 copies are kept (fast, ~4 bytes per parameter), for tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .engine import ContextFull
from .formats import GGUFModel, ModelConfig
from .formats.quant import is_block_type


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: f32[..., dim], weight: f32[dim] -> f32[..., dim]."""
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)).astype(np.float32) * weight


def rope_tables(
    config: ModelConfig, positions: np.ndarray, base: float, linear: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """positions: i[T] -> (cos, sin): f32[T, rope_dim/2] each, for frequency i the angle
    pos * base^(-2i/rope_dim) / rope_freq_factors[i] / linear (factors 1 when the file has none)."""
    half = config.rope_dim // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / config.rope_dim)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    angles = positions.astype(np.float64)[:, None] * (inv_freq / linear)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, neox: bool = False) -> np.ndarray:
    """x: f32[T, heads, hd]; rotates, for i < rope_dim/2 of every head, the pair (x[2i], x[2i+1]), or
    with neox the pair (x[i], x[i + rope_dim/2]), by the angle whose cos and sin are cos[:, i], sin[:, i]."""
    out = x.copy()
    half = rope_dim // 2
    first, second = (np.s_[0:half], np.s_[half:rope_dim]) if neox else (np.s_[0:rope_dim:2], np.s_[1:rope_dim:2])
    a, b = x[:, :, first], x[:, :, second]
    c, s = cos[:, None, :], sin[:, None, :]
    out[:, :, first] = a * c - b * s
    out[:, :, second] = a * s + b * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x64 + 0.044715 * x64**3)))).astype(np.float32)


ACTIVATION_FUNCTIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


class KVCache:
    """Keys and values of every layer: k, v: f32[n_layers, ctx, n_kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, ctx: int):
        shape = (config.n_layers, ctx, config.n_kv_heads, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.ctx = ctx


def q8_roundtrip(x: np.ndarray) -> np.ndarray:
    """f32[..., K] -> f32: each block of 32 quantized to 8 bits (scale max|x|/127, round half away from
    zero) and back, as the JIT engine quantizes the input of every product with block-quantized weights."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    a = np.abs(blocks * inv)
    q = np.copysign(np.where(a - np.floor(a) >= 0.5, np.floor(a) + 1, np.floor(a)), blocks)
    return (q * d).reshape(x.shape).astype(np.float32)


class ReferenceEngine:
    """Engine protocol over numpy float32. Slow and obvious on purpose.

    numerics="f32": every value in float32 (the oracle for HF transformers' float32 forward).
    numerics="jit": the JIT engine's two deliberate roundings, so it can be checked tightly: inputs of
    block-quantized products quantized to 8-bit blocks (q8_roundtrip), and a float16 KV cache.
    """

    def __init__(self, model: GGUFModel, ctx: int, *, keep_weights: bool = False, numerics: str = "f32"):
        if numerics not in ("f32", "jit"):
            raise ValueError(f"unknown numerics {numerics!r}")
        self.model = model
        self.config = model.config
        self.ctx = min(ctx, model.config.context_length)
        self.cache = KVCache(self.config, self.ctx)
        self._kept: dict[str, np.ndarray] | None = {} if keep_weights else None
        self.numerics = numerics

    def product(self, x: np.ndarray, name: str) -> np.ndarray:
        """x f32[..., cols] @ W.T for the named weight W f32[rows, cols]."""
        if self.numerics == "jit" and is_block_type(self.model.tensor(name).qtype):
            x = q8_roundtrip(x)
        return x @ self.weight(name).T

    def weight(self, name: str) -> np.ndarray:
        """A tensor as f32 in its logical shape (rows, cols)."""
        if self._kept is not None and name in self._kept:
            return self._kept[name]
        w = self.model.tensor(name).dequantize()
        if self._kept is not None:
            self._kept[name] = w
        return w

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """-> f32[T, dim]: only the looked-up rows are dequantized, times embed_scale (as f32)."""
        table = self.model.tensor("token_embd.weight")
        rows = np.stack([table.rows(t, t + 1).dequantize()[0] for t in tokens])
        return rows * np.float32(self.config.embed_scale) if self.config.embed_scale != 1.0 else rows

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        c = self.config
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if start_pos + n > self.ctx:
            raise ContextFull(f"context of {self.ctx} positions is full (need {start_pos + n}); raise --ctx")
        positions = np.arange(start_pos, start_pos + n)
        tables = {rope: rope_tables(c, positions, *rope) for rope in {c.layer_rope(i) for i in range(c.n_layers)}}
        x = self.embed(tokens)  # (T, dim)
        for layer in range(c.n_layers):
            x = self._layer(layer, x, positions, *tables[c.layer_rope(layer)])
        h = rmsnorm(x[-1], self.weight("output_norm.weight"), c.norm_eps)
        out_name = "token_embd.weight" if c.tied_output else "output.weight"
        return self.product(h, out_name).astype(np.float32)  # (vocab,)

    def _layer(self, layer: int, x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        p = f"blk.{layer}."
        n = len(positions)
        h = rmsnorm(x, self.weight(p + "attn_norm.weight"), c.norm_eps)
        q = self.product(h, p + "attn_q.weight")  # (T, n_heads * hd)
        k = self.product(h, p + "attn_k.weight")  # (T, n_kv * hd)
        v = self.product(h, p + "attn_v.weight")
        if c.qkv_bias:
            q = q + self.weight(p + "attn_q.bias")
            k = k + self.weight(p + "attn_k.bias")
            v = v + self.weight(p + "attn_v.bias")
        q = q.reshape(n, c.n_heads, c.head_dim)
        k = k.reshape(n, c.n_kv_heads, c.head_dim)
        v = v.reshape(n, c.n_kv_heads, c.head_dim)
        if c.qk_norm:  # per head, over head_dim
            q = rmsnorm(q, self.weight(p + "attn_q_norm.weight"), c.norm_eps)
            k = rmsnorm(k, self.weight(p + "attn_k_norm.weight"), c.norm_eps)
        q = apply_rope(q, cos, sin, c.rope_dim, c.rope_neox)
        k = apply_rope(k, cos, sin, c.rope_dim, c.rope_neox)
        start, end = int(positions[0]), int(positions[-1]) + 1
        if self.numerics == "jit":
            k, v = k.astype(np.float16), v.astype(np.float16)
        self.cache.k[layer, start:end] = k
        self.cache.v[layer, start:end] = v
        att = self._attention(layer, q, positions)  # (T, n_heads * hd)
        a = self.product(att, p + "attn_output.weight")  # (T, dim)
        if c.post_norms:
            a = rmsnorm(a, self.weight(p + "post_attention_norm.weight"), c.norm_eps)
        x = x + a
        h = rmsnorm(x, self.weight(p + "ffn_norm.weight"), c.norm_eps)
        gate = self.product(h, p + "ffn_gate.weight")  # (T, ffn_dim)
        up = self.product(h, p + "ffn_up.weight")
        f = self.product(ACTIVATION_FUNCTIONS[c.activation](gate) * up, p + "ffn_down.weight")  # (T, dim)
        if c.post_norms:
            f = rmsnorm(f, self.weight(p + "post_ffw_norm.weight"), c.norm_eps)
        return x + f

    def _attention(self, layer: int, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """q: f32[T, n_heads, hd] -> f32[T, n_heads * hd], causal over the cache."""
        c = self.config
        end = int(positions[-1]) + 1
        keys = self.cache.k[layer, :end]  # (S, n_kv, hd)
        values = self.cache.v[layer, :end]
        kv_of_head = np.arange(c.n_heads) // c.group_size
        k_h = keys[:, kv_of_head].transpose(1, 0, 2)  # (n_heads, S, hd)
        v_h = values[:, kv_of_head].transpose(1, 0, 2)
        scores = np.einsum("thd,hsd->hts", q, k_h) * np.float32(c.score_scale)  # (heads, T, S)
        keys_at = np.arange(end)[None, :]
        visible = keys_at <= positions[:, None]  # (T, S)
        if c.is_sliding(layer):
            visible &= keys_at > positions[:, None] - c.sliding_window
        scores = np.where(visible[None], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,hsd->thd", probs, v_h)  # (T, heads, hd)
        return out.reshape(len(positions), c.n_heads * c.head_dim).astype(np.float32)

    def close(self) -> None:
        self._kept = None
