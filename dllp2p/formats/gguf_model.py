"""GGUF file -> (frozen ModelConfig, memory-mapped tensors, metadata), with clear errors.

The container is parsed by the `gguf` package; everything it raises is converted here into one
`ModelFileError` that names the file and the problem. Tensors are numpy views on the memory map:
nothing is copied until a caller dequantizes or repacks a tensor.

Tensor names and shapes (numpy order, rows first) for the Llama architecture:

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .quant import TRAITS, QType, dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama",)


class ModelFileError(Exception):
    """A model file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class ModelConfig:
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


def load_model(path: os.PathLike | str) -> GGUFModel:
    """Open and validate a GGUF Llama model. Raises ModelFileError, never a deep traceback."""
    path = Path(path)
    _check_header(path)
    reader = _open_reader(path)
    metadata = _read_metadata(path, reader)
    tensors = _read_tensors(path, reader)
    config = _config_from(path, metadata, tensors)
    _check_tensors(path, config, tensors)
    return GGUFModel(path, config, metadata, tensors)


def load_metadata(path: os.PathLike | str) -> dict[str, Any]:
    """Just the key/value metadata (tokenizer, chat template, hyperparameters) as Python values."""
    path = Path(path)
    _check_header(path)
    return _read_metadata(path, _open_reader(path))


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelFileError(path, f"cannot open: {e.strerror}") from None
    if len(head) < 8:
        raise ModelFileError(path, "file is truncated (shorter than a GGUF header)")
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, EOFError, OSError, MemoryError) as e:
        hint = "file is truncated or corrupted"
        raise ModelFileError(path, f"{hint} ({type(e).__name__}: {str(e)[:120]})") from None


def _read_metadata(path: Path, reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelFileError(path, f"metadata key {key!r} is corrupted ({e})") from None
        out[key] = value
    return out


def _read_tensors(path: Path, reader) -> dict[str, Tensor]:
    size = os.path.getsize(path)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        raw_type = int(t.tensor_type)
        try:
            qtype = QType(raw_type)
        except ValueError:
            name = getattr(t.tensor_type, "name", str(raw_type))
            raise ModelFileError(
                path,
                f"tensor {t.name!r} has unsupported type {name} "
                f"(supported: {', '.join(q.name for q in QType)})",
            ) from None
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # GGUF lists ne0 (cols) first
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(path, f"file is truncated: tensor {t.name!r} ends past the end of the file")
        k = shape[-1]
        expected = int(np.prod(shape[:-1], dtype=np.int64)) * TRAITS[qtype].row_bytes(k)
        if int(t.n_bytes) != expected:
            raise ModelFileError(path, f"tensor {t.name!r} holds {t.n_bytes} bytes, its shape needs {expected}")
        data = np.asarray(t.data)
        if qtype in (QType.Q4_0, QType.Q4_1, QType.Q8_0):
            data = data.reshape(*shape[:-1], TRAITS[qtype].row_bytes(k))
        else:
            data = data.reshape(shape)
        tensors[t.name] = Tensor(t.name, qtype, shape, data)
    return tensors


def _config_from(path: Path, md: dict[str, Any], tensors: dict[str, Tensor]) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise ModelFileError(path, f"missing metadata key {full!r}")
        return md[full]

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv_heads = int(md.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
    if n_heads % n_kv_heads:
        raise ModelFileError(path, f"{n_heads} heads do not group evenly over {n_kv_heads} KV heads")
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(md.get("tokenizer.ggml.tokens", ())) or tensors["token_embd.weight"].shape[0]
    return ModelConfig(
        arch=arch,
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(need("feed_forward_length")),
        vocab_size=int(vocab),
        context_length=int(md.get(f"{arch}.context_length", 2048)),
        rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(md.get(f"{arch}.rope.dimension_count", head_dim)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tied_output="output.weight" not in tensors,
    )


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama model must have, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.vocab_size, c.dim),
        "output_norm.weight": (c.dim,),
    }
    if not c.tied_output:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (c.dim,)
        shapes[p + "attn_q.weight"] = (c.q_dim, c.dim)
        shapes[p + "attn_k.weight"] = (c.kv_dim, c.dim)
        shapes[p + "attn_v.weight"] = (c.kv_dim, c.dim)
        shapes[p + "attn_output.weight"] = (c.dim, c.q_dim)
        shapes[p + "ffn_norm.weight"] = (c.dim,)
        shapes[p + "ffn_gate.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "ffn_up.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "ffn_down.weight"] = (c.dim, c.ffn_dim)
    return shapes


def _check_tensors(path: Path, config: ModelConfig, tensors: dict[str, Tensor]) -> None:
    for name, shape in expected_shapes(config).items():
        t = tensors.get(name)
        if t is None:
            raise ModelFileError(path, f"missing tensor {name!r}")
        if t.shape != shape:
            raise ModelFileError(path, f"tensor {name!r} has shape {t.shape}, the model's metadata needs {shape}")
