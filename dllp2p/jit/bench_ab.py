"""Same-process A/B of decode speed: this build's JIT engine against an older commit's, alternating every
few tokens, many times.

    python -m dllp2p.jit.bench_ab --old acfb81b [--variants old,new] [--threads 2] [--tokens 32] [--rounds 60]

Why one process: on a shared VM, decode speed moves by 10-30 % from one process to the next (and over
minutes), which swamps a 3 % difference between two builds run as separate `dllp2p bench` processes. Here
both builds' engines live in one process and take turns: a round runs every variant once, K timed decode
steps each, in an order that alternates from round to round, and the figure is the median over rounds of
the paired ratio variant / baseline (the first variant) taken within a round, with its quartiles, a 95 %
confidence interval of that median (order statistics of the binomial) and how many rounds the variant won.

The same weights: every variant's engine gets one PackedModel, one mapping of one packed file. Each build
keys its packed file by its own sources, so run alone each maps a different file, and how much of a file's
page cache sits in 2 MiB folios (mapped by 2 MiB page-table entries) depends on how that file was written
and read back: here one file had 28 of its 92 MiB so mapped, another none, and the same build was ~18 %
slower per token (thread CPU time, 1 thread) on the second (variant suffix `+own`: the build's own file).
That alone can make one build look 6 % slower than another in separate processes. The files mapped and
their 2 MiB share are printed.

The old build: `--old REV` is a git revision of the repository holding this file (`git archive REV
dllp2p`), or a directory holding a `dllp2p` package; it is copied to a temporary directory as a package
named `dllp2p_old` (absolute `dllp2p.` imports rewritten; the package's imports are relative) and imported
beside this one. Each build compiles its own program (cached on disk, keyed by its sources).

Idle engines do not share the cores: between its turns an engine is parked (its worker threads told to
quit and joined; `unpark` starts them again, the go-counter reset), so neither build's idle loop (the old
one naps in usleep(100) between looks, ~6000 wake-ups a second) takes time from the engine running. Each
turn starts with one untimed step (the fresh threads' first), then times K steps one by one.

One turn: the prompt (--prompt-tokens ids) was prefilled once; each turn decodes K steps from the end of
the prompt, feeding the same fixed token ids (a greedy run's, taken once from the first variant) and taking
argmax of the logits as `dllp2p bench` does, so every turn does the same work at the same positions.
Figures per turn, each reported as paired ratios: tokens / time (`dllp2p bench`'s decode tok/s, the
acceptance figure), the median step time (robust to a neighbour's burst), and the calling thread's CPU
time per step (time.thread_time: time descheduled is not counted, so on a busy machine it still resolves
a few per cent at 1 thread; at 2 threads it includes spinning at barriers).

Variants: `old`; `rev:REV` (another revision, imported as --old's); `new` (this build, default settings);
`static` (this build, ProgramSpec.dynamic=False: one static piece per thread); `spins=N` (this build,
barrier spin limit N); `chunks=N` (this build with ir_share.CHUNKS_PER_OP = N when the program is
emitted; compiled into its own cache directory); any of them + `+own` (see above).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import io
import math
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..formats import load_model
from ..models import default_model_path
from . import engine as engine_module
from . import ir_share
from .compiler import DEFAULT_CACHE_DIR
from .engine import JITEngine
from .weights import load_packed
from .ir_barrier import SLEEPS, SPINS

OLD_PACKAGE = "dllp2p_old"
REPO = Path(__file__).resolve().parent.parent.parent  # the checkout holding this package


# --- the old build as a second package ---------------------------------------------------------------


def import_old(old: str, into: Path, name: str = OLD_PACKAGE):
    """The package `dllp2p` of revision or directory `old`, copied to into/name and imported as `name`."""
    dest = into / name
    src = Path(old)
    if (src / "dllp2p" / "__init__.py").is_file():
        shutil.copytree(src / "dllp2p", dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", old, "dllp2p"],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(into, filter="data")
        (into / "dllp2p").rename(dest)
    absolute = re.compile(r"^(\s*)(from|import)\s+dllp2p(?=[.\s])", re.M)
    for path in dest.rglob("*.py"):
        text = path.read_text()
        fixed = absolute.sub(rf"\1\2 {name}", text)
        if fixed != text:
            path.write_text(fixed)
    sys.path.insert(0, str(into))
    importlib.invalidate_caches()
    return importlib.import_module(name)


# --- parking an engine's worker threads (both builds: same table slots and `worker` entry point) -------


def park(engine) -> None:  # noqa: ANN001 - a JITEngine of either build
    """Stop the engine's worker threads (quit + kick, join), then clear quit and the go-counter."""
    table = engine._table
    table[engine._quit_slot] = 1
    engine._kick(engine._table_addr)
    for t in engine._workers:
        t.join()
    table[engine._quit_slot] = 0
    table[engine._slots["go"]] = 0
    engine._workers = []


