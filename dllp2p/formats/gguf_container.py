"""The GGUF container, parsed straight from a memory map: the 8-byte header, the key/values and the
tensor infos. gguf_model.py turns them into a ModelConfig and tensor views; every problem here becomes one
`ModelFileError` naming the file and the problem.

The `gguf` package's reader is far too slow on a big vocabulary for a quick start (it builds several
numpy views per element of every array); this reader is bounds-checked and vectorized instead.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

GGUF_MAGIC = b"GGUF"


class ModelFileError(Exception):
    """A model file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


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


# --- the container: header, key/values and tensor infos, parsed straight from the memory map ---

# GGUF value types (gguf.GGUFValueType): scalars by struct code, plus the two composite ones
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALARS = {t: struct.Struct("<" + code) for t, code in _SCALAR_CODES.items()}
_ARRAY_DTYPES = {t: np.dtype("<" + code) for t, code in _SCALAR_CODES.items()}
_STRING, _ARRAY = 8, 9
_U32, _U64 = _SCALARS[4], _SCALARS[10]
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions


class _Corrupt(ValueError):
    """A structural problem in the container (reported as 'truncated or corrupted')."""


class _BadValue(ValueError):
    """A metadata value that cannot be decoded (reported with its key)."""


class _TensorInfo(NamedTuple):  # NamedTuple, not dataclass: a few ms less at import
    name: str
    raw_type: int  # ggml type id
    dims: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    offset: int  # absolute, in the file


class _Header(NamedTuple):
    metadata: dict[str, Any]
    tensors: list[_TensorInfo]
    buffer: Any  # the file's memory map


