"""Model families as data: what each GGUF architecture computes differently from plain Llama.

Every family runs the same forward (dllp2p/reference.py is its readable form):

    x = embed[tokens] * embed_scale
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h @ Wq.T (+ bq), h @ Wk.T (+ bk), h @ Wv.T (+ bv)     qkv_bias
        q, k = rmsnorm_per_head(q) * q_norm, ... * k_norm                qk_norm, over head_dim
        q, k = rope(q), rope(k)                                          rope_neox picks the pairs
        a = softmax(q k^T * attn_scale, causal [, sliding window]) v
        a = a @ Wo.T;  a = rmsnorm(a) * post_attention_norm              post_norms
        x = x + a
        h = rmsnorm(x) * ffn_norm
        f = (act(h @ Wg.T) * (h @ Wu.T)) @ Wd.T                          activation
        f = rmsnorm(f) * post_ffw_norm                                   post_norms
        x = x + f
    logits = (rmsnorm(x[-1]) * output_norm) @ Wout.T                     Wout = token_embd when tied

A `Family` says which of those switches a GGUF architecture turns on; gguf_model.py reads the file's
numbers (dims, RoPE base, window) into a ModelConfig that carries the switches as flat fields, so the
engines, the scheduler and the wire never look a family up again.

Facts per family, as llama.cpp's converter writes the files and llama.cpp runs them:

- llama (Llama 1-3.x, Mistral / Mixtral-free Mistral-style files, SmolLM): the converter permuted the
  rows of Q and K so that RoPE rotates adjacent pairs (x[2i], x[2i+1]). Llama 3.1+ files carry
  `rope_freqs.weight` f32[rope_dim/2]: per frequency a divisor of the angle (the converter's form of
  HF's 'llama3' rope scaling); some also say `rope.scaling.type = llama3`, which is only valid with
  that tensor. Mistral-style files differ only in numbers (head_dim from attention.key_length, KV
  heads, RoPE base); a Mixtral (expert_count > 0) is a mixture of experts, not supported.
- qwen2 (Qwen 2 / 2.5): Q, K and V projections have biases (attn_{q,k,v}.bias); RoPE rotates the
  NEOX pairs (x[i], x[i + rope_dim/2]) on unpermuted rows.
- qwen3: no biases; q and k are RMS-normalised per head over head_dim (attn_q_norm / attn_k_norm,
  f32[head_dim], plain weights) after the projection and before RoPE; NEOX pairs.
- gemma3 (text): embedding rows times sqrt(dim) (in f32); GELU (tanh approximation) instead of SiLU;
  q/k norms as qwen3; each sublayer's output RMS-normalised again (post_attention_norm,
  post_ffw_norm) before the residual add; NEOX pairs; sliding-window attention (window from
  `attention.sliding_window`, a query sees keys with q - k < window) on every layer but each 6th
  (layer i global when (i + 1) % 6 == 0), the sliding layers using RoPE base 10000 and the global
  ones the file's freq_base (and its linear scaling, if any); scores scaled by head_dim^-0.5 (the
  27B model, 62 layers: (dim / n_heads)^-0.5, as llama.cpp does; HF's query_pre_attn_scalar).
  Gemma's RMSNorm multiplies by (1 + w): the converter already added the 1 to every *norm.weight
  in the file (HF's GGUF loader subtracts it again), so here every norm is a plain multiply.
  The converter writes no output.weight: the output is tied to token_embd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATIONS = ("silu", "gelu_tanh")

# RoPE scaling types (the `{arch}.rope.scaling.type` values) the engines implement
ROPE_SCALING_NONE = "none"
ROPE_SCALING_LINEAR = "linear"  # angles divided by rope.scaling.factor (global layers only)
ROPE_SCALING_LLAMA3 = "llama3"  # per-frequency divisors from the rope_freqs.weight tensor


@dataclass(frozen=True)
class Family:
    """What one GGUF `general.architecture` computes beyond plain Llama (see the module docstring)."""

    name: str
    qkv_bias: bool = False  # blk.i.attn_{q,k,v}.bias, f32[q_dim], f32[kv_dim], f32[kv_dim]
    qk_norm: bool = False  # blk.i.attn_{q,k}_norm.weight f32[head_dim], per-head RMSNorm before RoPE
    post_norms: bool = False  # blk.i.post_attention_norm / post_ffw_norm.weight f32[dim]
    activation: str = "silu"  # of the FFN gate: one of ACTIVATIONS
    embed_scale_sqrt_dim: bool = False  # embedding rows times sqrt(dim)
    rope_neox: bool = False  # pairs (i, i + rope_dim/2), not (2i, 2i + 1)
    sliding_pattern: int = 0  # n > 0: layer i slides unless (i + 1) % n == 0; 0: no sliding window
    rope_base_local: float | None = None  # RoPE base of the sliding layers (None: the file's)
    rope_scalings: tuple[str, ...] = (ROPE_SCALING_NONE, ROPE_SCALING_LINEAR)  # accepted scaling types
    rope_freqs_tensor: bool = False  # may carry rope_freqs.weight f32[rope_dim/2] (angle divisors)

    def attn_scale(self, dim: int, n_heads: int, n_layers: int, head_dim: int) -> float:
        """The factor of q . k in the attention scores."""
        if self.name == "gemma3" and n_layers == 62:  # Gemma 3 27B: query_pre_attn_scalar = dim / n_heads
            return (dim / n_heads) ** -0.5
        return head_dim**-0.5

    def embed_scale(self, dim: int) -> float:
        return float(math.sqrt(dim)) if self.embed_scale_sqrt_dim else 1.0

    def sliding_layers(self, n_layers: int) -> tuple[bool, ...]:
        """Per layer, whether it attends through the sliding window; () when the family has none."""
        if not self.sliding_pattern:
            return ()
        return tuple((i + 1) % self.sliding_pattern != 0 for i in range(n_layers))


LLAMA = Family(
    "llama",
    rope_scalings=(ROPE_SCALING_NONE, ROPE_SCALING_LINEAR, ROPE_SCALING_LLAMA3),
    rope_freqs_tensor=True,
)
QWEN2 = Family("qwen2", qkv_bias=True, rope_neox=True)
QWEN3 = Family("qwen3", qk_norm=True, rope_neox=True)
GEMMA3 = Family(
    "gemma3",
    qk_norm=True,
    post_norms=True,
    activation="gelu_tanh",
    embed_scale_sqrt_dim=True,
    rope_neox=True,
    sliding_pattern=6,
    rope_base_local=10000.0,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2, QWEN3, GEMMA3)}
