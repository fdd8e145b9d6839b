"""A process's resident memory: reading it, and giving back what it no longer uses.

    resident(pid)        (VmRSS, VmHWM) in bytes from /proc/PID/status: now and the peak; (0, 0) where
                         there is no /proc (not Linux) or no such process
    trim()               collect Python's cycles, then glibc's malloc_trim(0): freed heap pages go back to
                         the kernel (a no-op without glibc). After large frees (an engine's buffers, a
                         session's slices): without it an idle daemon keeps hundreds of MB it freed
    release(array)       drop the pages of a read-only file mapping (a GGUF's tensors) that `array`, a view
                         of it, covers from this process's resident set (madvise MADV_DONTNEED): they stay
                         in the page cache and are read again on the next touch. Only for views of an
                         mmap.mmap opened ACCESS_READ (never anonymous memory, whose pages DONTNEED zeroes):
                         anything else is left alone (-> False)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap

import numpy as np

PAGE = mmap.PAGESIZE


def resident(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of process `pid` in bytes; (0, 0) if unknown."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_trim()


def trim() -> None:
    """Collect cycles (an engine's objects refer to each other), then return freed heap to the kernel."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The read-only mmap.mmap that `array` is a view of, or None (a copy, anything else)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) and not _writable(base) else None


def _writable(m: mmap.mmap) -> bool:
    try:
        with memoryview(m) as view:
            return not view.readonly
    except (ValueError, TypeError):  # closed
        return True


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """[low, high) addresses of the bytes a (any strides) spans."""
    start = a.__array_interface__["data"][0]
    ends = [(n - 1) * s for n, s in zip(a.shape, a.strides)]
    return start + sum(e for e in ends if e < 0), start + sum(e for e in ends if e > 0) + a.itemsize


def release(array: np.ndarray) -> bool:
    """Drop the whole pages `array` (a view of a read-only file mapping) lies on from the resident set.
    Pages at either end shared with neighbouring data go too: harmless, they are read again if touched.
    -> whether anything was released (False: not a view of a read-only mmap, or a closed one)."""
    m = _mapping_of(array)
    if m is None or array.nbytes == 0 or not hasattr(m, "madvise"):
        return False
    low, high = _bounds(array)
    with memoryview(m) as view:
        base = np.frombuffer(view, np.uint8).ctypes.data
    lo = (low - base) // PAGE * PAGE
    hi = min(len(m), -(-(high - base) // PAGE) * PAGE)
    try:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        return False
    return True
