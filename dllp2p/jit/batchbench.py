"""Aggregate decode speed of N concurrent sequences through one BatchEngine (issue 18), and memory.

    python -m dllp2p.jit.batchbench [--model PATH] [--threads 2] [--concurrency 1 4 8] [--tokens 32]
                                    [--prompt-tokens 32] [--rounds 3] [--rss-positions 0] [--in-cache] [--ceiling] [--json]
                                    [--old REV]

What one measurement is: N sequences (slots 0..N-1) each hold a prompt of --prompt-tokens ids (different
per slot, prefilled untimed in one forward_batch), then --tokens greedy decode steps, every step one
forward_batch of N one-token rows. Timed: the decode steps only. Reported per N: aggregate tok/s (N x
tokens / time), per-stream tok/s and ms per step (the latency each stream sees per token), and `vs_1`:
aggregate tok/s over the single stream's, the median over rounds of ratios taken in the same round
(concurrencies alternate within a round: a shared machine's speed drifts over minutes). Each round
rewinds every slot to the end of its prompt (start_pos), so no round grows the KV caches.

--rss-positions P (e.g. 2048): afterwards fill max(concurrency) slots with P positions each (prompt chunks,
untimed) and report the process's RSS once the engine is built, before and after, and the KV bytes it holds
(kv_bytes_per_position x positions): the memory of that many sequences of that length.

--in-cache: afterwards the same decode steps with every layer's matrices replaced by layer 0's (the engine's
table re-pointed, nothing copied: one layer's 2.2 MB of SmolLM2 stays in the caches), alternating with the
real ones round by round: ms per step with the weights streamed from memory and with them in cache (compute,
barriers and attention; the output projection, 31 % of SmolLM2's bytes, still streams), per N. What the
N-row step costs beyond the 1-row one when memory is not the limit: the bound on the N-stream speed-up.
Its logits are meaningless (the tokens fed are the real run's), its time is not.

--ceiling: afterwards this CPU's peak rates, measured then on the same threads (jit/ceiling.py); what one row's
multiply-adds cost at them per step (an N-row step's are N times that, and no engine's step here goes under
them); the ceiling that sets on any number of streams' speed-up over one stream (each round's one-stream step
over that cost, the median over rounds); and per N the share of the peak the measured N-row step runs at. A
target above the ceiling is out of physical reach in that run.

--old REV (a git revision of this checkout, or a directory holding a dllp2p package): the same decode figures
for that build's engine and this one's in the same process (bench_ab.import_old; one mapping of the packed
weights), taking turns: every round runs each N on each build, the builds' order alternating round by round,
each build's worker threads parked outside its turns. Adds per N the old build's step time over this one's, the
median of same-round ratios (> 1: this build is faster). A shared machine's speed drifts by 10-30 % between
processes; this ratio does not.

`decode_throughput(engine, concurrencies, ...)` is the function `dllp2p bench --concurrency` calls with
any BatchEngine (this node's JIT engine or the cluster's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine import BatchEngine, BatchRow
from ..formats import load_model
from ..models import default_model_path
from . import engine as engine_module
from .bench_ab import _weights, import_old, park, unpark
from .ceiling import FLOAT_TYPES, ceiling, row_floor
from .compiler import DEFAULT_CACHE_DIR
from .engine import JITEngine
from .program import LAYER_MATRICES


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(0, vocab, length)) for _ in range(n)]


def _decode(engine: BatchEngine, n: int, prompt_len: int, first: Sequence[int], tokens: int, top: int) -> float:
    """Seconds for `tokens` greedy steps of slots 0..n-1, each resuming at prompt_len with its token in first."""
    toks = list(first[:n])
    extra = (top,) if top else ()  # a cluster's forward_batch(rows, top): the workers send their best only
    t0 = time.perf_counter()
    for i in range(tokens):
        logits = engine.forward_batch([BatchRow(s, (toks[s],), prompt_len + i) for s in range(n)], *extra)
        toks = [int(row.argmax()) for row in logits]
    return time.perf_counter() - t0


def decode_throughput(engine: BatchEngine, concurrencies: Sequence[int], tokens: int = 32, prompt_len: int = 32,
                      rounds: int = 3, top: int = 0) -> dict[int, dict[str, float]]:
    """Per concurrency N: aggregate_tok_s, per_stream_tok_s, ms_per_step (medians over rounds) and vs_first
    (aggregate over concurrencies[0]'s, the median of same-round ratios). engine.max_seqs >= max(N). top > 0:
    passed to a ClusterEngine's forward_batch (greedy needs 1)."""
    most = max(concurrencies)
    if most > engine.max_seqs or prompt_len + tokens > engine.ctx:
        raise ValueError(f"needs {most} slots of {prompt_len + tokens} positions")
    prompts = _prompts(most, prompt_len, engine.config.vocab_size)
    logits = engine.forward_batch([BatchRow(s, p, 0) for s, p in enumerate(prompts)])
    first = [int(row.argmax()) for row in logits]
    _decode(engine, most, prompt_len, first, 2, top)  # warm-up
    secs: dict[int, list[float]] = {n: [] for n in concurrencies}
    for _ in range(rounds):
        for n in concurrencies:
            secs[n].append(_decode(engine, n, prompt_len, first, tokens, top))
    base = concurrencies[0]
    out = {}
    for n in concurrencies:
        t = statistics.median(secs[n])
        out[n] = {"aggregate_tok_s": n * tokens / t, "per_stream_tok_s": tokens / t, "ms_per_step": 1e3 * t / tokens,
                  "vs_first": statistics.median((n / a) / (base / b) for a, b in zip(secs[n], secs[base])),
                  "rounds_ms_per_step": [1e3 * a / tokens for a in secs[n]]}
    return out


def ceiling_figures(engine: JITEngine, decode: dict[int, dict[str, Any]], tokens: int, prompt_len: int,
                    threads: int) -> dict[str, Any]:
    """--ceiling (jit/ceiling.py): this CPU's peak rates measured now on `threads` threads; what one row's
    multiply-adds cost at them per step (row_floor_ms: every term is linear in the rows, so N rows cost N times
    it); the ceiling on any number of streams' speed-up, the median over rounds of that round's one-stream step
    (decode_throughput's figures began with N = 1) over row_floor_ms; per N > 1 the share of the peak its measured
    step runs at (N x row_floor_ms / step)."""
    rates, row_floor_s = row_floor(engine.spec, threads, range(prompt_len, prompt_len + tokens))
    row_floor_ms = 1e3 * row_floor_s
    one = decode[1]["rounds_ms_per_step"]
    return {"threads": threads, "f32_fma_per_s": rates.fma_per_s,
            "macs_per_s": {q.name: v for q, v in rates.macs_per_s.items() if q not in FLOAT_TYPES},
            "row_floor_ms": row_floor_ms, "one_stream_ms": statistics.median(one),
            "ceiling": statistics.median(ceiling(t1, row_floor_ms) for t1 in one),
            "by_streams": {n: {"measured": r["vs_first"], "share_of_peak": n * row_floor_ms / r["ms_per_step"]}
                           for n, r in decode.items() if n > 1}}


def ab_throughput(engines: dict[str, Any], concurrencies: Sequence[int], tokens: int = 32, prompt_len: int = 32,
                  rounds: int = 3) -> dict[str, dict[int, dict[str, float]]]:
    """decode_throughput's figures per engine (several builds', see --old), their turns alternating: a round runs
    each N on each engine, the engines' order reversed every other round, an engine parked outside its turns.
    Adds `vs_<first engine's name>` per N: that engine's step time over this one's (median of same-round ratios)."""
    names, most = list(engines), max(concurrencies)
    first: dict[str, list[int]] = {}
    for name, engine in engines.items():
        prompts = _prompts(most, prompt_len, engine.config.vocab_size)
        first[name] = [int(row.argmax()) for row in engine.forward_batch([BatchRow(s, p, 0) for s, p in enumerate(prompts)])]
        _decode(engine, most, prompt_len, first[name], 2, 0)  # warm-up
        park(engine)
    secs: dict[tuple[str, int], list[float]] = {(name, n): [] for name in names for n in concurrencies}
    try:
        for r in range(rounds):
            for n in concurrencies:
                for name in names if r % 2 == 0 else names[::-1]:
                    unpark(engines[name])
                    _decode(engines[name], n, prompt_len, first[name], 1, 0)  # the fresh threads' first step
                    secs[(name, n)].append(_decode(engines[name], n, prompt_len, first[name], tokens, 0))
                    park(engines[name])
    finally:
        for engine in engines.values():
            unpark(engine)
    out: dict[str, dict[int, dict[str, float]]] = {}
    base, n0 = names[0], concurrencies[0]
    for name in names:
        out[name] = {}
        for n in concurrencies:
            t, mine = statistics.median(secs[(name, n)]), secs[(name, n)]
            out[name][n] = {"aggregate_tok_s": n * tokens / t, "per_stream_tok_s": tokens / t, "ms_per_step": 1e3 * t / tokens,
                            "vs_first": statistics.median((n / a) / (n0 / b) for a, b in zip(mine, secs[(name, n0)])),
                            f"vs_{base}": statistics.median(b / a for a, b in zip(mine, secs[(base, n)]))}
    return out


def _ab_engines(old: str, tmp: Path, model_path, ctx: int, threads: int, max_seqs: int) -> dict[str, Any]:
    """{"old": the build `old`'s JITEngine, "new": this build's}, both on one mapping of the packed weights."""
    pkg = import_old(old, tmp)
    old_engine, old_formats = (importlib.import_module(f"{pkg.__name__}.{m}") for m in ("jit.engine", "formats"))
    cache = DEFAULT_CACHE_DIR.expanduser()
    packed = engine_module.load_packed(load_model(model_path), cache / "weights")
    with _weights(old_engine, packed):
        old = old_engine.JITEngine(old_formats.load_model(model_path), ctx, threads=threads, max_seqs=max_seqs)
    with _weights(engine_module, packed):
        return {"old": old, "new": JITEngine(load_model(model_path), ctx, threads=threads, max_seqs=max_seqs)}


def in_cache_steps(engine: JITEngine, concurrencies: Sequence[int], tokens: int = 16, prompt_len: int = 32,
                   rounds: int = 3) -> dict[int, dict[str, float]]:
    """Per N: ms_streamed and ms_in_cache, the median ms per decode step with the real weights and with every
    layer reading layer 0's matrices (see --in-cache), alternating within each round. Needs
    decode_throughput's prefill done (slots 0..max(N)-1 hold prompt_len positions)."""
    names = [f"{layer}.{m}" for layer in range(engine.config.n_layers) for m in LAYER_MATRICES]
    idx = np.array([engine._slots[name] for name in names])
    table = engine._table
    real = table[idx].copy()
    layer0 = np.array([table[engine._slots["0." + name.split(".", 1)[1]]] for name in names])
    first = [1] * max(concurrencies)
    secs: dict[tuple[int, str], list[float]] = {}
    try:
        for _ in range(rounds):
            for n in concurrencies:
                for kind, pointers in (("ms_streamed", real), ("ms_in_cache", layer0)):
                    table[idx] = pointers
                    secs.setdefault((n, kind), []).append(_decode(engine, n, prompt_len, first, tokens, 0))
    finally:
        table[idx] = real
    return {n: {kind: 1e3 * statistics.median(secs[(n, kind)]) / tokens for kind in ("ms_streamed", "ms_in_cache")}
            for n in concurrencies}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill_memory(engine: BatchEngine, n: int, positions: int, chunk: int = 256) -> dict[str, float]:
    """RSS (MB) before and after slots 0..n-1 hold `positions` positions each (random prompts, in chunks)."""
    before = _rss_mb()
    t0 = time.perf_counter()
    for s, prompt in enumerate(_prompts(n, positions, engine.config.vocab_size, seed=1)):
        for lo in range(0, positions, chunk):
            engine.forward_batch([BatchRow(s, prompt[lo : lo + chunk], lo)])
    return {"sequences": n, "positions": positions, "rss_before_mb": before, "rss_after_mb": _rss_mb(),
            "kv_mb": n * positions * engine.kv_bytes_per_position / 2**20, "fill_s": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dllp2p.jit.batchbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF path (default: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--rss-positions", type=int, default=0)
    p.add_argument("--in-cache", action="store_true", help="also time the steps with one layer's weights in cache")
    p.add_argument("--ceiling", action="store_true",
                   help="also the speed-up this CPU's arithmetic allows at its peak rates (needs 1 among --concurrency)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--old", help="also this git revision's (or directory's) build, A/B in the same process")
    ns = p.parse_args(argv)
    if ns.ceiling and (ns.old or ns.concurrency[0] != 1):
        p.error("--ceiling needs --concurrency to start with 1 (the one-stream steps it compares with) and no --old")
    if ns.old:
        return _main_ab(ns)
    model = load_model(ns.model or default_model_path())
    engine = JITEngine(model, ns.ctx, threads=ns.threads, max_seqs=max(ns.concurrency))
    built_mb = _rss_mb()
    try:
        result: dict[str, Any] = {"threads": ns.threads, "model": str(ns.model or default_model_path().name),
                                  "decode": decode_throughput(engine, ns.concurrency, ns.tokens, ns.prompt_tokens,
                                                              ns.rounds)}
        if ns.ceiling:
            result["ceiling"] = ceiling_figures(engine, result["decode"], ns.tokens, ns.prompt_tokens, ns.threads)
        if ns.in_cache:
            result["in_cache"] = in_cache_steps(engine, ns.concurrency, ns.tokens, ns.prompt_tokens, ns.rounds)
        if ns.rss_positions:
            result["memory"] = {"rss_engine_built_mb": built_mb,
                                **fill_memory(engine, max(ns.concurrency), min(ns.rss_positions, engine.ctx))}
    finally:
        engine.close()
    if ns.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}, {ns.threads} threads, {ns.tokens} decode steps after {ns.prompt_tokens}-token prompts")
    for n, r in result["decode"].items():
        print(f"  {n:2d} streams: {r['aggregate_tok_s']:7.1f} tok/s aggregate ({r['vs_first']:.2f}x), "
              f"{r['per_stream_tok_s']:6.1f} tok/s per stream, {r['ms_per_step']:.1f} ms/step")
    if "ceiling" in result:
        c = result["ceiling"]
        rates = ", ".join(f"{name} {v / 1e9:.0f} G" for name, v in c["macs_per_s"].items())
        print(f"  one row's multiply-adds at this CPU's peak ({c['threads']} threads at once: {rates} in the tiles' "
              f"arithmetic, f32 {c['f32_fma_per_s'] / 1e9:.0f} G a second): {c['row_floor_ms']:.3f} ms a step; one "
              f"stream's step {c['one_stream_ms']:.2f} ms: at most {c['ceiling']:.2f}x for any number of streams")
        print("  " + "; ".join(f"{n} streams {r['measured']:.2f}x, their step at {100 * r['share_of_peak']:.0f} % of "
                               "that peak" for n, r in c["by_streams"].items()))
    for n, r in result.get("in_cache", {}).items():
        print(f"  {n:2d} rows per step: {r['ms_streamed']:.2f} ms with the weights streamed, {r['ms_in_cache']:.2f} ms "
              f"with one layer's in cache")
    if "memory" in result:
        m = result["memory"]
        print(f"  RSS {m['rss_engine_built_mb']:.0f} MB with the engine built, {m['rss_before_mb']:.0f} MB after "
              f"decoding, {m['rss_after_mb']:.0f} MB with {m['sequences']} sequences x "
              f"{m['positions']} positions (KV {m['kv_mb']:.0f} MB)")
    return 0


def _main_ab(ns: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="dllp2p-batchbench-") as tmp:
        engines = _ab_engines(ns.old, Path(tmp), ns.model or default_model_path(), ns.ctx, ns.threads,
                              max(ns.concurrency))
        try:
            result = ab_throughput(engines, ns.concurrency, ns.tokens, ns.prompt_tokens, ns.rounds)
        finally:
            for engine in engines.values():
                engine.close()
    if ns.json:
        print(json.dumps({"threads": ns.threads, "old": ns.old, "decode": result}))
        return 0
    print(f"{ns.threads} threads, {ns.tokens} decode steps after {ns.prompt_tokens}-token prompts, {ns.rounds} rounds, "
          f"old = {ns.old}, new = this build (same process, alternating)")
    for n in ns.concurrency:
        new, old = result["new"][n], result["old"][n]
        print(f"  {n:2d} streams: new {new['aggregate_tok_s']:7.1f} tok/s aggregate ({new['vs_first']:.2f}x), "
              f"{new['ms_per_step']:.2f} ms/step; old {old['aggregate_tok_s']:7.1f} ({old['vs_first']:.2f}x), "
              f"{old['ms_per_step']:.2f} ms/step; old/new step time {new['vs_old']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
