"""Random-weight models of every family (formats/arch.py), built in memory for the JIT and TP tests.

These are noise, not trained models: they exercise each family switch of ModelConfig (biases, q/k norms,
post norms, GELU-tanh, embedding and score scales, NEOX RoPE, RoPE freq factors, sliding windows with a
second RoPE base, a single KV head). The tensors are quantized with formats.quant and handed over as a
GGUFModel whose path is a small placeholder file (the weight cache keys on its path, size and mtime).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from dllp2p.formats import GGUFModel, ModelConfig, QType
from dllp2p.formats.gguf_model import Tensor, expected_shapes
from dllp2p.formats.quant import quantize

BASE = ModelConfig(arch="llama", dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, ffn_dim=512,
                   vocab_size=512, context_length=4096, rope_base=10000.0, rope_dim=32, norm_eps=1e-5,
                   tied_output=False)

FAMILIES: dict[str, ModelConfig] = {
    # Llama 3.x: per-frequency RoPE divisors (rope_freqs.weight), 4 query heads per KV head
    "llama3": replace(BASE, rope_base=500000.0,
                      rope_freq_factors=tuple(float(f) for f in np.linspace(1.0, 8.0, 16))),
    "qwen2": replace(BASE, arch="qwen2", qkv_bias=True, rope_neox=True, rope_base=1e6, tied_output=True),
    "qwen3": replace(BASE, arch="qwen3", qk_norm=True, rope_neox=True, rope_base=1e6, norm_eps=1e-6),
    # Gemma 3 shapes in small: 1 KV head, head_dim 64 (rope over all of it), window 16 on 2 of 3 layers
    "gemma3": replace(BASE, arch="gemma3", dim=192, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=64, rope_dim=64,
                      ffn_dim=512, rope_base=1e6, norm_eps=1e-6, tied_output=True, qk_norm=True, post_norms=True,
                      activation="gelu_tanh", embed_scale=float(np.float32(math.sqrt(192))), attn_scale=64**-0.5,
                      rope_neox=True, sliding_window=16, sliding_layers=(True, True, False), rope_base_local=10000.0),
}
# Gemma 3 27B's score scale (dim / n_heads)^-0.5 differs from head_dim^-0.5: the program scales q
FAMILIES["gemma3-scale"] = replace(FAMILIES["gemma3"], attn_scale=0.1)
# a window longer than one attention span (ATT_SPLIT = 128), so the first span of a row starts mid-span
FAMILIES["gemma3-window"] = replace(FAMILIES["gemma3"], sliding_window=150)


def random_model(directory: Path, name: str, config: ModelConfig, qtype: QType = QType.Q8_0, seed: int = 0) -> GGUFModel:
    """A model of `config` with random weights: matrices in qtype, the embedding in Q8_0, vectors F32."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, Tensor] = {}
    for tname, shape in expected_shapes(config).items():
        if tname == "rope_freqs.weight":
            values = np.asarray(config.rope_freq_factors, np.float32)
        elif len(shape) == 1:
            is_norm = tname.endswith("norm.weight")
            values = ((1.0 if is_norm else 0.0) + (0.1 if is_norm else 0.5) * rng.standard_normal(shape)).astype(np.float32)
        elif tname == "token_embd.weight":  # Gemma scales rows by sqrt(dim): keep the layers' share of x
            values = (rng.standard_normal(shape) / config.embed_scale).astype(np.float32)
        else:
            values = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        q = QType.F32 if len(shape) == 1 else (QType.Q8_0 if tname in ("token_embd.weight", "output.weight") else qtype)
        tensors[tname] = Tensor(tname, q, tuple(shape), quantize(values, q))
    path = Path(directory) / f"{name}.placeholder"
    path.write_bytes(name.encode())
    return GGUFModel(path, config, {"general.architecture": config.arch, "general.name": f"random weights {name}"},
                     tensors)
