"""Random-weight GGUF files of every family in formats/arch.py (llama, qwen2, qwen3, gemma3), for
tests and benchmarks of shapes and features the real models cannot cover.

These models are noise: their text means nothing. They exist to exercise shapes (8 KV heads,
7B-sized layers) and code paths. Never present one as a trained model; the file's general.name
says "random weights". The metadata keys are the ones llama.cpp's converter writes for the family
(so transformers loads the files with `gguf_file=`), and the extra tensors too: QKV biases (qwen2),
q/k norms (qwen3, gemma3), post-sublayer norms (gemma3), rope_freqs.weight (Llama 3.x: the
converter's form of HF's 'llama3' RoPE scaling, see llama3_rope_factors).

The tokenizer is byte-level BPE ('gpt2') over the 256 byte symbols, BOS/EOS control tokens, one
merge (two spaces) and unused filler up to the vocabulary size: nearly every byte is one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import FAMILIES
from .quant import TRAITS, QType, quantize


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
    arch: str = "llama"  # a family of formats/arch.py: its extra tensors and metadata are written
    key_length: int = 0  # head_dim when not dim // n_heads (Mistral Nemo, Qwen 3: 128; Gemma 3: 256)
    sliding_window: int = 0  # gemma3's attention.sliding_window (the family decides which layers slide)
    # Llama 3.x 'llama3' RoPE scaling as HF's config gives it: (factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings) -> a rope_freqs.weight tensor
    llama3_scaling: tuple[float, float, float, int] | None = None
    rope_scaling_type: str = ""  # written as {arch}.rope.scaling.type when set ('linear', 'llama3', ...)
    rope_scaling_factor: float = 0.0  # written as {arch}.rope.scaling.factor when set

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads


def _tokenizer_fields(vocab_size: int) -> tuple[list[str], list[int]]:
    if vocab_size < 259:
        raise ValueError("a synthetic vocabulary needs at least 259 tokens (256 bytes, BOS, EOS, one merge)")
    from ..tokenizer import BYTE_TO_CHAR

    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["<s>", "</s>", "\u0120\u0120"]  # the last: two spaces, from the one merge
    types = [1] * 256 + [3, 3, 1]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types += [5] * (vocab_size - len(types))
    return tokens, types


def random_tensors(spec: SyntheticSpec, raw: bool = False) -> dict[str, tuple[np.ndarray, QType]]:
    """name -> (f32 values in numpy (rows, cols) order, storage type). Scaled to keep activations sane.
    raw: the matrices are zero-stride placeholders of their shape (write_random_model(raw=True))."""
    rng = np.random.default_rng(spec.seed)
    family = FAMILIES[spec.arch]
    d, hd = spec.dim, spec.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        if raw:
            return np.broadcast_to(np.float32(0), (rows, cols))
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int = d) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def qt(name: str) -> QType:
        return dict(spec.qtypes).get(name, spec.qtype)

    out: dict[str, tuple[np.ndarray, QType]] = {
        "token_embd.weight": (np.broadcast_to(np.float32(0), (spec.vocab_size, d)) if raw else
                              rng.standard_normal((spec.vocab_size, d)).astype(np.float32), spec.embed_qtype),
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
        if family.qkv_bias:  # large enough to matter against the projections' unit-scale outputs
            out[p + "attn_q.bias"] = ((0.5 * rng.standard_normal(spec.n_heads * hd)).astype(np.float32), QType.F32)
            out[p + "attn_k.bias"] = ((0.5 * rng.standard_normal(spec.n_kv_heads * hd)).astype(np.float32), QType.F32)
            out[p + "attn_v.bias"] = ((0.5 * rng.standard_normal(spec.n_kv_heads * hd)).astype(np.float32), QType.F32)
        if family.qk_norm:
            out[p + "attn_q_norm.weight"] = (norm(hd), QType.F32)
            out[p + "attn_k_norm.weight"] = (norm(hd), QType.F32)
        if family.post_norms:
            out[p + "post_attention_norm.weight"] = (norm(), QType.F32)
            out[p + "post_ffw_norm.weight"] = (norm(), QType.F32)
    out["output_norm.weight"] = (norm(), QType.F32)
    if not spec.tied_output:
        out["output.weight"] = (mat(spec.vocab_size, d), spec.embed_qtype)
    if spec.llama3_scaling is not None:
        out["rope_freqs.weight"] = (llama3_rope_factors(hd, spec.rope_base, *spec.llama3_scaling), QType.F32)
    return out


def llama3_rope_factors(
    rope_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float, original_ctx: int
) -> np.ndarray:
    """f32[rope_dim/2]: per frequency the divisor of its angle that Llama 3.1's RoPE scaling applies.

    Wavelengths shorter than original_ctx / high_freq_factor keep their frequency (1); longer than
    original_ctx / low_freq_factor are slowed by `factor`; in between the divisor moves smoothly from
    one to the other (interpolating the frequency, not the divisor). This is the definition of HF's
    'llama3' rope type, written as the tensor llama.cpp's converter stores in rope_freqs.weight."""
    freqs = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisor = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisor = np.where(wavelen < original_ctx / high_freq_factor, 1.0, divisor)
    divisor = np.where(wavelen > original_ctx / low_freq_factor, factor, divisor)
    return divisor.astype(np.float32)


