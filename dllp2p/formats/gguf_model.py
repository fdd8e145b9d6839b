"""GGUF file -> (frozen ModelConfig, memory-mapped tensors, metadata), with clear errors.

The container (header, key/values, tensor infos) is parsed by gguf_container.py; every problem becomes one
`ModelFileError` that names the file and the problem. Tensors are numpy views on the memory map: nothing
is copied until a caller dequantizes or repacks a tensor.

Which architectures are known, and what each computes beyond plain Llama, is data in formats/arch.py;
`_config_from` turns a family and the file's metadata into a flat ModelConfig. Tensor names and shapes
(numpy order, rows first) for the Llama architecture (the other families' extra tensors: arch.py and
`expected_shapes`):

    token_embd.weight        (vocab, dim)
    blk.{i}.attn_norm.weight (dim,)
    blk.{i}.attn_q.weight    (n_heads * head_dim, dim)     rows permuted for adjacent-pair RoPE
    blk.{i}.attn_k.weight    (n_kv_heads * head_dim, dim)  likewise
    blk.{i}.attn_v.weight    (n_kv_heads * head_dim, dim)
    blk.{i}.attn_output.weight (dim, n_heads * head_dim)
    blk.{i}.ffn_norm.weight  (dim,)
    blk.{i}.ffn_gate.weight  (ffn_dim, dim)
    blk.{i}.ffn_up.weight    (ffn_dim, dim)
    blk.{i}.ffn_down.weight  (dim, ffn_dim)
    output_norm.weight       (dim,)
    output.weight            (vocab, dim)   absent when tied to token_embd
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..memory import release
from .arch import ACTIVATIONS, FAMILIES, ROPE_SCALING_LLAMA3, ROPE_SCALING_NONE, Family
from .gguf_container import ModelFileError, _check_header, _Header, _parse, _type_name
from .quant import TRAITS, QType, dequantize

SUPPORTED_ARCHS = tuple(FAMILIES)


@dataclass(frozen=True)
class ModelConfig:
    """A model's shape and, as flat fields, what its family computes beyond plain Llama.

    The fields after `tied_output` come from the family's description (formats/arch.py) and the file;
    their defaults are Llama's behaviour, so a config built by hand for Llama needs none of them.
    Flat and of plain types so that the protocol's generic codec carries it to workers as is.
    """

    arch: str
    dim: int  # residual stream width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int  # the model's trained maximum; the KV cache is sized by the user's --ctx
    rope_base: float
    rope_dim: int  # leading dims of each head that RoPE rotates
    norm_eps: float
    tied_output: bool  # output projection is token_embd
    # q, k, v plus biases blk.i.attn_{q,k,v}.bias: f32[q_dim], f32[kv_dim], f32[kv_dim] (qwen2)
    qkv_bias: bool = False
    # q and k RMS-normalised per head over head_dim (eps norm_eps) after the projection (and bias),
    # before RoPE, times blk.i.attn_q_norm.weight / attn_k_norm.weight: f32[head_dim] (qwen3, gemma3)
    qk_norm: bool = False
    # each sublayer's output RMS-normalised before the residual add, times
    # blk.i.post_attention_norm.weight / post_ffw_norm.weight: f32[dim] (gemma3)
    post_norms: bool = False
    # the FFN's gate activation, down(act(gate(h)) * up(h)): "silu" or "gelu_tanh" (gemma3: GELU with
    # the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))))
    activation: str = "silu"
    # embedding rows are multiplied by this f32 (gemma3: sqrt(dim)); the output projection is not
    embed_scale: float = 1.0
    # attention scores are (q . k) * attn_scale; None means 1/sqrt(head_dim) (see `score_scale`)
    attn_scale: float | None = None
    # RoPE pairs: False rotates (x[2i], x[2i+1]) (llama GGUFs: the converter permuted Q/K rows);
    # True rotates (x[i], x[i + rope_dim/2]) (llama.cpp's ROPE_TYPE_NEOX: qwen2, qwen3, gemma3)
    rope_neox: bool = False
    # per frequency i < rope_dim/2 a divisor of the angle: theta_i = pos * base^(-2i/rope_dim) / f_i
    # (Llama 3.x's rope_freqs.weight, the 'llama3' scaling); None: all 1
    rope_freq_factors: tuple[float, ...] | None = None
    # linear RoPE scaling (rope.scaling.type = linear): angles divided by this, on global layers only
    rope_scaling_factor: float = 1.0
    # sliding-window attention: a query at position p sees keys at positions > p - sliding_window, on
    # the layers where sliding_layers[i] is True (len n_layers); 0 and () when the model has none
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    # RoPE base of the sliding layers (gemma3: 10000 while global layers use rope_base); None: rope_base
    rope_base_local: float | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if any(self.sliding_layers) and self.sliding_window <= 0:
            raise ValueError("sliding layers without a sliding window")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.rope_dim // 2:
            raise ValueError(f"{len(self.rope_freq_factors)} rope_freq_factors for rope_dim {self.rope_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def score_scale(self) -> float:
        """The factor of q . k in the attention scores."""
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only to the last sliding_window positions."""
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(RoPE base, linear scaling factor) of `layer`: sliding layers use rope_base_local, unscaled."""
        if self.is_sliding(layer):
            return (self.rope_base_local if self.rope_base_local is not None else self.rope_base), 1.0
        return self.rope_base, self.rope_scaling_factor


@dataclass(frozen=True)
class Tensor:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # logical shape, numpy order (rows, cols)
    data: np.ndarray  # raw storage view: u8[rows, row_bytes] for block types, f32/f16/u16 otherwise

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """f32[shape]: a fresh array."""
        return dequantize(self.data, self.qtype, self.shape)

    def rows(self, start: int, stop: int) -> "Tensor":
        """Rows [start, stop) as a view: the unit of tensor-parallel slicing."""
        return Tensor(self.name, self.qtype, (stop - start, *self.shape[1:]), self.data[start:stop])

    def columns(self, start: int, stop: int) -> "Tensor":
        """Columns [start, stop) of a matrix as a copy; block types keep whole blocks, so start and stop
        must be multiples of the block size (ValueError otherwise)."""
        traits = TRAITS[self.qtype]
        if len(self.shape) != 2 or not 0 <= start < stop <= self.shape[1]:
            raise ValueError(f"{self.name}: columns [{start}, {stop}) are not a range of a {self.shape} matrix")
        if start % traits.block_values or stop % traits.block_values:
            raise ValueError(f"{self.name}: columns [{start}, {stop}) cut {self.qtype.name} blocks of {traits.block_values}")
        per = traits.block_bytes if traits.block_values > 1 else 1
        lo, hi = start // traits.block_values * per, stop // traits.block_values * per
        return Tensor(self.name, self.qtype, (self.shape[0], stop - start), np.ascontiguousarray(self.data[:, lo:hi]))


@dataclass(frozen=True)
class GGUFModel:
    path: Path
    config: ModelConfig
    metadata: dict[str, Any]
    tensors: dict[str, Tensor]

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"missing tensor {name!r}") from None

    def output_tensor(self) -> Tensor:
        return self.tensor("token_embd.weight" if self.config.tied_output else "output.weight")

    def release(self) -> None:
        """Drop the file's pages from this process's resident set (memory.release; they stay in the page
        cache): once an engine holds its packed copy and a root has cut its workers' slices, nothing here
        reads them until the next plan."""
        for t in self.tensors.values():
            release(t.data)


def load_model(path: os.PathLike | str) -> GGUFModel:
    """Open and validate a GGUF model of a known family (formats/arch.py). Raises ModelFileError,
    never a deep traceback. A file using anything not implemented (architecture, tensor type, RoPE
    scaling, unexpected tensors) is refused with one message naming every such item at once."""
    path = Path(path)
    _check_header(path)
    header = _parse(path, with_tensors=True)
    tensors, unsupported = _read_tensors(path, header)
    config = _config_from(path, header, unsupported)
    if unsupported:
        raise ModelFileError(path, "; ".join(unsupported))
    assert config is not None  # only None with an unsupported architecture
    _check_tensors(path, config, tensors)
    return GGUFModel(path, config, header.metadata, tensors)


def load_metadata(path: os.PathLike | str) -> dict[str, Any]:
    """Just the key/value metadata (tokenizer, chat template, hyperparameters) as Python values."""
    path = Path(path)
    _check_header(path)
    return _parse(path, with_tensors=False).metadata


# tensor storage as numpy sees it: block types as bytes (rows, row_bytes), the rest element-wise
_ELEMENT_DTYPES = {QType.F32: np.dtype("<f4"), QType.F16: np.dtype("<f2"), QType.BF16: np.dtype("<u2")}


def _read_tensors(path: Path, header: _Header) -> tuple[dict[str, Tensor], list[str]]:
    """Views of every tensor of a supported type, and a problem line per unsupported type."""
    size = len(header.buffer)
    tensors: dict[str, Tensor] = {}
    bad_types: dict[int, list[str]] = {}  # raw type id -> names of its tensors
    for info in header.tensors:
        try:
            qtype = QType(info.raw_type)
        except ValueError:
            bad_types.setdefault(info.raw_type, []).append(info.name)
            continue
        shape = tuple(reversed(info.dims))  # GGUF lists ne0 (cols) first
        k, traits = shape[-1], TRAITS[qtype]
        if k % traits.block_values:
            raise ModelFileError(
                path, f"tensor {info.name!r} has rows of {k} values, not a multiple of {qtype.name}'s block"
            )
        row_bytes = traits.row_bytes(k)
        n_bytes = math.prod(shape[:-1]) * row_bytes
        if info.offset + n_bytes > size:
            raise ModelFileError(path, f"file is truncated: tensor {info.name!r} ends past the end of the file")
        dtype = _ELEMENT_DTYPES.get(qtype)
        if dtype is None:
            data = np.frombuffer(header.buffer, np.uint8, n_bytes, info.offset).reshape(*shape[:-1], row_bytes)
        else:
            data = np.frombuffer(header.buffer, dtype, n_bytes // dtype.itemsize, info.offset).reshape(shape)
        tensors[info.name] = Tensor(info.name, qtype, shape, data)
    problems = []
    for raw_type, names in bad_types.items():
        what = f"tensor {names[0]!r}" if len(names) == 1 else f"{len(names)} tensors ({_some(names)})"
        problems.append(f"{what} {'has' if len(names) == 1 else 'have'} unsupported type {_type_name(raw_type)}")
    if problems:
        problems[-1] += f" (supported: {', '.join(q.name for q in QType)})"
    return tensors, problems


def _some(names: list[str], n: int = 3) -> str:
    """The first n names quoted, then how many more."""
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


def _config_from(path: Path, header: _Header, unsupported: list[str]) -> ModelConfig | None:
    """The file's ModelConfig from its family's description and its metadata. Appends to `unsupported`
    every feature the file uses that the engines do not implement; None if the family is unknown."""
    md = header.metadata
    infos = {t.name: t for t in header.tensors}
    arch = md.get("general.architecture")
    family = FAMILIES.get(arch)  # type: ignore[arg-type]
    if family is None:
        unsupported.insert(0, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        return None

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise ModelFileError(path, f"missing metadata key {full!r}")
        return md[full]

    dim = int(need("embedding_length"))
    n_layers = int(need("block_count"))
    n_heads = int(need("attention.head_count"))
    n_kv_heads = int(md.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
    value_dim = int(md.get(f"{arch}.attention.value_length", head_dim))
    if n_heads % n_kv_heads:
        raise ModelFileError(path, f"{n_heads} heads do not group evenly over {n_kv_heads} KV heads")
    if value_dim != head_dim:
        unsupported.append(f"value heads of {value_dim} differ from key heads of {head_dim}")
    if int(md.get(f"{arch}.expert_count", 0) or 0) > 0:
        unsupported.append(f"mixture of experts ({arch}.expert_count = {md[f'{arch}.expert_count']})")
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        embd = infos.get("token_embd.weight")
        vocab = len(md.get("tokenizer.ggml.tokens", ())) or (embd.dims[-1] if embd else 0)
    rope_dim = int(md.get(f"{arch}.rope.dimension_count", head_dim))
    freq_factors, scaling_factor = _rope_scaling(path, family, md, header, rope_dim, unsupported)
    sliding_window = int(need("attention.sliding_window")) if family.sliding_pattern else 0
    config = ModelConfig(
        arch=arch,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(need("feed_forward_length")),
        vocab_size=int(vocab),
        context_length=int(md.get(f"{arch}.context_length", 2048)),
        rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=rope_dim,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tied_output="output.weight" not in infos,
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        post_norms=family.post_norms,
        activation=family.activation,
        embed_scale=family.embed_scale(dim),
        attn_scale=family.attn_scale(dim, n_heads, n_layers, head_dim),
        rope_neox=family.rope_neox,
        rope_freq_factors=freq_factors,
        rope_scaling_factor=scaling_factor,
        sliding_window=sliding_window,
        sliding_layers=family.sliding_layers(n_layers) if sliding_window else (),
        rope_base_local=family.rope_base_local if sliding_window else None,
    )
    unexpected = sorted(set(infos) - set(expected_shapes(config)))
    if unexpected:
        unsupported.append(f"tensors {arch} does not use: {_some(_by_layer(unexpected), 6)}")
    return config


def _by_layer(names: list[str]) -> list[str]:
    """Tensor names with per-layer ones folded: 'blk.*.x.weight (n layers)'."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".", 2)
        key = f"blk.*.{parts[2]}" if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() else name
        counts[key] = counts.get(key, 0) + 1
    return [k if n == 1 and not k.startswith("blk.*") else f"{k} ({n} layers)" for k, n in counts.items()]


