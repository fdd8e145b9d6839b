"""`dllp2p bench --concurrency N`: decode speed of N greedy streams generated together (continuous batching,
session/batcher.py over the root's batch engine) against one stream alone, in the same run.

    dllp2p bench --concurrency 4 [--model PATH] [--threads N] [--prompt-tokens N] [--tokens N] [--repeats R] [--json]
                 [--workers HOST:PORT ... [--plan pow2|weighted|pipeline|hybrid]] [--key-file PATH]

One run of k streams: k different prompts of --prompt-tokens ids (bench.PROMPT_TEXT, each rotated by its
stream number so no prefix is shared) are admitted together and prefilled (not timed), then every
stream decodes --tokens greedy tokens, all k in each step (timed). Runs alternate 1 stream, N streams,
1, N, ... after one untimed warm-up of each, so both see the same machine state.

    aggregate tok/s   k x tokens / decode time: what the root delivers in all
    per-stream tok/s  tokens / decode time: what each client sees (its latency: the inverse)
    speedup           aggregate of N streams / one stream's, the median of the runs' ratios

The same engine (max_seqs N) serves both, as the daemon's does: one stream alone is one row per step.
With --workers, that engine is a tensor-parallel cluster over this process and those daemons (a
ClusterEngine with N KV slots on every node, as a root daemon with --cluster-batch makes it).
With --plan pipeline (or hybrid) the N streams run a third way in each round: in groups, one step per stage
in flight (as a root daemon's batcher does over a pipeline plan: BatchCore.plan_groups, ClusterEngine.submit /
complete), so the stages work on different groups at once; the N-stream figures above are then the groups',
and `one_batch_tok_s` / `groups_gain` say what one batch of N (pipeline_groups = 1) makes and their ratio.
rss_bytes: this process's peak resident memory at the end (the engine's N slots of ctx positions
included; --ctx sets them: 2048 with N = 8 is 8 sequences of 2048 tokens); with llama.cpp in the run, the peak
before llama.cpp is loaded, after a full-length warm-up of the N streams.

llama.cpp (on one node, when llama-cpp-python is installed and --llama-cpp is not off: bench's flag) runs the
same GGUF, prompts and greedy picks on the same threads in the same process, as a batch engine
(commands/bench_llama.LlamaCppBatch: its N sequences in one llama_decode a step, as llama-server's parallel
slots), alternating with ours run by run (ours 1, ours N, llama.cpp 1, llama.cpp N, ...): its one-stream and
aggregate tok/s and speedup, and ours over its aggregate and one stream.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .bench import PROMPT_TEXT, agreeing_prefix, resolve_threads
from .commands.bench_llama import LlamaCppBatch, llama_cpp_available
from .engine import kv_bytes_per_position
from .errors import user_facing_errors
from .formats import load_model
from .models import default_model_path
from .session.batcher import BatchConfig, BatchCore, Seq
from .session.batching import jit_batch_engine
from .session.root import ClusterEngine, ClusterOptions
from .tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What `dllp2p bench` takes beyond bench.add_arguments'."""
    parser.add_argument("--concurrency", type=int, metavar="N", default=0,
                        help="measure N greedy streams generated together against one stream (aggregate and "
                             "per-stream decode tok/s)")
    parser.add_argument("--ctx", type=int, metavar="N", default=0,
                        help="with --concurrency: KV positions of each stream's slot (default: prompt + tokens)")
    parser.add_argument("--workers", nargs="+", metavar="HOST:PORT", default=(),
                        help="with --concurrency: run over these worker daemons as well (tensor parallel)")
    parser.add_argument("--plan", dest="cluster_plan", choices=("pow2", "weighted", "pipeline", "hybrid"),
                        default="pow2", help="with --workers: the plan (pipeline, hybrid: also N streams in groups, "
                                             "one step per stage in flight, against one batch)")
    parser.add_argument("--key-file", dest="key_file", metavar="PATH",
                        help="with --workers: the cluster key file (default: as for `dllp2p run`)")