def write_random_model(path: str | Path, spec: SyntheticSpec = SyntheticSpec(), raw: bool = False) -> Path:
    """Write a random-weight GGUF of spec.arch at `path` and return the path. raw: the block-quantized
    matrices are random bytes, not quantized values (their scales may be anything, NaN included): a model
    for tests that move or cut weights, never run them, written fast at any size."""
    import gguf

    path = Path(path)
    w = _writer(path, spec)
    noise = np.random.default_rng(spec.seed + 1)
    for name, (values, qtype) in random_tensors(spec, raw).items():
        if raw and TRAITS[qtype].block_values > 1:
            rows, cols = values.shape
            data = np.frombuffer(noise.bytes(rows * TRAITS[qtype].row_bytes(cols)), np.uint8).reshape(rows, -1)
        else:
            data = quantize(values, qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _writer(path: Path, spec: SyntheticSpec):  # noqa: ANN202 - a gguf.GGUFWriter (gguf imported lazily)
    """A GGUFWriter at `path` with spec's metadata and tokenizer added, no tensors yet."""
    import gguf

    family = FAMILIES[spec.arch]
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_name(f"random weights {spec.arch} {spec.dim}d {spec.n_layers}L (not a trained model)")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.arch == "llama":  # the Llama converter's own keys
        w.add_rope_dimension_count(spec.head_dim)
        w.add_vocab_size(spec.vocab_size)
    if spec.key_length or family.qk_norm:  # written when the model's config has an explicit head_dim
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if family.sliding_pattern:
        w.add_sliding_window(spec.sliding_window)
    if spec.rope_scaling_type:
        w.add_string(f"{spec.arch}.rope.scaling.type", spec.rope_scaling_type)
    if spec.rope_scaling_factor:
        w.add_rope_scaling_factor(spec.rope_scaling_factor)
    tokens, types = _tokenizer_fields(spec.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if spec.arch.startswith("qwen") else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 \u0120"])  # some readers reject an empty merge list
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    return w


Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # ggml's block_q4_0: 32 values (q - 8) * d


def write_random_q4_0(path: str | Path, spec: SyntheticSpec) -> Path:
    """A random-weight Llama GGUF (spec.arch 'llama', untied) whose matrices, embedding and output included,
    are Q4_0 drawn directly as blocks (uniform 4-bit values, one f16 scale per matrix chosen so a row's dot
    with a unit vector is ~1), written one tensor at a time: a 7B-shaped file (~3.8 GB) within about one
    tensor's memory and without quantizing any floats. Not a trained model: its tokens mean nothing."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    d, hd = spec.dim, spec.head_dim
    shapes = {"token_embd.weight": (spec.vocab_size, d)}
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "attn_q.weight": (spec.n_heads * hd, d),
                   p + "attn_k.weight": (spec.n_kv_heads * hd, d), p + "attn_v.weight": (spec.n_kv_heads * hd, d),
                   p + "attn_output.weight": (d, spec.n_heads * hd), p + "ffn_norm.weight": (d,),
                   p + "ffn_gate.weight": (spec.ffn_dim, d), p + "ffn_up.weight": (spec.ffn_dim, d),
                   p + "ffn_down.weight": (d, spec.ffn_dim)}
    shapes |= {"output_norm.weight": (d,), "output.weight": (spec.vocab_size, d)}
    w = _writer(path, spec)
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * Q4_0_BLOCK.itemsize), np.dtype(np.uint8),
                              shape[0] * shape[1] // 32 * Q4_0_BLOCK.itemsize, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.write_tensor_data((1.0 + 0.1 * rng.standard_normal(shape[0])).astype(np.float32))
            continue
        rows, k = shape
        blocks = np.empty(rows * k // 32, Q4_0_BLOCK)
        scale = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(k)
        blocks["d"] = np.float16(scale / np.sqrt(21.25))  # E[(q - 8)^2] = 21.25 for q uniform in 0..15
        blocks["qs"] = rng.integers(0, 256, (blocks.size, 16), dtype=np.uint8)
        w.write_tensor_data(blocks.view(np.uint8).reshape(rows, -1))
    w.close()
    return path


def write_random_llama(path: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight GGUF at `path` (of spec.arch, 'llama' by default) and return the path."""
    return write_random_model(path, spec)
