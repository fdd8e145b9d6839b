"""Files the caches write and trust again later: written atomically, checked by hash, kept within a budget.

    write_atomically(path, parts)   temporary file in the same directory, fsync, rename, fsync the directory:
                                    a reader (or a Pi that lost power mid-write) sees the old file or the
                                    whole new one, never a part
    sealed(payload) / unseal(raw)   a self-checking file: MAGIC | sha256(payload) | u64 len | payload;
                                    unseal raises Damaged on a short, empty, foreign or altered file
    touch(path)                     mark a cache file used (its mtime: the LRU order)
    evict(files, budget, keep)      delete the least recently used of `files` until they fit in `budget`
    disk_full(e)                    whether an OSError is ENOSPC or EDQUOT

The bottom layer: it imports nothing from dllp2p. Callers own the policy (what to rebuild, what to log).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable

SEAL_MAGIC = b"DLSEAL01"
_HEAD = struct.Struct("<8s32sQ")  # magic, sha256 of the payload, payload length


class Damaged(ValueError):
    """A cache file that is not what was written: short, empty, foreign header or a wrong hash."""


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """Write `parts` to `path` so that it appears whole or not at all, durably (fsync of file and directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems refuse an fsync of a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sealed(payload: bytes) -> list[bytes]:
    """The parts of a self-checking file holding `payload` (for write_atomically)."""
    return [_HEAD.pack(SEAL_MAGIC, hashlib.sha256(payload).digest(), len(payload)), payload]


def unseal(raw: bytes) -> bytes:
    """The payload of a sealed file's bytes; Damaged if they are not exactly what sealed() made."""
    if len(raw) < _HEAD.size:
        raise Damaged(f"{len(raw)} bytes, shorter than the header")
    magic, digest, n = _HEAD.unpack_from(raw)
    if magic != SEAL_MAGIC:
        raise Damaged("not a sealed cache file (header)")
    payload = raw[_HEAD.size:]
    if len(payload) != n:
        raise Damaged(f"{len(payload)} payload bytes, the header says {n}")
    if hashlib.sha256(payload).digest() != digest:
        raise Damaged("content does not match its sha256")
    return payload


def touch(path: Path) -> None:
    """Mark `path` as just used (best effort)."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(files: Iterable[Path], budget: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete the least recently used (oldest mtime) of `files` until their total size is within `budget`
    bytes; never one in `keep` (in use right now). -> the deleted files. Best effort: never raises."""
    keep = {Path(p) for p in keep}
    sized = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        sized.append((st.st_mtime_ns, st.st_size, f))
    total = sum(size for _, size, _ in sized)
    gone = []
    for _, size, f in sorted(sized, key=lambda x: x[0]):
        if total <= budget:
            break
        if f in keep:
            continue
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        gone.append(f)
    return gone