@dataclass(frozen=True)
class ConcurrencyConfig:
    model: str | None
    concurrency: int
    threads: int
    prompt_tokens: int
    tokens: int
    repeats: int
    ctx: int
    json: bool
    cache_dir: Any = None
    workers: tuple[str, ...] = ()
    key: Any = None  # clusterkey.ClusterKey the connections to the workers are made with
    plan: str = "pow2"  # with workers: ClusterOptions.policy
    llama_cpp: str = "off"  # auto | on | off: llama.cpp's batched decode in the same run (one node only)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.threads < 1 or self.prompt_tokens < 1 or self.tokens < 2 or self.repeats < 1:
            raise ValueError("--concurrency, --threads, --prompt-tokens, --repeats must be at least 1, --tokens 2")
        if self.ctx and self.ctx < self.prompt_tokens + self.tokens:
            raise ValueError(f"--ctx {self.ctx} is under --prompt-tokens + --tokens")
        if self.workers and self.llama_cpp == "on":
            raise ValueError("--llama-cpp on compares one node: it cannot run with --workers")


def prompts(tokenizer: Tokenizer, n: int, length: int) -> list[tuple[int, ...]]:
    """n prompts of `length` ids: the paragraph repeated to length, rotated by i (no shared prefix)."""
    ids = tokenizer.encode(PROMPT_TEXT)
    base = (ids * (length // len(ids) + 2))
    return [tuple(base[i: i + length]) for i in range(n)]


def decode_run(engine: Any, prompts_: list[tuple[int, ...]], tokens: int, ctx: int,
               groups: int = 1) -> tuple[float, list[list[int]]]:
    """Prefill every prompt together, then decode `tokens` greedy tokens each: all streams in each step, or
    (groups > 1: an engine with submit/complete) in up to `groups` groups whose steps are in flight at once.
    -> (decode seconds, each stream's tokens)."""
    core = BatchCore(BatchConfig(max_batch=engine.max_seqs, chunk=max(map(len, prompts_)) * len(prompts_)), ctx,
                     engine.kv_bytes_per_position)
    seqs = [Seq(i, p, tokens, ctx) for i, p in enumerate(prompts_)]
    for s in seqs:
        core.submit(s)
    t0 = None
    flying: deque = deque()  # (step, ticket) submitted, oldest first
    while True:
        if t0 is None or groups == 1:  # the prefill: one step of every prompt
            if (step := core.plan()) is None:
                break
            logits = engine.forward_batch(step.rows)  # f32[rows, vocab]
        else:
            for new in core.plan_groups(groups, len(flying)):
                flying.append((new, engine.submit(new.rows)))
            if not flying:
                break
            step, ticket = flying.popleft()
            logits = engine.complete(ticket)
        core.advance(step)
        for i, (seq, sample) in enumerate(zip(step.seqs, step.sample)):
            if sample:
                core.push(seq, int(np.argmax(logits[i])))
        if t0 is None:  # the prefill step gave every stream its first token: decoding starts now
            t0 = time.perf_counter()
    return time.perf_counter() - t0, [s.tokens[len(s.prompt):] for s in seqs]


def run(cfg: ConcurrencyConfig, llama_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The report. llama_factory(path, ctx, threads, max_seqs, kv_bytes_per_position) -> a batch engine with a
    `version` (tests); None: LlamaCppBatch, as cfg.llama_cpp says."""
    path = cfg.model or default_model_path()
    model = load_model(path)
    tok = Tokenizer.from_metadata(model.metadata)
    ctx = cfg.ctx or cfg.prompt_tokens + cfg.tokens
    n = cfg.concurrency
    if cfg.workers:
        options = ClusterOptions(tuple(cfg.workers), cfg.plan, cache_dir=cfg.cache_dir, key=cfg.key, max_seqs=n)
        engine = ClusterEngine.connect(model, options, ctx, cfg.threads)
    else:
        engine = jit_batch_engine(model, ctx, cfg.threads, n, cfg.cache_dir)
    depth = getattr(engine, "depth", 1) if n > 1 else 1  # a pipeline's stages: groups in flight
    llama, llama_error = None, None
    try:
        ps = prompts(tok, n, cfg.prompt_tokens)
        solo, many, batch, l_solo, l_many, agree = [], [], [], [], [], []
        wants_llama = llama_factory is not None or _wants_llama_cpp(cfg)
        decode_run(engine, ps[:1], 4, ctx)  # warm-ups (all the N streams' positions, before llama.cpp loads)
        decode_run(engine, ps, cfg.tokens if wants_llama else 4, ctx, depth)
        rss = _peak_rss()
        if wants_llama:
            llama, llama_error = _start_llama_cpp(cfg, path, ctx, n, engine.kv_bytes_per_position, llama_factory)
        if llama is not None:
            decode_run(llama, ps[:1], 4, ctx)
            decode_run(llama, ps, 4, ctx)
        steps = cfg.tokens - 1  # the first token comes from the prefill
        for _ in range(cfg.repeats):
            t1, one = decode_run(engine, ps[:1], cfg.tokens, ctx)
            tn, out = decode_run(engine, ps, cfg.tokens, ctx, depth)
            if depth > 1:
                tb, out_b = decode_run(engine, ps, cfg.tokens, ctx)
                if out_b != out:
                    raise AssertionError("the streams' greedy tokens differ between groups in flight and one batch")
                batch.append(n * steps / tb)
            if out[0] != one[0]:
                raise AssertionError("stream 0's greedy tokens differ between its solo and its batched run")
            solo.append(steps / t1)
            many.append(n * steps / tn)
            if llama is not None:
                t1, _ = decode_run(llama, ps[:1], cfg.tokens, ctx)
                tn, theirs = decode_run(llama, ps, cfg.tokens, ctx)
                l_solo.append(steps / t1)
                l_many.append(n * steps / tn)
                agree.append(agreeing_prefix(out[0], theirs[0]))
    finally:
        engine.close()
        if llama is not None:
            llama.close()
    if llama is None:
        rss = _peak_rss()
    bound = _ceiling(engine, cfg, [1 / s for s in solo], n / statistics.median(many))  # (its loops' compile after the RSS)
    ratios = [m / s for m, s in zip(many, solo)]
    grouped = {"groups": depth, "one_batch_tok_s": statistics.median(batch),
               "groups_gain": statistics.median([m / b for m, b in zip(many, batch)])} if batch else {"groups": 1}
    report = {"model": str(path), "engine": type(engine).__name__, "nodes": getattr(getattr(engine, "plan", None), "n_nodes", 1),
              "plan": getattr(getattr(engine, "plan", None), "policy", "alone"), **grouped,
              "threads": cfg.threads, "concurrency": n, "ctx": ctx,
              "prompt_tokens": cfg.prompt_tokens, "tokens": cfg.tokens, "repeats": cfg.repeats,
              "one_stream_tok_s": statistics.median(solo), "aggregate_tok_s": statistics.median(many),
              "per_stream_tok_s": statistics.median(many) / n, "per_stream_ms_per_token": 1000 * n / statistics.median(many),
              "speedup": statistics.median(ratios), "kv_bytes": n * ctx * kv_bytes_per_position(model.config),
              "rss_bytes": rss, "llama_cpp": None, "ceiling": bound}
    if llama_error:
        report["llama_cpp_error"] = llama_error
    if llama is not None:
        report["llama_cpp"] = {
            "version": llama.version, "one_stream_tok_s": statistics.median(l_solo),
            "aggregate_tok_s": statistics.median(l_many), "per_stream_tok_s": statistics.median(l_many) / n,
            "speedup": statistics.median([m / s for m, s in zip(l_many, l_solo)]),
            "one_stream_tok_s_runs": l_solo, "aggregate_tok_s_runs": l_many,
            "greedy_agree_tokens": min(agree)}  # stream 0's first tokens, ours and theirs, in the N-stream runs
        report["aggregate_vs_llama_cpp"] = statistics.median([m / t for m, t in zip(many, l_many)])
        report["one_stream_vs_llama_cpp"] = statistics.median([s / t for s, t in zip(solo, l_solo)])
    return report


def _ceiling(engine: Any, cfg: ConcurrencyConfig, one_step_s: list[float], many_step_s: float) -> dict[str, float] | None:
    """(one node, the JIT engine) The most any number of streams can give over one on this CPU in this run
    (jit/ceiling.py: one stream's step over what one row's multiply-adds cost at the peak rates measured now on
    the same threads; the median over the runs), and the share of that peak the N-stream step ran at."""
    spec = getattr(engine, "spec", None)
    if cfg.workers or spec is None:
        return None
    from .jit.ceiling import ceiling, row_floor

    _, row_floor_s = row_floor(spec, cfg.threads, range(cfg.prompt_tokens, cfg.prompt_tokens + cfg.tokens))
    return {"row_floor_ms": 1e3 * row_floor_s, "ceiling": statistics.median(ceiling(t, row_floor_s) for t in one_step_s),
            "share_of_peak": cfg.concurrency * row_floor_s / many_step_s}


def _wants_llama_cpp(cfg: ConcurrencyConfig) -> bool:
    """llama.cpp in the run: `on`, or `auto` with llama-cpp-python installed; one node only."""
    if cfg.llama_cpp == "off" or cfg.workers:
        return False
    return cfg.llama_cpp == "on" or llama_cpp_available()


def _start_llama_cpp(cfg: ConcurrencyConfig, path: Any, ctx: int, n: int, kv_bytes: int,
                     factory: Callable[..., Any] | None) -> tuple[Any, str | None]:
    """(llama.cpp's batch engine, None), or with `auto` (None, why it did not start)."""
    try:
        return (factory or LlamaCppBatch)(str(path), ctx, cfg.threads, n, kv_bytes), None
    except Exception as e:  # noqa: BLE001 (llama.cpp's loader raises anything; `on` makes it the user's error)
        if cfg.llama_cpp == "on":
            raise ValueError(f"llama.cpp could not run {path}: {e}") from None
        return None, f"{type(e).__name__}: {e}"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_report(r: dict[str, Any]) -> str:
    pad = ' ' * max(0, 3 - len(str(r['concurrency'])))
    groups = (f" in {r['groups']} groups in flight" if r["groups"] > 1 else "")
    batch = (f"  {r['concurrency']} streams {pad}{r['one_batch_tok_s']:8.1f} tok/s aggregate as one batch "
             f"(pipeline_groups 1); groups in flight x{r['groups_gain']:.2f} over it (same run)\n" if r["groups"] > 1 else "")
    return (f"{r['model']} ({r['engine']}, {r['nodes']} node(s), {r['plan']} plan, {r['threads']} threads, ctx {r['ctx']}): "
            f"{r['tokens']} greedy tokens after {r['prompt_tokens']} prompt tokens, medians of {r['repeats']} alternated runs\n"
            f"  1 stream     {r['one_stream_tok_s']:8.1f} tok/s\n"
            f"  {r['concurrency']} streams {pad}{r['aggregate_tok_s']:8.1f} tok/s "
            f"aggregate{groups}, {r['per_stream_tok_s']:.1f} tok/s per stream ({r['per_stream_ms_per_token']:.1f} ms/token)\n"
            f"{batch}"
            f"  speedup      x{r['speedup']:.2f} (aggregate over one stream, same run)\n"
            f"  memory       KV {r['kv_bytes'] / 2**20:.0f} MiB, peak RSS {r['rss_bytes'] / 2**20:.0f} MiB"
            f"{_ceiling_line(r)}{_llama_lines(r)}")


def _ceiling_line(r: dict[str, Any]) -> str:
    c = r.get("ceiling")
    if not c:
        return ""
    return (f"\n  ceiling      x{c['ceiling']:.2f} for any number of streams on this CPU now: one row's multiply-adds at "
            f"its peak rates (measured in this run) take {c['row_floor_ms']:.3f} ms a step; the {r['concurrency']}-stream "
            f"step ran at {c['share_of_peak']:.0%} of that peak")


def _llama_lines(r: dict[str, Any]) -> str:
    lc = r.get("llama_cpp")
    if lc:
        return (f"\n  llama.cpp    {lc['version']}: 1 stream {lc['one_stream_tok_s']:.1f} tok/s, {r['concurrency']} streams "
                f"{lc['aggregate_tok_s']:.1f} tok/s aggregate ({lc['per_stream_tok_s']:.1f} per stream), "
                f"speedup x{lc['speedup']:.2f}\n"
                f"  ours / llama.cpp: aggregate x{r['aggregate_vs_llama_cpp']:.2f}, one stream x{r['one_stream_vs_llama_cpp']:.2f} "
                f"(stream 0's greedy tokens agree for {lc['greedy_agree_tokens']} of {r['tokens']})")
    if r.get("llama_cpp_error"):
        return f"\n  llama.cpp    failed to start: {r['llama_cpp_error']}"
    return ""


def main(args: argparse.Namespace, out=None, err=None, cache_dir=None, key=None) -> int:  # noqa: ANN001
    """`key`: the cluster key (the CLI loads it) for --workers."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be at least 1")
        threads = resolve_threads(args.threads, err)
        cfg = ConcurrencyConfig(args.model, args.concurrency, threads, args.prompt_tokens, args.tokens,
                                args.repeats, args.ctx, args.json, cache_dir, tuple(args.workers), key,
                                args.cluster_plan, getattr(args, "llama_cpp", "off"))
        report = run(cfg)
    except user_facing_errors() as e:
        print(f"dllp2p: error: {e}", file=err)
        return 1
    print(json.dumps(report) if cfg.json else format_report(report), file=out)
    return 0
