"""This machine's figures for the cost model (costmodel.DeviceFigures), measured once and cached.

    compute  GB/s of Q4_0 weights the JIT matvec streams on `threads` threads: a random 8192 x 8192 Q4_0
             matrix (37.7 MB: past most last-level caches), each thread its rows as a forward splits them, the
             median of 5 passes after one warm-up (jit/bench_kernels.py's method, ~0.1 s plus the kernels'
             compile, which the kernel cache keeps)
    disk     MB/s reading back 32 MiB written to the state dir, fsynced and dropped from the page cache
             (posix_fadvise DONTNEED; where the kernel keeps it anyway the figure is the page cache's)
    ram      what the weights may use: MemAvailable, or the cgroup v2 memory.max when lower

The result is cached as JSON in the cache dir, keyed by the CPU's model name and the thread count, for
MAX_AGE_S. A daemon reads a fresh cache itself and otherwise measures in a child process,

    python3 -m dllp2p.daemon.figures --threads N --state-dir DIR [--cache-dir DIR]   (prints the JSON)

so that the JIT and the 38 MB matrix never enter its own memory (+86 MiB resident when measured in
process). Errors: a figure that cannot be measured is 0 (unknown); the planner then assumes
(session/autoplan.py's defaults).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..formats.quant import QType

MAX_AGE_S = 7 * 86400
FILE = "figures-v1.json"
DISK_PROBE = 32 << 20


@dataclass(frozen=True)
class Measured:
    gbps: float  # GB/s of Q4_0 weights per token on its kernels (0: unknown)
    disk_gbps: float  # GB/s read from its state dir's disk (0: unknown)
    ram: int  # bytes its weights may use (0: unknown)
    threads: int
    cpu: str
    at: float  # unix seconds of the measurement


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def ram_budget() -> int:
    """MemAvailable, or the cgroup v2 limit minus what the cgroup uses when that is lower (0: unknown)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = min(avail, room) if avail else room
    except (OSError, ValueError):
        pass
    return avail


def compute_gbps(threads: int, cache_dir: str | None, reps: int = 5) -> float:
    """GB/s of a Q4_0 matvec pass over a random 37.7 MB matrix on `threads` threads."""
    import numpy as np  # numpy and the JIT: only when measuring

    from ..jit.bench_kernels import plan_calls, time_passes
    from ..jit.compiler import DEFAULT_CACHE_DIR
    from ..jit.layout import pack_weights
    from ..jit.library import compile_kernels
    from ..jit.specs import KernelSpec, Op

    rows, k = 8192, 8192
    raw = np.random.default_rng(0).integers(0, 256, (rows, k // 32, 18), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a finite scale in every block
    mat = pack_weights(raw.reshape(rows, -1), QType.Q4_0, (rows, k))
    lib = compile_kernels([KernelSpec(Op.QUANTIZE), KernelSpec(Op.MATVEC, QType.Q4_0)],
                          cache_dir or str(DEFAULT_CACHE_DIR))
    keep: list = []
    times = time_passes(plan_calls(lib, [mat], threads, keep), reps + 1)[1:]
    return mat.nbytes / statistics.median(times) / 1e9


def disk_gbps(directory: Path) -> float:
    """GB/s reading DISK_PROBE bytes back from `directory` after dropping them from the page cache."""
    path = directory / f".disk-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (DISK_PROBE >> 20))
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(4 << 20):
                pass
        return DISK_PROBE / (time.perf_counter() - t0) / 1e9
    except OSError:
        return 0.0
    finally:
        path.unlink(missing_ok=True)


def cached(threads: int, cache_dir: Path | None, state_dir: Path, now: float | None = None) -> Measured | None:
    """The cached figures if fresh and of this CPU and thread count (RAM read now), else None."""
    now = time.time() if now is None else now
    cpu = cpu_name()
    try:
        old = Measured(**json.loads(((cache_dir or state_dir) / FILE).read_text()))
        if (old.cpu == cpu and old.threads == threads and _plausible(old.gbps, old.disk_gbps, old.at)
                and 0 <= now - old.at < MAX_AGE_S and old.gbps > 0):
            return Measured(float(old.gbps), float(old.disk_gbps), ram_budget(), threads, cpu, float(old.at))
    except (OSError, ValueError, TypeError):
        pass
    return None


def _plausible(*numbers: object) -> bool:
    """Every one a finite non-negative number (a file edited or corrupted by hand: NaN, Infinity, "3", true)."""
    return all(type(x) in (int, float) and math.isfinite(x) and x >= 0 for x in numbers)


def measure(threads: int, cache_dir: Path | None, state_dir: Path, now: float | None = None) -> Measured:
    """The cached figures if fresh, else measured now in this process (and cached)."""
    hit = cached(threads, cache_dir, state_dir, now)
    if hit is not None:
        return hit
    now = time.time() if now is None else now
    cpu = cpu_name()
    cache = (cache_dir or state_dir) / FILE
    try:
        gbps = compute_gbps(threads, str(cache_dir) if cache_dir else None)
    except Exception:  # noqa: BLE001 - an unknown rate: the planner assumes one
        gbps = 0.0
    fresh = Measured(gbps, disk_gbps(state_dir), ram_budget(), threads, cpu, now)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(asdict(fresh)))
    except OSError:
        pass
    return fresh


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="measure this machine's figures for the cost model (JSON)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args(argv)
    print(json.dumps(asdict(measure(args.threads, args.cache_dir, args.state_dir))))


if __name__ == "__main__":
    main()
