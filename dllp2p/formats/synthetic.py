"""Random-weight Llama GGUF files, for tests and benchmarks of shapes the real model cannot cover.

These models are noise: their text means nothing. They exist to exercise shapes (8 KV heads,
7B-sized layers) and code paths. Never present one as a trained model; the file's general.name
says "random weights".

The tokenizer is byte-level BPE ('gpt2') over the 256 byte symbols, BOS/EOS control tokens, one
merge (two spaces) and unused filler up to the vocabulary size: nearly every byte is one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quant import QType, quantize


@dataclass(frozen=True)
class SyntheticSpec:
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 512
    vocab_size: int = 512
    context_length: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qtype: QType = QType.Q4_0  # of the layer matrices
    # per-matrix overrides of qtype, by the name within a layer: (("ffn_down", QType.Q6_K), ...); K-quants
    # need the matrix's row length (its input width) to be a multiple of 256
    qtypes: tuple[tuple[str, QType], ...] = ()
    embed_qtype: QType = QType.Q8_0
    tied_output: bool = False  # untied, so logits depend on the whole stream, not just the last embedding
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _tokenizer_fields(vocab_size: int) -> tuple[list[str], list[int]]:
    if vocab_size < 259:
        raise ValueError("a synthetic vocabulary needs at least 259 tokens (256 bytes, BOS, EOS, one merge)")
    from ..tokenizer import BYTE_TO_CHAR

    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["<s>", "</s>", "\u0120\u0120"]  # the last: two spaces, from the one merge
    types = [1] * 256 + [3, 3, 1]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types += [5] * (vocab_size - len(types))
    return tokens, types


def random_tensors(spec: SyntheticSpec) -> dict[str, tuple[np.ndarray, QType]]:
    """name -> (f32 values in numpy (rows, cols) order, storage type). Scaled to keep activations sane."""
    rng = np.random.default_rng(spec.seed)
    d, hd = spec.dim, spec.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    def qt(name: str) -> QType:
        return dict(spec.qtypes).get(name, spec.qtype)

    out: dict[str, tuple[np.ndarray, QType]] = {
        "token_embd.weight": (rng.standard_normal((spec.vocab_size, d)).astype(np.float32), spec.embed_qtype),
    }
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = (norm(), QType.F32)
        out[p + "attn_q.weight"] = (mat(spec.n_heads * hd, d), qt("attn_q"))
        out[p + "attn_k.weight"] = (mat(spec.n_kv_heads * hd, d), qt("attn_k"))
        out[p + "attn_v.weight"] = (mat(spec.n_kv_heads * hd, d), qt("attn_v"))
        out[p + "attn_output.weight"] = (mat(d, spec.n_heads * hd), qt("attn_output"))
        out[p + "ffn_norm.weight"] = (norm(), QType.F32)
        out[p + "ffn_gate.weight"] = (mat(spec.ffn_dim, d), qt("ffn_gate"))
        out[p + "ffn_up.weight"] = (mat(spec.ffn_dim, d), qt("ffn_up"))
        out[p + "ffn_down.weight"] = (mat(d, spec.ffn_dim), qt("ffn_down"))
    out["output_norm.weight"] = (norm(), QType.F32)
    if not spec.tied_output:
        out["output.weight"] = (mat(spec.vocab_size, d), spec.embed_qtype)
    return out


def write_random_llama(path: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight Llama GGUF at `path` and return the path."""
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random weights {spec.dim}d {spec.n_layers}L (not a trained model)")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab_size)
    tokens, types = _tokenizer_fields(spec.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 \u0120"])  # some readers reject an empty merge list
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    for name, (values, qtype) in random_tensors(spec).items():
        raw = quantize(values, qtype)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
