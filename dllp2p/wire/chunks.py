"""Weight slices on the wire: one slice's raw ggml bytes cut into WeightChunks, and put back together
(in order, per tensor) with its sha256 checked. Sans I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from ..formats.quant import QType
from .codec import ChunkError, SliceHashMismatch
from .messages import MAX_CHUNK, WeightChunk


def weight_chunks(
    epoch: int,
    tensor: str,
    slice_id: str,
    qtype: QType,
    shape: tuple[int, ...],
    data: bytes | memoryview,
    sha256: str,
    chunk_size: int = MAX_CHUNK,
    *,
    start: int = 0,
    total: int | None = None,
) -> Iterator[WeightChunk]:
    """One slice's raw bytes -> WeightChunks of at most chunk_size bytes, in order (no copies). Or a piece
    of it: `data` is bytes [start, start + len(data)) of a slice of `total` bytes (a root cutting a slice
    from the model's map piece by piece: formats/cuts.py)."""
    if not 0 < chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size {chunk_size} is not in 1..{MAX_CHUNK}")
    view = memoryview(data).cast("B")
    total = len(view) if total is None else total
    for offset in range(0, len(view), chunk_size):
        part = view[offset : offset + chunk_size]
        yield WeightChunk(epoch, tensor, slice_id, int(qtype), tuple(shape), start + offset, total, sha256, part)


@dataclass(frozen=True)
class AssembledSlice:
    tensor: str
    slice_id: str
    qtype: QType
    shape: tuple[int, ...]
    sha256: str
    data: bytes


class SliceAssembler:
    """Reassembles weight slices from their chunks (in order, per tensor) and checks their sha256.

    Error handling: a chunk out of order or disagreeing with its slice's first chunk raises ChunkError,
    a finished slice with another hash SliceHashMismatch; either way that slice is dropped and the
    assembler goes on with the others.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[WeightChunk, bytearray]] = {}
        self.received_bytes = 0

    @property
    def pending(self) -> tuple[str, ...]:
        """Tensors with some but not all of their bytes."""
        return tuple(self._open)

    def add(self, chunk: WeightChunk) -> AssembledSlice | None:
        """-> the whole slice once its last chunk arrives, else None."""
        first, buf = self._open.get(chunk.tensor, (chunk, bytearray()))
        meta = ("epoch", "slice_id", "qtype", "shape", "total", "sha256")
        if any(getattr(chunk, m) != getattr(first, m) for m in meta):
            del self._open[chunk.tensor]
            raise ChunkError(f"{chunk.tensor}: chunk at {chunk.offset} disagrees with the slice's first chunk")
        if chunk.offset != len(buf):
            self._open.pop(chunk.tensor, None)
            raise ChunkError(f"{chunk.tensor}: chunk at byte {chunk.offset}, expected byte {len(buf)}")
        buf += chunk.data
        self.received_bytes += len(chunk.data)
        if len(buf) < chunk.total:
            self._open[chunk.tensor] = (first, buf)
            return None
        self._open.pop(chunk.tensor, None)
        digest = hashlib.sha256(buf).hexdigest()
        if digest != chunk.sha256:
            raise SliceHashMismatch(
                f"{chunk.tensor}: received bytes hash to {digest[:16]}.., announced {chunk.sha256[:16]}.."
            )
        return AssembledSlice(chunk.tensor, chunk.slice_id, QType(chunk.qtype), chunk.shape, chunk.sha256, bytes(buf))