def _rope_scaling(
    path: Path, family: Family, md: dict[str, Any], header: _Header, rope_dim: int, unsupported: list[str]
) -> tuple[tuple[float, ...] | None, float]:
    """(per-frequency angle divisors or None, linear scaling factor) from the file's RoPE scaling."""
    arch = family.name
    kind = str(md.get(f"{arch}.rope.scaling.type", ROPE_SCALING_NONE) or ROPE_SCALING_NONE)
    factor = float(md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear", 1.0)) or 1.0)
    freqs = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    if kind not in family.rope_scalings:
        unsupported.append(
            f"unsupported RoPE scaling {kind!r} (supported for {arch}: {', '.join(family.rope_scalings)})"
        )
        return None, 1.0
    if kind == ROPE_SCALING_LLAMA3 and freqs is None:
        unsupported.append("RoPE scaling 'llama3' without its rope_freqs.weight tensor")
    linear = factor if kind == "linear" else 1.0
    if freqs is None or not family.rope_freqs_tensor:
        return None, linear  # a rope_freqs tensor in another family is reported as unexpected
    if freqs.raw_type != QType.F32 or freqs.dims != (rope_dim // 2,):
        raise ModelFileError(path, f"tensor 'rope_freqs.weight' must be F32 of {rope_dim // 2} values")
    values = np.frombuffer(header.buffer, "<f4", rope_dim // 2, freqs.offset)
    return tuple(float(v) for v in values), linear


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config must have, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.vocab_size, c.dim),
        "output_norm.weight": (c.dim,),
    }
    if not c.tied_output:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    if c.rope_freq_factors is not None:
        shapes["rope_freqs.weight"] = (c.rope_dim // 2,)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (c.dim,)
        shapes[p + "attn_q.weight"] = (c.q_dim, c.dim)
        shapes[p + "attn_k.weight"] = (c.kv_dim, c.dim)
        shapes[p + "attn_v.weight"] = (c.kv_dim, c.dim)
        if c.qkv_bias:
            shapes[p + "attn_q.bias"] = (c.q_dim,)
            shapes[p + "attn_k.bias"] = (c.kv_dim,)
            shapes[p + "attn_v.bias"] = (c.kv_dim,)
        if c.qk_norm:
            shapes[p + "attn_q_norm.weight"] = (c.head_dim,)
            shapes[p + "attn_k_norm.weight"] = (c.head_dim,)
        shapes[p + "attn_output.weight"] = (c.dim, c.q_dim)
        if c.post_norms:
            shapes[p + "post_attention_norm.weight"] = (c.dim,)
        shapes[p + "ffn_norm.weight"] = (c.dim,)
        shapes[p + "ffn_gate.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "ffn_up.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "ffn_down.weight"] = (c.dim, c.ffn_dim)
        if c.post_norms:
            shapes[p + "post_ffw_norm.weight"] = (c.dim,)
    return shapes


def _check_tensors(path: Path, config: ModelConfig, tensors: dict[str, Tensor]) -> None:
    for name, shape in expected_shapes(config).items():
        t = tensors.get(name)
        if t is None:
            raise ModelFileError(path, f"missing tensor {name!r}")
        if t.shape != shape:
            raise ModelFileError(path, f"tensor {name!r} has shape {t.shape}, the model's metadata needs {shape}")
