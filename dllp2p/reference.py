"""The reference forward pass: float32 numpy, readable first. The oracle for every fast engine.

One token's path, top to bottom (shapes for T tokens at once; T = 1 when decoding):

    x = embed[tokens]                                  (T, dim)
    for each layer:
        h = rmsnorm(x) * attn_norm                     (T, dim)
        q = h @ Wq.T, k = h @ Wk.T, v = h @ Wv.T        (T, n_heads*hd), (T, n_kv*hd), (T, n_kv*hd)
        q, k = rope(q, pos), rope(k, pos)              adjacent pairs (x[2i], x[2i+1]) rotate
        cache.k[pos], cache.v[pos] = k, v               (ctx, n_kv, hd) each
        a = causal softmax(q k^T / sqrt(hd)) v          per head, KV head = head // group
        x = x + a @ Wo.T                                (T, dim)
        h = rmsnorm(x) * ffn_norm
        x = x + (silu(h @ Wg.T) * (h @ Wu.T)) @ Wd.T     (T, dim)
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


def rope_tables(config: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """positions: i[T] -> (cos, sin): f32[T, rope_dim/2] each."""
    half = config.rope_dim // 2
    inv_freq = config.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / config.rope_dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int) -> np.ndarray:
    """x: f32[T, heads, hd]; rotates the pairs (x[2i], x[2i+1]) for i < rope_dim/2 of every head."""
    out = x.copy()
    even = x[:, :, 0:rope_dim:2]
    odd = x[:, :, 1:rope_dim:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out[:, :, 0:rope_dim:2] = even * c - odd * s
    out[:, :, 1:rope_dim:2] = even * s + odd * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


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
        """-> f32[T, dim]: only the looked-up rows are dequantized."""
        table = self.model.tensor("token_embd.weight")
        return np.stack([table.rows(t, t + 1).dequantize()[0] for t in tokens])

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        c = self.config
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if start_pos + n > self.ctx:
            raise ContextFull(f"context of {self.ctx} positions is full (need {start_pos + n}); raise --ctx")
        positions = np.arange(start_pos, start_pos + n)
        cos, sin = rope_tables(c, positions)
        x = self.embed(tokens)  # (T, dim)
        for layer in range(c.n_layers):
            x = self._layer(layer, x, positions, cos, sin)
        h = rmsnorm(x[-1], self.weight("output_norm.weight"), c.norm_eps)
        out_name = "token_embd.weight" if c.tied_output else "output.weight"
        return self.product(h, out_name).astype(np.float32)  # (vocab,)

    def _layer(self, layer: int, x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        p = f"blk.{layer}."
        n = len(positions)
        h = rmsnorm(x, self.weight(p + "attn_norm.weight"), c.norm_eps)
        q = self.product(h, p + "attn_q.weight").reshape(n, c.n_heads, c.head_dim)
        k = self.product(h, p + "attn_k.weight").reshape(n, c.n_kv_heads, c.head_dim)
        v = self.product(h, p + "attn_v.weight").reshape(n, c.n_kv_heads, c.head_dim)
        q = apply_rope(q, cos, sin, c.rope_dim)
        k = apply_rope(k, cos, sin, c.rope_dim)
        start, end = int(positions[0]), int(positions[-1]) + 1
        if self.numerics == "jit":
            k, v = k.astype(np.float16), v.astype(np.float16)
        self.cache.k[layer, start:end] = k
        self.cache.v[layer, start:end] = v
        att = self._attention(layer, q, positions)  # (T, n_heads * hd)
        x = x + self.product(att, p + "attn_output.weight")
        h = rmsnorm(x, self.weight(p + "ffn_norm.weight"), c.norm_eps)
        gate = self.product(h, p + "ffn_gate.weight")
        up = self.product(h, p + "ffn_up.weight")
        return x + self.product(silu(gate) * up, p + "ffn_down.weight")

    def _attention(self, layer: int, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """q: f32[T, n_heads, hd] -> f32[T, n_heads * hd], causal over the cache."""
        c = self.config
        end = int(positions[-1]) + 1
        keys = self.cache.k[layer, :end]  # (S, n_kv, hd)
        values = self.cache.v[layer, :end]
        kv_of_head = np.arange(c.n_heads) // c.group_size
        k_h = keys[:, kv_of_head].transpose(1, 0, 2)  # (n_heads, S, hd)
        v_h = values[:, kv_of_head].transpose(1, 0, 2)
        scores = np.einsum("thd,hsd->hts", q, k_h) / np.float32(np.sqrt(c.head_dim))  # (heads, T, S)
        visible = np.arange(end)[None, :] <= positions[:, None]  # (T, S)
        scores = np.where(visible[None], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,hsd->thd", probs, v_h)  # (T, heads, hd)
        return out.reshape(len(positions), c.n_heads * c.head_dim).astype(np.float32)

    def close(self) -> None:
        self._kept = None
