"""A model's weights in the kernels' layouts, in one file laid out in the order a token reads them.

    packed = load_packed(model, cache_dir)     # first start: pack (~1-2 s) and write; then: mmap (~ms)

File `<cache_dir>/<key>.bin`, key = hash(model path, size, mtime, LAYOUT_VERSION):

    b"DLPACK02" | u64 index length | sha256 of everything after it | index (JSON: name -> [offset, nbytes,
    qtype, rows, k]) | blobs

Blobs start on 4 KiB boundaries, in execution order: the norms, then per layer Q, K, V, O, gate, up,
down, then the output projection. One decode step therefore reads the file front to back, so the
kernels' software prefetch (which runs past the end of a matrix) and the hardware prefetchers see
one long stream instead of 211 short ones. The file is mapped read-only: weights cost page cache,
shared between processes, not private memory; the GGUF's own tensor pages are never touched.
A file that is missing, truncated, unreadable or whose sha256 does not match (checked at every open
before any kernel reads it: ~0.15 s per 100 MB on a core with SHA instructions) is rebuilt, with one
log line for a damaged one. Written atomically (diskcache.write_atomically: fsync'ed, renamed into
place); a full disk only costs the cache (one log line).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..diskcache import evict, touch, write_atomically
from ..formats import GGUFModel, ModelConfig, QType
from ..formats.quant import dequantize
from ..memory import release
from .family import arranged, layer_extra_names
from .compiler import sources_digest
from .layout import PackedMatrix, aligned_empty, pack_weights

log = logging.getLogger("dllp2p.jit")

LAYOUT_VERSION = 2
MAGIC = b"DLPACK02"
_DIGEST = 32  # sha256 bytes after the index length
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
        data = t.data
        if len(t.shape) == 1:
            arr = aligned_empty(t.shape, np.float32)
            arr[...] = dequantize(data, t.qtype, t.shape)
            norms[name] = arr
        elif t.qtype == QType.BF16:
            matrices[name] = pack_weights(dequantize(data, t.qtype, t.shape), QType.F32, t.shape)
        else:
            matrices[name] = pack_weights(data, t.qtype, t.shape)
        release(data)  # a view of the model's map: its pages leave the resident set (memory.release)
    layers = sum(m.nbytes for n, m in matrices.items() if n.startswith("blk."))
    out = matrices[out_name].nbytes if out_name in matrices else 0  # none in a pipeline stage before the last
    return PackedModel(matrices, norms, layers + out + sum(a.nbytes for a in norms.values()))


def pack_into(path: Path, names: list[str], tensor: Callable[[str], object], out_name: str) -> None:
    """pack(), written to `path` one tensor at a time instead of held: each packed tensor goes to a body file
    beside it and is freed, so packing a share larger than memory needs one tensor's memory (a streaming node:
    ir_stream.py). The file is the one _write makes (norms first, then the matrices in `names` order): the
    body is read back twice (its sha256, then the copy behind the header), through the page cache."""
    index: dict[str, list] = {}
    layers = out = norms = offset = 0
    body = path.with_name(f".{path.name}.body")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        flat = [n for n in names if len(tensor(n).shape) == 1]  # the norms first, as _layout puts them
        with open(body, "wb") as f:
            for name in flat + [n for n in names if n not in set(flat)]:
                one = pack([name], tensor, out_name)
                if name in one.norms:
                    blob, meta = one.norms[name], ["norm", one.norms[name].shape[0], 0]
                    norms += blob.nbytes
                else:
                    m = one.matrices[name]
                    blob, meta = m.data, [m.qtype.name, m.rows, m.k]
                    layers += m.nbytes if name.startswith("blk.") else 0
                    out += m.nbytes if name == out_name else 0
                data = memoryview(np.ascontiguousarray(blob).view(np.uint8).reshape(-1))
                f.write(bytes(offset - f.tell()))
                index[name] = [offset, data.nbytes, *meta]
                f.write(data)
                offset += -(-data.nbytes // BLOB_ALIGN) * BLOB_ALIGN
            f.write(bytes(offset - f.tell()))
        header = json.dumps({"version": LAYOUT_VERSION, "bytes_per_token": layers + out + norms, "index": index}).encode()
        pad = bytes(_blob_start(len(header)) - _prefix() - len(header))
        digest = hashlib.sha256(header + pad)
        for chunk in _chunks(body):
            digest.update(chunk)
        head = MAGIC + struct.pack("<Q", len(header)) + digest.digest() + header + pad
        write_atomically(path, itertools.chain([head], _chunks(body)))  # a chunk at a time, never a list of them
    finally:
        body.unlink(missing_ok=True)


def _chunks(path: Path, block: int = 8 << 20):
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            yield chunk


def pack_model(model: GGUFModel) -> PackedModel:
    c = model.config
    return pack(execution_order(c, not c.tied_output), arranged(model.tensor, c),
                "token_embd.weight" if c.tied_output else "output.weight")


def cache_key(model: GGUFModel) -> str:
    st = os.stat(model.path)
    ident = f"{Path(model.path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{LAYOUT_VERSION}|{sources_digest()}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


PACKED_CACHE_BYTES = 4096 << 20  # the whole-model packed files of a cache dir (<key>.bin) stay within this


def load_packed(model: GGUFModel, cache_dir: os.PathLike | str | None,
                budget: int = PACKED_CACHE_BYTES) -> PackedModel:
    """The packed model, mapped from the cache when it is there, else packed (and stored when cache_dir).
    The other whole-model files beside it (other models, older versions) stay within `budget` bytes, the
    least recently used going first (a tensor-parallel node's tp-*.bin have their own budget: tp.py)."""
    if cache_dir is None:
        return pack_model(model)
    path = Path(cache_dir).expanduser() / f"{cache_key(model)}.bin"
    c = model.config
    order, out = execution_order(c, not c.tied_output), "token_embd.weight" if c.tied_output else "output.weight"
    packed = cached(path, set(order), lambda: pack_model(model),
                    lambda p: pack_into(p, order, arranged(model.tensor, c), out))
    touch(path)
    evict(path.parent.glob("[0-9a-f]*.bin"), budget, keep=[path])
    return packed


def cached(path: Path, names: set[str], pack: Callable[[], PackedModel],
           write: Callable[[Path], None] | None = None) -> PackedModel:
    """The PackedModel in the cache file `path` if it is there, intact and holds exactly `names`; else
    written there by write(path) (pack_into: one tensor in memory at a time) and mapped back, or where that
    fails, pack() in memory (a tensor-parallel node keys its file by its slices' hashes)."""
    mapped = _open(path, names)
    if mapped is not None:
        return mapped
    try:
        if write is None:
            packed = pack()
            _write(path, packed)
            del packed  # the file holds it now: mapping it back beside the copy would double the resident peak
        else:
            write(path)
    except OSError as e:
        log.warning("packed weights not cached at %s: %s", path, e)
        return pack()  # a read-only or full disk costs start-up time (and memory), nothing else
    return _open(path, names) or pack()


def _layout(packed: PackedModel) -> tuple[bytes, list[bytes | memoryview]]:
    """(index JSON, the parts that follow it in the file: padding and blobs, in file order)."""
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
    start = _blob_start(len(header))
    parts: list[bytes | memoryview] = [header, bytes(start - _prefix() - len(header))]
    at = 0
    for name, arr, _ in blobs:
        parts.append(bytes(index[name][0] - at))
        data = memoryview(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
        parts.append(data)
        at = index[name][0] + data.nbytes
    parts.append(bytes(offset - at))
    return header, parts


def _prefix() -> int:
    return len(MAGIC) + 8 + _DIGEST


def _blob_start(header_len: int) -> int:
    return -(-(_prefix() + header_len) // BLOB_ALIGN) * BLOB_ALIGN


def _write(path: Path, packed: PackedModel) -> None:
    header, parts = _layout(packed)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    write_atomically(path, [MAGIC + struct.pack("<Q", len(header)) + digest.digest(), *parts])


def _open(path: Path, names: set[str]) -> PackedModel | None:
    """The mapped file, or None when it is absent (silently) or damaged in any way (one log line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_prefix())
            if len(head) < _prefix() or head[: len(MAGIC)] != MAGIC:
                raise ValueError("not a packed weights file of this version (header)")
            (n,) = struct.unpack("<Q", head[len(MAGIC) : len(MAGIC) + 8])
            size = os.fstat(f.fileno()).st_size
            if _blob_start(n) > size:
                raise ValueError(f"{size} bytes, shorter than its index")
        if _file_sha256(path, _prefix()) != head[len(MAGIC) + 8:]:
            raise ValueError("content does not match its sha256")
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        meta = json.loads(bytes(raw[_prefix() : _prefix() + n]))
        if meta.get("version") != LAYOUT_VERSION:
            raise ValueError(f"layout version {meta.get('version')}")
        start = _blob_start(n)
        index = meta["index"]
        if set(index) != names or any(start + o + b > size for o, b, *_ in index.values()):
            raise ValueError("its index does not name the expected tensors")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("packed weights %s are damaged (%s); packing afresh", path, e)
        path.unlink(missing_ok=True)
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


def _file_sha256(path: Path, start: int, block: int = 8 << 20) -> bytes:
    """sha256 of the file from `start`, read through one buffer: the pages go to the page cache only, never
    into this process (a streaming node's file may be larger than its memory budget: ir_stream.py)."""
    digest, buf = hashlib.sha256(), bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.digest()


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
