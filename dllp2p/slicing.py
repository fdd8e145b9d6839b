"""Cut a model's tensors into one node's slices, in ggml storage, each with its sha256. Pure numpy.

For a NodeSlice (see scheduler) with q rows [q0, q1), kv rows [k0, k1), FFN rows [f0, f1) and
vocabulary rows [v0, v1), the node holds (per layer; shapes numpy order, rows first):

    attn_norm, ffn_norm     whole               (dim,)
    attn_q                  rows [q0, q1)       (q1 - q0, dim)
    attn_k, attn_v          rows [k0, k1)       (k1 - k0, dim)
    attn_output             columns [q0, q1)    (dim, q1 - q0)
    ffn_gate, ffn_up        rows [f0, f1)       (f1 - f0, dim)
    ffn_down                columns [f0, f1)    (dim, f1 - f0)

and once: token_embd and output_norm whole (every node embeds tokens itself), and "output.weight",
rows [v0, v1) of the output projection (of token_embd when the model ties them).

A row slice of raw storage is a view (of the memory-mapped file); a column slice of a block-quantized
tensor keeps whole blocks: columns [c0, c1) of u8[rows, row_bytes] are bytes
[c0 / 32 * block_bytes, c1 / 32 * block_bytes) of every row, so c0 and c1 must be multiples of 32
(head_dim and the plan's FFN ranges are). Column slices are copies. `sha256` is over the slice's raw
bytes, C order: the content address of a worker's weight cache.

Errors: SliceError (a ValueError) for a slice that cannot be cut (misaligned columns, out of range).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .formats import GGUFModel, ModelConfig
from .formats.quant import TRAITS, QType, dequantize
from .scheduler import NodeSlice

ALL = (0, None)  # a whole axis: (start, None)


class SliceError(ValueError):
    """A tensor slice that cannot be cut as asked."""


@dataclass(frozen=True)
class SliceSpec:
    """Which part of which model tensor a node's tensor is: rows and columns, half-open."""

    source: str  # tensor name in the model file
    rows: tuple[int, int | None]  # (start, stop); stop None = to the end
    cols: tuple[int, int | None]  # likewise; 1-D tensors are always whole


@dataclass(frozen=True)
class SliceTensor:
    name: str  # the node's name for it (the model's, and "output.weight" for the output projection)
    qtype: QType
    shape: tuple[int, ...]  # logical shape, numpy order
    data: np.ndarray  # C-contiguous raw storage: u8[rows, row_bytes] for block types, f32/f16/u16 otherwise
    sha256: str  # of data's bytes, lowercase hex
    spec: SliceSpec

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def slice_id(self) -> str:
        """The cut, readable: e.g. 'blk.0.attn_output.weight[:, 0:128]'."""
        def axis(r: tuple[int, int | None]) -> str:
            return ":" if r == ALL else f"{r[0]}:{'' if r[1] is None else r[1]}"

        if len(self.shape) == 1:
            return f"{self.spec.source}[{axis(self.spec.rows)}]"
        return f"{self.spec.source}[{axis(self.spec.rows)}, {axis(self.spec.cols)}]"

    def dequantize(self) -> np.ndarray:
        """f32[shape]: a fresh array."""
        return dequantize(self.data, self.qtype, self.shape)


def slice_specs(config: ModelConfig, node: NodeSlice) -> dict[str, SliceSpec]:
    """The node's tensor names -> what to cut, from the model's shape alone (no weights read)."""
    q, kv, ffn = node.q_rows, node.kv_rows, node.ffn_rows
    out: dict[str, SliceSpec] = {
        "token_embd.weight": SliceSpec("token_embd.weight", ALL, ALL),
        "output_norm.weight": SliceSpec("output_norm.weight", ALL, ALL),
    }
    for i in range(config.n_layers):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": SliceSpec(p + "attn_norm.weight", ALL, ALL),
            p + "attn_q.weight": SliceSpec(p + "attn_q.weight", q, ALL),
            p + "attn_k.weight": SliceSpec(p + "attn_k.weight", kv, ALL),
            p + "attn_v.weight": SliceSpec(p + "attn_v.weight", kv, ALL),
            p + "attn_output.weight": SliceSpec(p + "attn_output.weight", ALL, q),
            p + "ffn_norm.weight": SliceSpec(p + "ffn_norm.weight", ALL, ALL),
            p + "ffn_gate.weight": SliceSpec(p + "ffn_gate.weight", ffn, ALL),
            p + "ffn_up.weight": SliceSpec(p + "ffn_up.weight", ffn, ALL),
            p + "ffn_down.weight": SliceSpec(p + "ffn_down.weight", ALL, ffn),
        })
    source = "token_embd.weight" if config.tied_output else "output.weight"
    out["output.weight"] = SliceSpec(source, node.vocab_rows, ALL)
    return out


def cut(name: str, qtype: QType, shape: tuple[int, ...], data: np.ndarray, spec: SliceSpec) -> SliceTensor:
    """Raw storage data (u8[rows, row_bytes] or float[rows, cols] / [n]) of logical `shape` -> the slice."""
    r0, r1 = _bounds(spec.rows, shape[0], f"{spec.source} rows")
    if len(shape) == 1:
        if spec.cols != ALL:
            raise SliceError(f"{spec.source} is 1-D: it has no columns to slice")
        part, out_shape = data[r0:r1], (r1 - r0,)
    else:
        c0, c1 = _bounds(spec.cols, shape[1], f"{spec.source} columns")
        traits = TRAITS[qtype]
        if (c0, c1) == (0, shape[1]):
            part = data[r0:r1]
        elif traits.block_values > 1:
            if c0 % traits.block_values or c1 % traits.block_values:
                raise SliceError(
                    f"{spec.source}: columns [{c0}, {c1}) cut {qtype.name} blocks of {traits.block_values}"
                )
            per = traits.block_bytes
            part = data[r0:r1, c0 // traits.block_values * per : c1 // traits.block_values * per]
        else:
            part = data[r0:r1, c0:c1]
        out_shape = (r1 - r0, c1 - c0)
    part = np.ascontiguousarray(part)
    return SliceTensor(name, qtype, out_shape, part, hashlib.sha256(part.data).hexdigest(), spec)


def node_tensors(model: GGUFModel, node: NodeSlice) -> dict[str, SliceTensor]:
    """Every tensor node `node` holds, cut from the model. Raises SliceError, ModelFileError."""
    out = {}
    for name, spec in slice_specs(model.config, node).items():
        t = model.tensor(spec.source)
        out[name] = cut(name, t.qtype, t.shape, t.data, spec)
    return out


def _bounds(r: tuple[int, int | None], size: int, what: str) -> tuple[int, int]:
    start, stop = r[0], size if r[1] is None else r[1]
    if not 0 <= start < stop <= size:
        raise SliceError(f"{what} [{start}, {stop}) are not a non-empty range within [0, {size})")
    return start, stop