def unpark(engine) -> None:  # noqa: ANN001
    """Start the worker threads again (each waits for the go-counter to move from 0)."""
    worker = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(engine._compiled.address("worker"))
    engine._workers = [threading.Thread(target=worker, args=(engine._table_addr, tid), daemon=True,
                                        name=f"dllp2p-ab-{tid}") for tid in range(1, engine.threads)]
    for t in engine._workers:
        t.start()


# --- variants ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    engine: Any
    rates: list[float] = field(default_factory=list)  # tokens / s per turn
    medians: list[float] = field(default_factory=list)  # median step seconds per turn
    cpu: list[float] = field(default_factory=list)  # the calling thread's CPU seconds per step, per turn
    sleeps: list[float] = field(default_factory=list)  # barrier waits that slept on the futex, per step


def build_variant(name: str, model_path: str, ctx: int, threads: int, old_pkg, packed, tmp: Path,  # noqa: ANN001
                  cache: Path) -> Any:
    """The engine of variant `name`, its weights the PackedModel `packed` (the same mapping for every
    variant) unless the name ends in `+own` (the build's own packed file, as it runs on its own). `rev:REV`
    is another revision's build, imported like --old's (into tmp). cache: the JIT cache directory."""
    name, own = name.removesuffix("+own"), name.endswith("+own")
    if name == "old" or name.startswith("rev:"):
        if name == "old" and old_pkg is None:
            raise SystemExit("variant 'old' needs --old REV")
        pkg = old_pkg if name == "old" else import_old(name[4:], tmp, "dllp2p_" + re.sub(r"\W", "_", name[4:]))
        old_engine = importlib.import_module(f"{pkg.__name__}.jit.engine")
        old_formats = importlib.import_module(f"{pkg.__name__}.formats")
        with _weights(old_engine, None if own else packed):
            return old_engine.JITEngine(old_formats.load_model(model_path), ctx, threads=threads, cache_dir=cache)
    with _weights(engine_module, None if own else packed):
        return _build_new(name, load_model(model_path), ctx, threads, cache)


@contextlib.contextmanager
def _weights(module, packed):  # noqa: ANN001
    """While building an engine of `module` (either build's jit/engine.py): load_packed returns `packed`."""
    if packed is None:
        yield
        return
    saved = module.load_packed
    module.load_packed = lambda model, cache_dir: packed
    try:
        yield
    finally:
        module.load_packed = saved


