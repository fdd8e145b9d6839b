"""A node's memory budget (`--mem-limit`, config `mem_limit`): parsed, or found from the machine.

    parse_mem_limit("1.5G") == 1610612736     # K, M, G (KiB, MiB, GiB); a bare number is MiB
    parse_mem_limit("off") is None            # "0" or "off": no budget
    default_mem_limit(read_memory_facts())    # the cgroup's limit (v2 memory.max / v1 memory.limit_in_bytes,
                                              # the tightest of the cgroup and its ancestors), else the RAM
                                              # available now (MemAvailable), less PROCESS_RESERVE

The budget is what the engine may use for weights mapped or read ahead, its KV cache and buffers
(jit/ir_stream.py); the process's own memory (interpreter, libraries, compiled code) is PROCESS_RESERVE.

MemoryCgroup makes a child memory cgroup under this process's own (v2 where its memory controller is
usable, else v1) for the tests and the streaming benchmark: a child process enters it (preexec_fn) and
is held to its limit.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dllp2p.memlimit")
MADV_WILLNEED, MADV_DONTNEED = 3, 4  # the same on x86-64 and aarch64
PROCESS_RESERVE = 192 << 20  # the interpreter, numpy, llvmlite, the compiled step, a session's own buffers
UNLIMITED = 1 << 60  # a cgroup limit at or beyond this is no limit (v1 writes 2^63 - 4096)
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_mem_limit(text: str | int) -> int | None:
    """Bytes, or None for no budget ("0", "off", "none"). A number with an optional unit K, M, G, T (powers
    of 1024, "KiB", "MB", ... read the same); a bare number is MiB. ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"memory limit {text!r} is not a size")
    s = text.strip().lower()
    if s in ("0", "off", "none"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise ValueError(f"memory limit {text!r} is not a size like 1500M or 1.5G (or 'off')")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        return None
    return value


@dataclass(frozen=True)
class MemoryFacts:
    cgroup_limit: int | None  # bytes: the tightest memory limit of this process's cgroup and its ancestors
    available: int | None  # bytes: MemAvailable


def default_mem_limit(facts: MemoryFacts) -> tuple[int | None, str]:
    """(budget, why): the cgroup's limit or else the available RAM, less PROCESS_RESERVE (at least 64 MiB)."""
    if facts.cgroup_limit is not None:
        return max(64 << 20, facts.cgroup_limit - PROCESS_RESERVE), f"cgroup limit {facts.cgroup_limit >> 20} MiB"
    if facts.available is not None:
        return max(64 << 20, facts.available - PROCESS_RESERVE), f"available memory {facts.available >> 20} MiB"
    return None, "no cgroup limit or MemAvailable found"


def advise(ranges, advice: int) -> None:  # noqa: ANN001 - (address, bytes) pairs
    """madvise each (address, bytes) range through libc, the start rounded down to a page (the length up);
    failures are logged at debug level: advice, not a requirement."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for addr, size in ranges:
        start = addr - addr % mmap.PAGESIZE
        if size > 0 and fn(start, size + addr - start, advice) != 0:
            log.debug("madvise(%#x, %d, %d) failed: errno %d", start, size, advice, ctypes.get_errno())


def engine_options(**options: object) -> dict[str, object]:
    """The engine keywords that are set (cache_dir=..., mem_limit=...): None leaves the engine's default, and
    an engine (or a test's stand-in) that does not take a keyword is not handed it unset."""
    return {k: v for k, v in options.items() if v is not None}


def mem_budget(setting: str) -> tuple[int | None, str]:
    """(bytes or None, why) of a `mem_limit` setting: "auto" -> default_mem_limit of this machine now, else
    parse_mem_limit (ValueError names the bad value)."""
    if setting.strip().lower() == "auto":
        return default_mem_limit(read_memory_facts())
    value = parse_mem_limit(setting)
    return value, "none (mem_limit off)" if value is None else f"{value >> 20} MiB, as configured"


def read_memory_facts(proc: Path = Path("/proc/self"), root: Path = CGROUP_ROOT) -> MemoryFacts:
    return MemoryFacts(_cgroup_limit(proc, root), _meminfo_available(proc.parent / "meminfo"))


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_cgroups(proc: Path) -> dict[str, str]:
    """controller ("" for v2) -> this process's cgroup path."""
    out = {}
    try:
        for line in (proc / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    return int(text) if int(text) < UNLIMITED else None


def _v2_dir(root: Path) -> Path:
    return root if (root / "cgroup.controllers").exists() else root / "unified"


def _cgroup_limit(proc: Path, root: Path) -> int | None:
    own = _own_cgroups(proc)
    limits = []
    if "memory" in own:  # v1: hierarchical_memory_limit is already the tightest of the ancestors
        base = root / "memory" / own["memory"].lstrip("/")
        try:
            for line in (base / "memory.stat").read_text().splitlines():
                if line.startswith("hierarchical_memory_limit "):
                    limits.append(_read_limit_text(line.split()[1]))
        except OSError:
            limits.append(_read_limit(base / "memory.limit_in_bytes"))
    if "" in own:
        d = _v2_dir(root) / own[""].lstrip("/")
        while True:
            limits.append(_read_limit(d / "memory.max"))
            if d == _v2_dir(root) or d.parent == d:
                break
            d = d.parent
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def _read_limit_text(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < UNLIMITED else None


# --- a child cgroup for tests and benchmarks --------------------------------------------------------------


def _v2_place(root: Path) -> Path | None:
    own = _own_cgroups(Path("/proc/self")).get("")
    if own is None:
        return None
    d = _v2_dir(root) / own.lstrip("/")
    try:
        if "memory" not in (d / "cgroup.controllers").read_text().split():
            return None
    except OSError:
        return None
    return d


def cgroup_unavailable(root: Path = CGROUP_ROOT) -> str:
    """Why no child memory cgroup can be made here ("" when one can)."""
    if os.geteuid() != 0:
        return "not root"
    try:
        with MemoryCgroup(f"dllp2p-probe-{os.getpid()}", 256 << 20, root):
            return ""
    except OSError as e:
        return f"cannot create a memory cgroup: {e}"


class MemoryCgroup:
    """A child memory cgroup of `limit` bytes under this process's own (v2 if its memory controller is on
    there, else v1's memory hierarchy); removed on exit (after its processes have ended)."""

    def __init__(self, name: str, limit: int, root: Path = CGROUP_ROOT):
        self.limit = limit
        v2 = _v2_place(root)
        if v2 is not None:
            self.v2, self.path = True, v2 / name
        else:
            own = _own_cgroups(Path("/proc/self")).get("memory")
            if own is None or not (root / "memory").is_dir():
                raise OSError("no v2 memory controller and no v1 memory hierarchy")
            self.v2, self.path = False, root / "memory" / own.lstrip("/") / name

    def __enter__(self) -> "MemoryCgroup":
        if self.v2:
            try:
                (self.path.parent / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass  # already on, or refused: the mkdir below then has no memory.max and fails
        self.path.mkdir()
        try:
            if self.v2:
                (self.path / "memory.max").write_text(str(self.limit))
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        except OSError:
            self.path.rmdir()
            raise
        return self

    def enter(self) -> None:
        """Move the calling process into the cgroup (a child's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def peak(self) -> int | None:
        """The cgroup's peak charge in bytes (page cache included), where the kernel reports it."""
        return _read_limit(self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # a cgroup is removable once its last process has gone, shortly after exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
