"""What the compiled programs need of a model family beyond plain Llama: the per-layer vectors they read,
Q/K rows rearranged so one RoPE kernel serves every family, and the RoPE tables.

The family switches themselves are flat ModelConfig fields (formats/arch.py describes them); program.py
and tp_program.py read them while emitting the forward, so a config is the whole description.

NEOX RoPE (qwen2, qwen3, gemma3) rotates the pairs (x[i], x[i + rope_dim/2]); the kernel rotates adjacent
pairs (x[2i], x[2i+1]), as llama GGUFs need (their converter permuted Q/K rows). So at pack time the rows
of attn_q / attn_k (and their biases and q/k-norm weights) are permuted within each head, row 2i <- i,
row 2i+1 <- i + rope_dim/2 (rows >= rope_dim stay): the product then yields q and k in the order the
adjacent-pair kernel rotates exactly as NEOX rotates the original order. Attention only takes dot
products of q with k (both permuted alike) and weights V (untouched), so its output is unchanged; the
K cache simply holds the permuted order. Within-head permutations commute with the tensor-parallel
cuts (which fall on head boundaries).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..formats import ModelConfig, Tensor
from .layout import aligned_empty

# slot name -> tensor name suffix (blk.{i}.<suffix>); present when the config's switch is on
LAYER_EXTRAS = {
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "post_ffn_norm": "post_ffw_norm.weight",
}


def layer_extras(config: ModelConfig) -> tuple[str, ...]:
    """The slot names of LAYER_EXTRAS this config's layers have."""
    out = []
    if config.qkv_bias:
        out += ["q_bias", "k_bias", "v_bias"]
    if config.qk_norm:
        out += ["q_norm", "k_norm"]
    if config.post_norms:
        out += ["post_attn_norm", "post_ffn_norm"]
    return tuple(out)


def layer_extra_names(config: ModelConfig, layer: int) -> list[str]:
    return [f"blk.{layer}.{LAYER_EXTRAS[s]}" for s in layer_extras(config)]


def neox_head_order(head_dim: int, rope_dim: int) -> np.ndarray:
    """i64[head_dim]: new row j of a head takes old row order[j] (see the module docstring)."""
    half = rope_dim // 2
    order = np.arange(head_dim)
    order[0:rope_dim:2] = np.arange(half)
    order[1:rope_dim:2] = np.arange(half) + half
    return order


_PER_HEAD = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
_HEAD_VECTORS = ("attn_q_norm.weight", "attn_k_norm.weight")


def arranged_rows(name: str, rows: int, config: ModelConfig) -> np.ndarray | None:
    """i64[rows]: the order in which the programs read tensor `name`'s rows (of `rows`): the adjacent-pair
    order for NEOX models' Q/K rows, biases and q/k norms; None for every other tensor (as it is)."""
    if not config.rope_neox:
        return None
    order = neox_head_order(config.head_dim, config.rope_dim)
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else ""
    if suffix in _PER_HEAD:
        heads = rows // config.head_dim
        return (np.arange(heads)[:, None] * config.head_dim + order[None, :]).reshape(-1)
    if suffix in _HEAD_VECTORS:
        return order
    return None


def arranged(tensor: Callable[[str], Tensor], config: ModelConfig) -> Callable[[str], Tensor]:
    """tensor(name) as the programs read it: Q/K rows (and biases, q/k norms) in adjacent-pair order for
    NEOX models (a copy of those tensors: arranged_rows), every other tensor as it is."""
    if not config.rope_neox:
        return tensor

    def get(name: str) -> Tensor:
        t = tensor(name)
        rows = arranged_rows(name, t.shape[0], config)
        if rows is None:
            return t
        return Tensor(t.name, t.qtype, t.shape, np.ascontiguousarray(t.data[rows]))

    return get


def rope_table(ctx: int, config: ModelConfig, local: bool) -> np.ndarray:
    """f32[ctx, rope_dim/2, 2]: (cos, sin) of the angle pos * base^(-2i/rope_dim) / f_i / scale, in f64,
    for the global layers (the file's base and linear scaling) or the sliding ones (rope_base_local,
    unscaled; config.layer_rope); f_i the freq factors (1 without), as reference.rope_tables."""
    half = config.rope_dim // 2
    base = (config.rope_base_local if config.rope_base_local is not None else config.rope_base) if local else config.rope_base
    inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / config.rope_dim)
    if config.rope_freq_factors is not None:
        inv = inv / np.asarray(config.rope_freq_factors, np.float64)
    if not local:
        inv = inv / config.rope_scaling_factor
    angle = np.arange(ctx, dtype=np.float64)[:, None] * inv[None, :]
    out = aligned_empty((ctx, half, 2), np.float32)
    out[..., 0] = np.cos(angle)
    out[..., 1] = np.sin(angle)
    return out
