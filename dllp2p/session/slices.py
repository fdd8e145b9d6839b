"""What a node keeps of the weights between sessions, and what a root computes once per plan.

    node_id      this node's stable id, <state dir>/node_id, made once
    SliceCache   a worker's weight slices on disk, content-addressed: <state dir>/slices/<sha256> holds one
                 slice's raw ggml bytes, written atomically (diskcache: temporary file, fsync, rename, fsync
                 of the directory), verified again when read (size, sha256) and read as a map of the file
                 (mapped: a session's engine packs from it, no copy in memory); a file that fails is deleted
                 with one log line (and asked for again: the worker's Need names it). Kept within a size
                 budget (DaemonConfig.cache_mb), the least recently used slices going first; a full disk
                 (ENOSPC, EDQUOT) first evicts every slice the session does not use, then raises
    PlanSlices   a root's node_tensors (the slices as recipes, tp.CutTensor, and their sha256: no weights)
                 per plan shape: hashing every slice of a 100 MB model takes a while, and every request with
                 the same members has the same plan but for its epoch, so each plan shape is hashed once
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..diskcache import disk_full, evict, touch, write_atomically
from ..formats import QType
from ..formats.quant import TRAITS
from ..memory import release
from ..pipeline import with_epoch
from ..scheduler import Plan
from ..wire.messages import SliceInfo

log = logging.getLogger("dllp2p.daemon")

def node_id(state_dir: Path) -> str:
    """This node's stable id: read from state_dir/node_id, made (hostname + random) the first time."""
    path = state_dir / "node_id"
    if path.is_file():
        text = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
            return text
        log.warning("%s holds no valid node id; making a new one", path)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40].strip("-") or "node"
    ident = f"{host}-{secrets.token_hex(4)}"
    _write_atomically(path, ident.encode() + b"\n")
    return ident


SLICE_CACHE_BYTES = 4096 << 20  # the default budget (DaemonConfig.cache_mb)


class SliceCache:
    """Weight slices on disk, content-addressed: <directory>/<sha256> holds the slice's raw bytes."""

    def __init__(self, directory: Path, budget: int = SLICE_CACHE_BYTES):
        self.directory = directory
        self.budget = budget
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.directory / sha256

    def load(self, sha256: str, nbytes: int) -> bytes | None:
        """The slice's bytes, or None if absent or damaged (a damaged file is deleted): mapped's, copied."""
        data = self.mapped(sha256, nbytes)
        return None if data is None else data.tobytes()

    def mapped(self, sha256: str, nbytes: int, verify: bool = True) -> np.ndarray | None:
        """The slice as u8[nbytes] over a read-only map of its file, or None if absent or damaged (then
        deleted, as load). Not read into memory: packing it releases its pages (memory.release), so a
        worker holds no second copy of its slices beside its engine's. verify: hash it first, piece by
        piece (its pages released behind); False only for a file this process just stored from bytes it
        verified."""
        path = self.path(sha256)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != nbytes:
                    raise ValueError(f"{size} bytes, expected {nbytes}")
                data = (np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8) if nbytes
                        else np.zeros(0, np.uint8))  # an empty file cannot be mapped; its hash is still checked
            if verify and _digest(data) != sha256:
                raise ValueError("content does not match its hash")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("cache file %s is damaged (%s); dropping it", path, e)
            path.unlink(missing_ok=True)
            return None
        touch(path)
        return data

    def store(self, sha256: str, data: bytes, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Store a slice, then evict the least recently used beyond the budget (never one in `keep`: the
        session's). On a full disk, every slice but those in `keep` goes and the write is tried once more;
        OSError (diskcache.disk_full tells a full disk) if that fails too."""
        keep_paths = [self.path(k) for k in (*keep, sha256)]
        try:
            write_atomically(self.path(sha256), [data])
        except OSError as e:
            if not disk_full(e):
                raise
            gone = evict(self._files(), 0, keep_paths)
            log.warning("disk full in %s: dropped %d cached slices, trying again", self.directory, len(gone))
            write_atomically(self.path(sha256), [data])
        evict(self._files(), self.budget, keep_paths)

    def _files(self) -> list[Path]:
        return [p for p in self.directory.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)]

    def keys(self) -> list[str]:
        return sorted(p.name for p in self._files())


def _digest(data: np.ndarray, piece: int = 16 << 20) -> str:
    h = hashlib.sha256()
    for at in range(0, len(data), piece):
        h.update(data[at:at + piece])
        release(data[at:at + piece])
    return h.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, [data])


def storage_array(qtype: QType, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """A slice's raw bytes -> its ggml storage array: u8[..., row_bytes] for block types, else f32/f16/u16."""
    if TRAITS[qtype].block_values > 1:
        return np.frombuffer(data, np.uint8).reshape(*shape[:-1], TRAITS[qtype].row_bytes(shape[-1]))
    dtype = {QType.F32: np.float32, QType.F16: np.float16, QType.BF16: np.uint16}[qtype]
    return np.frombuffer(data, dtype).reshape(shape)


def check_slices(slices: tuple[SliceInfo, ...]) -> None:
    """A session's slice list: one sha256 never names slices of different sizes. Raises ValueError."""
    sizes: dict[str, int] = {}
    for si in slices:
        if sizes.setdefault(si.sha256, si.nbytes) != si.nbytes:
            raise ValueError(f"{si.tensor}: one sha256 for slices of different sizes")


class PlanSlices:
    """node_tensors(model, plan, index), remembered for the latest `keep` plan shapes (a plan but for its
    epoch) of one model. Thread-safe enough for its one caller at a time (the root's slot)."""

    def __init__(self, node_tensors: Callable[[Any, Plan, int], dict[str, Any]], keep: int = 2):
        self._node_tensors = node_tensors
        self._keep = keep
        self._known: dict[tuple[int, Plan, int], dict[str, Any]] = {}

    def __call__(self, model: Any, plan: Plan, index: int) -> dict[str, Any]:
        key = (id(model), with_epoch(plan, 0), index)
        tensors = self._known.pop(key, None)
        if tensors is None:
            tensors = self._node_tensors(model, plan, index)
        self._known[key] = tensors  # the most recent last
        shapes = list(dict.fromkeys(k[:2] for k in self._known))
        for old in shapes[:-self._keep]:
            for k in [k for k in self._known if k[:2] == old]:
                del self._known[k]
        return tensors
