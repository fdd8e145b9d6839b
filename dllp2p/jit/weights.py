"""A model's weights in the kernels' layouts, in one file laid out in the order a token reads them.

    packed = load_packed(model, cache_dir)     # first start: pack (~1-2 s) and write; then: mmap (~ms)

File `<cache_dir>/<key>.bin`, key = hash(model path, size, mtime, LAYOUT_VERSION):

    b"DLPACK01" | u64 index length | index (JSON: name -> [offset, nbytes, qtype, rows, k]) | blobs

Blobs start on 4 KiB boundaries, in execution order: the norms, then per layer Q, K, V, O, gate, up,
down, then the output projection. One decode step therefore reads the file front to back, so the
kernels' software prefetch (which runs past the end of a matrix) and the hardware prefetchers see
one long stream instead of 211 short ones. The file is mapped read-only: weights cost page cache,
shared between processes, not private memory; the GGUF's own tensor pages are never touched.
A file that is missing, truncated or unreadable is rebuilt; nothing else trusts its contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..formats import GGUFModel, ModelConfig, QType
from ..formats.quant import dequantize
from .family import arranged, layer_extra_names
from .layout import PackedMatrix, aligned_empty, pack_weights

LAYOUT_VERSION = 1
MAGIC = b"DLPACK01"
BLOB_ALIGN = 4096
LAYER_ORDER = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class PackedModel:
    """Every weight the JIT engine reads: matrices packed (layout.py), norms as f32[dim]."""

    matrices: dict[str, PackedMatrix]
    norms: dict[str, np.ndarray]
    bytes_per_token: int  # weight bytes one decode step streams: layers + norms + output projection
    path: Path | None = None  # the cache file, when mapped from one


def execution_order(config: ModelConfig, output: bool) -> list[str]:
    """Tensor names in the order a token reads them; with `output`, a separate "output.weight" last (an
    untied model's, or a tensor-parallel node's own slice)."""
    names = ["output_norm.weight"]
    for i in range(config.n_layers):
        names += [f"blk.{i}.{n}.weight" for n in LAYER_ORDER] + layer_extra_names(config, i)
    names.append("token_embd.weight")
    if output:
        names.append("output.weight")
    return names


def pack(names: list[str], tensor: Callable[[str], object], out_name: str) -> PackedModel:
    """In memory, no cache: each named tensor (anything with qtype, shape and raw data) packed for the
    kernels; norms as f32 (BF16 widened to F32 exactly: the kernels read F32/F16, not BF16). out_name:
    the output projection, counted in the bytes a token reads (the embedding is not: one row a token)."""
    matrices, norms = {}, {}
    for name in names:
        t = tensor(name)
        if len(t.shape) == 1:
            arr = aligned_empty(t.shape, np.float32)
            arr[...] = dequantize(t.data, t.qtype, t.shape)
            norms[name] = arr
        elif t.qtype == QType.BF16:
            matrices[name] = pack_weights(dequantize(t.data, t.qtype, t.shape), QType.F32, t.shape)
        else:
            matrices[name] = pack_weights(t.data, t.qtype, t.shape)
    layers = sum(m.nbytes for n, m in matrices.items() if n.startswith("blk."))
    return PackedModel(matrices, norms, layers + matrices[out_name].nbytes + sum(a.nbytes for a in norms.values()))


def pack_model(model: GGUFModel) -> PackedModel:
    c = model.config
    return pack(execution_order(c, not c.tied_output), arranged(model.tensor, c),
                "token_embd.weight" if c.tied_output else "output.weight")


def cache_key(model: GGUFModel) -> str:
    st = os.stat(model.path)
    ident = f"{Path(model.path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{LAYOUT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def load_packed(model: GGUFModel, cache_dir: os.PathLike | str | None) -> PackedModel:
    """The packed model, mapped from the cache when it is there, else packed (and stored when cache_dir)."""
    if cache_dir is None:
        return pack_model(model)
    return cached(Path(cache_dir).expanduser() / f"{cache_key(model)}.bin",
                  set(execution_order(model.config, not model.config.tied_output)),
                  lambda: pack_model(model))


def cached(path: Path, names: set[str], pack: Callable[[], PackedModel]) -> PackedModel:
    """The PackedModel in the cache file `path` if it is there and holds exactly `names`; else pack(),
    stored at `path` and mapped back (a tensor-parallel node keys its file by its slices' hashes)."""
    mapped = _open(path, names)
    if mapped is not None:
        return mapped
    packed = pack()
    try:
        _write(path, packed)
    except OSError:
        return packed  # a read-only or full disk costs start-up time, nothing else
    return _open(path, names) or packed


def _write(path: Path, packed: PackedModel) -> None:
    blobs: list[tuple[str, np.ndarray, list]] = []
    for name, arr in packed.norms.items():
        blobs.append((name, arr, ["norm", arr.shape[0], 0]))
    for name, m in packed.matrices.items():
        blobs.append((name, m.data, [m.qtype.name, m.rows, m.k]))
    # the norms go first in the file, then the matrices in execution order
    index, offset = {}, 0
    for name, arr, meta in blobs:
        index[name] = [offset, int(arr.nbytes), *meta]
        offset += -(-arr.nbytes // BLOB_ALIGN) * BLOB_ALIGN
    header = json.dumps({"version": LAYOUT_VERSION, "bytes_per_token": packed.bytes_per_token, "index": index}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // BLOB_ALIGN) * BLOB_ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for name, arr, _ in blobs:
                f.seek(start + index[name][0])
                f.write(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).tobytes())
            f.truncate(start + offset)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(path: Path, names: set[str]) -> PackedModel | None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                return None
            (n,) = struct.unpack("<Q", head[len(MAGIC) :])
            meta = json.loads(f.read(n))
        if meta.get("version") != LAYOUT_VERSION:
            return None
        start = -(-(len(MAGIC) + 8 + n) // BLOB_ALIGN) * BLOB_ALIGN
        size = os.path.getsize(path)
        index = meta["index"]
        if set(index) != names or any(start + o + b > size for o, b, *_ in index.values()):
            return None
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    matrices, norms = {}, {}
    for name, (offset, nbytes, kind, rows, k) in index.items():
        blob = raw[start + offset : start + offset + nbytes]
        if kind == "norm":
            norms[name] = blob.view(np.float32)
            continue
        qtype = QType[kind]
        if qtype in (QType.F32, QType.F16):
            blob = blob.view(np.float32 if qtype == QType.F32 else np.float16).reshape(rows, k)
        matrices[name] = PackedMatrix(qtype, rows, k, blob)
    return PackedModel(matrices, norms, int(meta["bytes_per_token"]), path)


@dataclass
class ThreadLayout:
    """Where each thread finds each matrix: bases[name] is i64[n_threads] (program.thread_ptr reads it).

    Today every thread reads the one shared packed matrix. Copying each thread's rows of all matrices
    into one contiguous stream per thread was tried: no faster on Zen 3 (within noise), and the copy
    doubled resident memory (the mapped file's pages stay resident beside it). The indirection stays
    because it costs nothing and lets a layout per thread (or per NUMA node) come back without
    touching the generated code.
    """

    bases: dict[str, np.ndarray]


def thread_layout(packed: PackedModel, order: list[str], threads: int) -> ThreadLayout:
    return ThreadLayout({n: np.full(threads, packed.matrices[n].data.ctypes.data, np.int64) for n in order})
