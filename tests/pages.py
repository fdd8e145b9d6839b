"""Test helper: how many bytes of an array's pages are in memory now (mincore(2)), for the tests of memory the
KV caches and mapped weights take (tests/test_memory.py, tests/test_kv_pages.py)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(a: np.ndarray) -> int:
    """Bytes of a's pages in memory now (mincore over the pages a spans; a page only read maps the zero page,
    which counts)."""
    lo = a.ctypes.data // PAGE * PAGE
    n = (a.ctypes.data + a.nbytes - lo + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * PAGE), vec) == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec) * PAGE
