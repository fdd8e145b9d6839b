"""A node's slice of a model tensor as a recipe: cut from the model's memory map when asked for, piece by
piece, so a root hashes and pushes its workers' slices without ever holding them (or the whole model).

    cut = Cut.whole(tensor)          every row of a tensor's storage, whole
    cut.ordered(rows)                its rows taken in another order (NEOX Q/K rows: jit.family.arranged_rows)
    cut.row_range(a, b)              rows [a, b) of the cut (Tensor.rows)
    cut.column_range(a, b)           logical columns [a, b) of every row, whole blocks only (Tensor.columns)
    cut.array()                      the slice's ggml storage, as Tensor.data: u8[rows, row_bytes] for block
                                     types, the element dtype otherwise; a view of the map where the cut is
                                     whole rows in order, else a copy (the map's pages it read released)
    cut.pieces(limit)                the same bytes in order: contiguous u8[n] arrays of about `limit` bytes
                                     (whole rows; one row at least). Each piece is a view of the map (whole
                                     rows in order) or a copy; the map's pages behind a piece are dropped
                                     from the resident set (memory.release) when the next is asked for
    cut.sha256()                     hashed from its pieces: the slice is never whole in memory

Storage is seen as byte rows: a block type's storage rows as they are; an element type's (f32, f16, bf16)
matrix rows as bytes; a vector (norms, biases) as one element per row, so cutting or reordering its
elements is cutting or reordering rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from ..memory import release
from .gguf_model import Tensor
from .quant import TRAITS

PIECE_BYTES = 4 << 20  # the default piece: wire.messages.MAX_CHUNK, one WeightChunk


def _byte_rows(t: Tensor) -> np.ndarray:
    """u8[rows, bytes] over t's storage (a view)."""
    d = t.data
    if TRAITS[t.qtype].block_values > 1:
        return d.reshape(-1, d.shape[-1])
    if d.ndim == 1:
        return d.view(np.uint8).reshape(d.shape[0], d.itemsize)
    return d.reshape(-1, d.shape[-1]).view(np.uint8)


@dataclass(frozen=True)
class Cut:
    source: Tensor  # the model's tensor (a view of the memory map)
    rows: range | np.ndarray  # the source's byte rows the slice takes, in its order
    lo: int  # bytes [lo, hi) of each byte row
    hi: int
    shape: tuple[int, ...]  # the slice's logical shape

    @classmethod
    def whole(cls, t: Tensor) -> Cut:
        n, width = _byte_rows(t).shape
        return cls(t, range(n), 0, width, tuple(t.shape))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * (self.hi - self.lo)

    def ordered(self, rows: np.ndarray) -> Cut:
        """The cut's rows in the order `rows` (indices into its current rows)."""
        return replace(self, rows=np.asarray(self.rows)[np.asarray(rows)])

    def row_range(self, start: int, stop: int) -> Cut:
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"{self.source.name}: rows [{start}, {stop}) of a {self.shape} tensor")
        return replace(self, rows=self.rows[start:stop], shape=(stop - start, *self.shape[1:]))

    def column_range(self, start: int, stop: int) -> Cut:
        """Columns [start, stop) of a matrix; block types keep whole blocks (ValueError otherwise)."""
        t, traits = self.source, TRAITS[self.source.qtype]
        if len(self.shape) != 2 or not 0 <= start < stop <= self.shape[1] or (self.lo, self.hi) != (0, self._width):
            raise ValueError(f"{t.name}: columns [{start}, {stop}) are not a range of a {self.shape} matrix")
        if start % traits.block_values or stop % traits.block_values:
            raise ValueError(f"{t.name}: columns [{start}, {stop}) cut {t.qtype.name} blocks of {traits.block_values}")
        per = traits.block_bytes if traits.block_values > 1 else t.data.itemsize
        return replace(self, lo=start // traits.block_values * per, hi=stop // traits.block_values * per,
                       shape=(self.shape[0], stop - start))

    @property
    def _width(self) -> int:
        return _byte_rows(self.source).shape[1]

    def array(self) -> np.ndarray:
        """The slice's storage (module docstring): a view of the map when it is whole rows in order."""
        b = _byte_rows(self.source)
        if isinstance(self.rows, range) and self.rows.step == 1:
            part = b[self.rows.start:self.rows.stop, self.lo:self.hi]
            read = b[self.rows.start:self.rows.stop]
        else:
            part = b[np.asarray(self.rows), self.lo:self.hi]
            read = b[int(np.min(self.rows)):int(np.max(self.rows)) + 1]
        t = self.source
        data = np.ascontiguousarray(part)
        if not np.may_share_memory(data, b):  # a copy: the map's pages it was read from go
            release(read)
        if TRAITS[t.qtype].block_values > 1:
            return data.reshape(*self.shape[:-1], self.hi - self.lo)
        return data.view(t.data.dtype).reshape(self.shape)

    def pieces(self, limit: int = PIECE_BYTES) -> Iterator[np.ndarray]:
        """The slice's bytes in order, whole rows at a time (module docstring)."""
        b = _byte_rows(self.source)
        step = max(1, limit // max(1, self.hi - self.lo))
        for i in range(0, len(self.rows), step):
            rows = self.rows[i:i + step]
            if isinstance(rows, range) and rows.step == 1:
                block = b[rows.start:rows.stop]
                piece = block[:, self.lo:self.hi]
            else:
                first, last = int(np.min(rows)), int(np.max(rows)) + 1
                block = b[first:last]
                piece = block[np.asarray(rows) - first, self.lo:self.hi]
            yield np.ascontiguousarray(piece).reshape(-1)
            release(block)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for piece in self.pieces():
            h.update(piece)
        return h.hexdigest()