def _build_new(name: str, model, ctx: int, threads: int, cache: Path) -> JITEngine:  # noqa: ANN001
    if name == "new":
        return JITEngine(model, ctx, threads=threads, cache_dir=cache)
    if name == "static":
        return JITEngine(model, ctx, threads=threads, dynamic=False, cache_dir=cache)
    key, _, value = name.partition("=")
    if key == "spins":
        engine = JITEngine(model, ctx, threads=threads, cache_dir=cache)
        engine._bufs["barrier"][SPINS // 8] = int(value)
        return engine
    own_code = cache / "ab" / re.sub(r"\W", "_", name)  # the code cache's key ignores CHUNKS_PER_OP
    if key == "chunks":
        saved = ir_share.CHUNKS_PER_OP
        ir_share.CHUNKS_PER_OP = int(value)
        try:
            return JITEngine(model, ctx, threads=threads, cache_dir=own_code)
        finally:
            ir_share.CHUNKS_PER_OP = saved
    raise SystemExit(f"unknown variant {name!r}")


def barrier_sleeps(engine) -> int:  # noqa: ANN001
    """FUTEX_WAITs the engine's barrier waiters made so far (ir_barrier.py's counter; 0 for a build without)."""
    return int(engine._bufs["barrier"][SLEEPS // 8]) if engine._bufs["barrier"].size > SLEEPS // 8 + 1 else 0


def turn(engine, feed: list[int], start: int, clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], float]:  # noqa: ANN001
    """One untimed step, then len(feed) timed decode steps from position start: the step times and the
    calling thread's CPU seconds over them (time it was descheduled not counted; spinning at a barrier is)."""
    unpark(engine)
    try:
        engine.forward([feed[0]], start)
        times = []
        c0 = time.thread_time()
        for i, tok in enumerate(feed):
            t0 = clock()
            logits = engine.forward([tok], start + i)
            int(np.argmax(logits))
            times.append(clock() - t0)
        return times, time.thread_time() - c0
    finally:
        park(engine)


def weight_mappings() -> dict[str, tuple[int, int]]:
    """Packed-weights files mapped in this process (Linux /proc/self/smaps): name -> (kB mapped, kB of it
    mapped by 2 MiB page-table entries). How much of a file's page cache sits in huge folios differs from
    file to file (how it was written and read back), and it moves decode speed by several per cent."""
    out: dict[str, tuple[int, int]] = {}
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return out
    name = None
    for line in lines:
        head = line.split()
        if len(head) >= 6 and "-" in head[0] and head[5].endswith(".bin"):
            name, size = Path(head[5]).name, 0
        elif len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
            name = None
        elif name and head and head[0] == "Size:":
            size = int(head[1])
        elif name and head and head[0] == "FilePmdMapped:":
            kb, pmd = out.get(name, (0, 0))
            out[name] = (kb + size, pmd + int(head[1]))
    return out


# --- statistics -------------------------------------------------------------------------------------------


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics k and n-1-k, k the largest
    with P(Binomial(n, 1/2) <= k) <= (1 - level) / 2."""
    xs, n = sorted(values), len(values)
    k, cum = -1, 0.0
    for j in range(n):
        cum += math.comb(n, j) / 2**n
        if cum > (1 - level) / 2:
            break
        k = j
    if k < 0:
        return xs[0], xs[-1]
    return xs[k], xs[n - 1 - k]


def describe(ratios: list[float]) -> str:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    lo, hi = median_ci(ratios)
    faster = sum(r > 1 for r in ratios)
    return (f"median {statistics.median(ratios):.4f}  95% CI [{lo:.4f}, {hi:.4f}]  quartiles [{q[0]:.4f}, {q[2]:.4f}]"
            f"  faster in {faster}/{len(ratios)} rounds")


# --- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="git revision (of this checkout) or directory holding the old build's dllp2p")
    ap.add_argument("--variants", default="old,new", help="comma-separated; the first is the baseline (default old,new)")
    ap.add_argument("--model", default=None, help="GGUF path (default: the installed SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per turn")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="JIT cache (default %(default)s)")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    model_path = str(args.model or default_model_path())
    prompt = list(range(10, 10 + args.prompt_tokens))
    ctx = args.prompt_tokens + args.tokens + 2
    with tempfile.TemporaryDirectory(prefix="dllp2p-ab-") as tmp:
        old_pkg = import_old(args.old, Path(tmp)) if args.old else None
        cache = args.cache_dir.expanduser()
        packed = load_packed(load_model(model_path), cache / "weights")
        variants = []
        for name in names:
            t0 = time.perf_counter()
            engine = build_variant(name, model_path, ctx, args.threads, old_pkg, packed, Path(tmp), cache)
            engine.forward(prompt, 0)
            park(engine)
            variants.append(Variant(name, engine))
            print(f"built {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        for file, (kb, pmd) in weight_mappings().items():
            print(f"weights {file}: {kb // 1024} MiB mapped, {pmd // 1024} MiB of it in 2 MiB pages")
        first = variants[0].engine
        unpark(first)
        feed, tok = [], int(np.argmax(first.forward(prompt, 0)))
        for i in range(args.tokens):  # the greedy run's ids, fed to every turn of every variant
            feed.append(tok)
            tok = int(np.argmax(first.forward([tok], len(prompt) + i)))
        park(first)
        gc.disable()
        try:
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    s0 = barrier_sleeps(v.engine)
                    times, cpu = turn(v.engine, feed, len(prompt))
                    v.sleeps.append((barrier_sleeps(v.engine) - s0) / len(times))
                    v.rates.append(len(times) / sum(times))
                    v.medians.append(statistics.median(times))
                    v.cpu.append(cpu / len(times))
        finally:
            gc.enable()
            for v in variants:
                unpark(v.engine)
                v.engine.close()
    base = variants[0]
    print(f"{args.threads} threads, {args.tokens} timed decode steps per turn at positions {len(prompt)}.., "
          f"{args.rounds} rounds (order alternating); tok/s median over turns:")
    for v in variants:
        print(f"  {v.name:12s} {statistics.median(v.rates):8.1f} tok/s  (turns {min(v.rates):.0f}-{max(v.rates):.0f}),"
              f"  median step {statistics.median(v.medians) * 1e3:.3f} ms, thread 0 CPU {statistics.median(v.cpu) * 1e3:.3f} ms/step,"
              f" futex sleeps {statistics.median(v.sleeps):.1f}/step")
    for v in variants[1:]:
        print(f"{v.name} / {base.name}, paired by round:")
        print(f"  tok/s:              {describe([a / b for a, b in zip(v.rates, base.rates)])}")
        print(f"  median step time:   {describe([b / a for a, b in zip(v.medians, base.medians)])}  (as a speed ratio)")
        print(f"  thread 0 CPU/step:  {describe([b / a for a, b in zip(v.cpu, base.cpu)])}  (as a speed ratio)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