class _Reader:
    """Sequential, bounds-checked reads over the memory-mapped file.

    This replaces gguf.GGUFReader, which builds several numpy views per element of every array: for a
    49k-token vocabulary plus its merges that cost seconds per start (and gguf is slow to import too).
    Here a big string array is a few numpy passes and one decode (or else one tight loop), giving the
    same Python values as `ReaderField.contents()`: ints, floats, bools, str, and flat lists of them.
    """

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def skip(self, n: int) -> int:
        """Advance past n bytes; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Corrupt(f"a {n}-byte read at offset {start} runs past the end of the file ({self.size} bytes)")
        self.pos = start + n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.skip(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.skip(8))[0]

    def raw_string(self) -> bytes:
        n = self.u64()
        start = self.skip(n)
        return self.buf[start : start + n]

    def name(self) -> str:
        """A key or tensor name: undecodable means a corrupted container."""
        try:
            return self.raw_string().decode()
        except UnicodeDecodeError as e:
            raise _Corrupt(f"name at offset {self.pos} is not UTF-8 ({e.reason})") from None

    def value(self, vtype: int) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return scalar.unpack_from(self.buf, self.skip(scalar.size))[0]
        if vtype == _STRING:
            try:
                return self.raw_string().decode()
            except UnicodeDecodeError as e:
                raise _BadValue(str(e)) from None
        if vtype == _ARRAY:
            return self.array()
        raise _Corrupt(f"unknown value type {vtype} at offset {self.pos - 4}")

    def array(self) -> list[Any]:
        itype, count = self.u32(), self.u64()
        dtype = _ARRAY_DTYPES.get(itype)
        if dtype is not None:
            start = self.skip(count * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if itype == _STRING:
            return self.strings(count)
        if itype == _ARRAY:  # nested arrays come out flattened, as gguf's contents() gives them
            return [x for _ in range(count) for x in self.array()]
        raise _Corrupt(f"unknown array element type {itype} at offset {self.pos - 12}")

    def strings(self, count: int) -> list[str]:
        """`count` GGUF strings (u64 length + UTF-8 bytes each): the hot loop of a start-up."""
        if count * 8 > self.size - self.pos:
            raise _Corrupt(f"an array of {count} strings at offset {self.pos} cannot fit in the file")
        if count >= _VECTORIZE_FROM and (found := _strings_vectorized(self.buf, self.pos, count)) is not None:
            strings, self.pos = found
            return strings
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                start = pos + 8
                pos = start + unpack(buf, pos)[0]
                append(buf[start:pos].decode())
        except struct.error:
            pos = size + 1
        except UnicodeDecodeError as e:
            raise _BadValue(str(e)) from None
        if pos > size:  # slicing clips silently: check the end once, after the loop
            raise _Corrupt(f"an array of {count} strings at offset {self.pos} runs past the end of the file")
        self.pos = pos
        return out


_VECTORIZE_FROM = 1024  # string arrays at least this long try _strings_vectorized first


def _strings_vectorized(buf: mmap.mmap, pos: int, count: int) -> tuple[list[str], int] | None:
    """The string array at `pos` parsed with numpy and one decode, or None to fall back to the loop.

    Each string is an 8-byte little-endian length, then its bytes. Read as a u64 at every byte
    offset, a string's start holds its length, < 65536 for any token; the offset just before it
    reads as (previous byte + 256 * length), also < 65536 when the length is < 256; the offset just
    after it never does (the string's first byte lands in the top byte). So the candidate starts are
    the last offsets of the runs of "u64 < 65536". They are exactly the array's starts when each
    start + 8 + length is the next candidate, checked for all at once; a stray candidate (say, from
    zeros inside a string) breaks that chain -> None. Then the length prefixes but their last (zero)
    byte are dropped, the rest is decoded as one text and split at the NULs: `count` strings, unless
    one held a NUL itself (-> None).
    Twice as fast as the loop on a 49k-token vocabulary, with identical results.
    """
    window = min(count * 24, len(buf) - pos) - 7  # room for strings of 16 bytes on average
    if window < count * 8:
        return None
    at = np.ndarray((window,), "<u8", buf, pos, (1,))  # at[p]: the u64 at pos + p (overlapping)
    short = at < 65536
    starts = np.flatnonzero(short[:-1] & ~short[1:])[:count]
    if len(starts) < count or starts[0] != 0:
        return None
    ends = starts + 8 + at[starts].astype(np.int64)
    if not np.array_equal(ends[:-1], starts[1:]) or ends[-1] > window:
        return None
    end = int(ends[-1])
    keep = np.ones(end, bool)
    keep[(starts[:, None] + np.arange(7)).ravel()] = False
    try:
        text = np.frombuffer(buf, np.uint8, end, pos)[keep].tobytes().decode()
    except UnicodeDecodeError:
        return None  # the loop reports it, with the key
    strings = text.split("\0")
    if len(strings) != count + 1:
        return None
    del strings[0]  # the empty text before the first prefix's NUL
    return strings, pos + end


def _parse(path: Path, *, with_tensors: bool) -> _Header:
    """Key/values (and tensor infos) of a GGUF file whose 8-byte header _check_header accepted."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelFileError(path, f"cannot open: {getattr(e, 'strerror', None) or e}") from None
    r = _Reader(buf)
    key = ""
    try:
        r.skip(8)  # magic and version, checked already
        tensor_count, kv_count = r.u64(), r.u64()
        # the smallest key/value takes 13 bytes, the smallest tensor info 32: absurd counts fail fast
        if kv_count * 13 + tensor_count * 32 > r.size:
            raise _Corrupt(f"{tensor_count} tensors and {kv_count} keys cannot fit in {r.size} bytes")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = r.name()
            if key in metadata:
                raise _Corrupt(f"duplicate key {key!r}")
            metadata[key] = r.value(r.u32())
        key = ""
        tensors: list[_TensorInfo] = []
        if with_tensors:
            infos = [_tensor_info(r) for _ in range(tensor_count)]
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
                raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
            data_start = -(-r.pos // alignment) * alignment
            names: set[str] = set()
            for name, raw_type, dims, offset in infos:
                if name in names:
                    raise _Corrupt(f"duplicate tensor {name!r}")
                names.add(name)
                tensors.append(_TensorInfo(name, raw_type, dims, data_start + offset))
    except _BadValue as e:
        raise ModelFileError(path, f"metadata key {key!r} is corrupted ({e})") from None
    except (_Corrupt, struct.error, OverflowError, MemoryError) as e:
        hint = "file is truncated or corrupted"
        raise ModelFileError(path, f"{hint} ({type(e).__name__}: {str(e)[:120]})") from None
    return _Header(metadata, tensors, buf)


def _tensor_info(r: _Reader) -> tuple[str, int, tuple[int, ...], int]:
    name = r.name()
    n_dims = r.u32()
    if not 1 <= n_dims <= _MAX_DIMS:
        raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
    dims = struct.unpack_from(f"<{n_dims}Q", r.buf, r.skip(8 * n_dims))
    raw_type = r.u32()
    return name, raw_type, dims, r.u64()


def _type_name(raw_type: int) -> str:
    """ggml's name for a tensor type id (from the gguf package, only on this error path)."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(raw_type).name
    except (ImportError, ValueError):
        return f"type id {raw_type}"
