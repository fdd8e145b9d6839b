"""`dllp2p bench`: prefill and decode speed on this machine, against the memory-bandwidth roofline.

    dllp2p bench [--model PATH] [--threads N] [--prompt-tokens N] [--tokens N] [--repeats R] [--json]
    dllp2p bench --load [--model PATH] [--tokens N] [--repeats R] [--json]   (commands/bench_load.py)

What one run is (the same for every engine):

    prefill  forward(prompt, 0) on a fixed prompt of --prompt-tokens ids      -> prefill tok/s
    decode   --tokens greedy steps forward([tok], pos) after the prompt         -> decode tok/s

The prompt is a fixed English paragraph encoded once with the model's own tokenizer (not timed) and
repeated to length; every engine gets the same ids. Each engine first does one untimed warm-up
run (the full prefill and a few decode steps); speeds are medians over the --repeats runs after it.

Decoding one token streams every layer matrix and the output projection from memory once, so
decode speed is bounded by (memory read bandwidth) / (weight bytes per token): the roofline. The
bandwidth is measured in the same process by a JIT streaming kernel on the same number of threads
(dllp2p.jit.membw), after the engines are closed.

When llama-cpp-python is installed (`pip install -e '.[bench]'`), llama.cpp runs the same GGUF with
the same threads and the same token ids in the same process, alternating run by run (ours,
llama.cpp, ours, ...) so that both see the same machine state; the ratios are ours / llama.cpp
(above 1: ours is faster). Only llama.cpp's evaluation calls are timed, never its tokenizer.

startup_s is the time from before the model file is opened to the first logits (a one-token
forward); startup_process_s counts from the process's own start (Linux), imports included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .commands import bench_load
from .commands.bench_llama import LlamaCpp, llama_cpp_available
from .jit.cpus import cap_threads, choose_threads, read_cpu_facts

PROMPT_TEXT = (
    "The history of computing is a story of machines that became smaller, cheaper and faster, "
    "until the computers in a single home held more memory than the largest installations of an "
    "earlier age. A language model reads its weights from that memory once for every token it "
    "writes, so the speed of the memory, more than the speed of the arithmetic, sets the pace. "
)

ENGINES = ("jit", "reference")
DEFAULT_PROMPT_TOKENS = 128
DEFAULT_TOKENS = 64
DEFAULT_REPEATS = 5
DEFAULT_BANDWIDTH_MIB = 1024
BANDWIDTH_RUNS = 5
WARMUP_DECODE_STEPS = 4
PAUSE_S = 0.2  # between runs of different engines: lets the other's worker threads go idle


# ---------------------------------------------------------------------------------------------
# arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="GGUF model path (default: the installed SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", choices=ENGINES, default="jit", help="engine to measure (default jit)")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="threads for our engine, llama.cpp and the bandwidth measurement "
        "(default: the cores this process may use less those other programs keep busy, as `dllp2p run`)"
    )
    parser.add_argument(
        "--load", action="store_true", help="with a CPU hog pinned to one core: decode speed of the default thread "
        "count, 1 and 2 threads, then without it the default against one thread per core (commands/bench_load.py)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, metavar="N", default=DEFAULT_PROMPT_TOKENS,
        help=f"prompt length of the prefill benchmark (default {DEFAULT_PROMPT_TOKENS})",
    )
    parser.add_argument(
        "--tokens", type=int, metavar="N", default=DEFAULT_TOKENS, help=f"greedy decode steps per run (default {DEFAULT_TOKENS})"
    )
    parser.add_argument(
        "--repeats", type=int, metavar="R", default=DEFAULT_REPEATS, help=f"runs per engine; speeds are medians (default {DEFAULT_REPEATS})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--llama-cpp", choices=("auto", "on", "off"), default="auto",
        help="compare with llama.cpp: auto = when llama-cpp-python is installed (default), on = required, off = never",
    )
    parser.add_argument(
        "--bandwidth-mib", type=int, metavar="MIB", default=DEFAULT_BANDWIDTH_MIB,
        help=f"buffer of the memory-bandwidth measurement in MiB; 0 skips it (default {DEFAULT_BANDWIDTH_MIB})",
    )


@dataclass(frozen=True)
class BenchConfig:
    model: str | None
    engine: str
    threads: int
    prompt_tokens: int
    tokens: int
    repeats: int
    json: bool
    llama_cpp: str
    bandwidth_mib: int
    cache_dir: Any = None  # the JIT's compiled code and packed weights (config.cache_dir); None: its default
    load: bool = False  # --load: the busy-core comparison of thread counts instead (commands/bench_load.py)

    @property
    def ctx(self) -> int:
        return self.prompt_tokens + self.tokens


def agreeing_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def resolve_threads(threads: int | None, err=None, measure_load: bool = True) -> int:  # noqa: ANN001
    """--threads capped to the cores (a one-line warning on err), or when not given chosen as the daemon chooses
    (jit/cpus.choose_threads: the cores this process may use, less those busy with others)."""
    facts = read_cpu_facts(measure_load=threads is None and measure_load)
    if threads is None:
        return choose_threads(facts).threads
    threads, warning = cap_threads(threads, facts)
    if warning:
        print(f"dllp2p: warning: {warning}", file=err or sys.stderr)
    return threads


def bench_config(ns: argparse.Namespace, err=None) -> BenchConfig:  # noqa: ANN001
    """The flags checked; --threads capped to the cores (a one-line warning on err), or chosen when not given."""
    for flag, value in (("--threads", 1 if ns.threads is None else ns.threads), ("--prompt-tokens", ns.prompt_tokens),
                        ("--tokens", ns.tokens), ("--repeats", ns.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    threads = resolve_threads(ns.threads, err, measure_load=not getattr(ns, "load", False))
    if ns.bandwidth_mib < 0:
        raise ValueError("--bandwidth-mib must be 0 (skip) or more")
    return BenchConfig(
        getattr(ns, "model", None), ns.engine, threads, ns.prompt_tokens, ns.tokens, ns.repeats, ns.json,
        ns.llama_cpp, ns.bandwidth_mib, load=getattr(ns, "load", False),
    )


# ---------------------------------------------------------------------------------------------
# what is measured


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token streams: every layer tensor plus the output projection
    (token_embd when the output is tied). The one embedding row a token looks up is left out."""
    layers = sum(t.nbytes for name, t in model.tensors.items() if name.startswith("blk."))
    return int(layers + model.output_tensor().nbytes)


def prompt_ids(model, n: int) -> list[int]:
    """n token ids: PROMPT_TEXT encoded by the model's tokenizer (BOS first when the model adds one),
    repeated to length. Deterministic ids in the vocabulary when the tokenizer cannot be built."""
    from .tokenizer import Tokenizer, TokenizerError

    ids: list[int] = []
    try:
        tok = Tokenizer.from_metadata(model.metadata)
        body = tok.encode(PROMPT_TEXT, add_bos=False, add_eos=False, parse_special=False)
        if tok.add_bos and tok.bos_id is not None:
            ids.append(tok.bos_id)
    except (TokenizerError, KeyError, ValueError):
        body = []
    if not body:
        vocab = model.config.vocab_size
        body = [(7919 * i + 13) % vocab for i in range(max(n, 1))]
    while len(ids) < n:
        ids.extend(body[: n - len(ids)])
    return ids


class Forward(Protocol):
    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray: ...


@dataclass
class RunResult:
    prefill_s: float
    decode_s: float  # sum of the timed decode forwards
    generated: list[int]  # greedy ids: the prefill's argmax, then one per decode step

    def prefill_tok_s(self, n_prompt: int) -> float:
        return n_prompt / self.prefill_s

    def decode_tok_s(self) -> float:
        return (len(self.generated) - 1) / self.decode_s


def timed_run(engine: Forward, prompt: Sequence[int], steps: int, clock: Callable[[], float] = time.perf_counter) -> RunResult:
    """Prefill the prompt at position 0, then `steps` greedy decode forwards; only forwards are timed."""
    t0 = clock()
    logits = engine.forward(prompt, 0)
    prefill_s = clock() - t0
    tok = int(np.argmax(logits))
    generated = [tok]
    decode_s = 0.0
    pos = len(prompt)
    for _ in range(steps):
        t0 = clock()
        logits = engine.forward([tok], pos)
        decode_s += clock() - t0
        tok = int(np.argmax(logits))
        generated.append(tok)
        pos += 1
    return RunResult(prefill_s, decode_s, generated)


@dataclass
class Contender:
    """One engine under test: how it was started and its runs."""

    name: str
    engine: Any
    startup_s: float
    version: str = ""
    runs: list[RunResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, n_prompt: int) -> dict[str, Any]:
        prefill = [r.prefill_tok_s(n_prompt) for r in self.runs]
        decode = [r.decode_tok_s() for r in self.runs]
        return {
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode),
            "prefill_tok_s_runs": prefill,
            "decode_tok_s_runs": decode,
            "startup_s": self.startup_s,
        }

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------
# engines


def make_engine(kind: str, model, ctx: int, threads: int, cache_dir=None):  # noqa: ANN001
    if kind == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model, ctx, keep_weights=True)
    if kind == "jit":
        try:
            from .jit.engine import JITEngine
        except ImportError as e:
            raise ValueError(f"the JIT engine is not available ({e}); use --engine reference") from None
        return JITEngine(model, ctx=ctx, threads=threads, **({} if cache_dir is None else {"cache_dir": cache_dir}))
    raise ValueError(f"unknown engine {kind!r}")


def start_llama_cpp(path: str, ctx: int, threads: int) -> Contender:
    t0 = time.perf_counter()
    eng = LlamaCpp(path, ctx, threads)
    eng.forward([0], 0)
    return Contender("llama.cpp", eng, time.perf_counter() - t0, eng.version)


# ---------------------------------------------------------------------------------------------
# the benchmark


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; 10 ms resolution), else None."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_bench(cfg: BenchConfig, llama_factory: Callable[[str, int, int], Contender] | None = None) -> dict[str, Any]:
    """Run everything and return the report (the JSON object). llama_factory(path, ctx, threads) -> a
    started Contender; None: llama.cpp as --llama-cpp says."""
    from .formats import load_model
    from .models import resolve_model

    t_start = time.perf_counter()
    path = resolve_model(cfg.model)
    model = load_model(path)
    load_s = time.perf_counter() - t_start
    if cfg.ctx > model.config.context_length:
        raise ValueError(
            f"--prompt-tokens + --tokens = {cfg.ctx} exceeds the model's context of {model.config.context_length}"
        )
    engine = make_engine(cfg.engine, model, cfg.ctx, cfg.threads, cfg.cache_dir)
    init_s = time.perf_counter() - t_start - load_s
    try:
        engine.forward([0], 0)  # the first logits
    except BaseException:
        engine.close()
        raise
    startup_s = time.perf_counter() - t_start
    process_s = _process_age_s()
    ours = Contender(f"dllp2p-{cfg.engine}", engine, startup_s)
    ours.extra = {"load_s": load_s, "engine_init_s": init_s, "first_logits_s": startup_s - load_s - init_s}
    contenders = [ours]
    try:
        if cfg.llama_cpp == "off":
            llama_factory = None
        elif llama_factory is None and (cfg.llama_cpp == "on" or llama_cpp_available()):
            llama_factory = start_llama_cpp
        llama_error = None
        if llama_factory is not None:
            try:
                contenders.append(llama_factory(str(path), cfg.ctx, cfg.threads))
            except Exception as e:  # auto: report it and measure ours alone; on: the user asked for it
                if cfg.llama_cpp == "on":
                    raise ValueError(f"llama.cpp could not run {path}: {e}") from None
                llama_error = f"{type(e).__name__}: {e}"

        prompt = prompt_ids(model, cfg.prompt_tokens)
        for c in contenders:  # one untimed warm-up run each: the full prefill, a few decode steps
            timed_run(c.engine, prompt, min(cfg.tokens, WARMUP_DECODE_STEPS))
        for _ in range(cfg.repeats):
            for c in contenders:
                if len(contenders) > 1:
                    time.sleep(PAUSE_S)
                c.runs.append(timed_run(c.engine, prompt, cfg.tokens))
        bytes_per_token = getattr(engine, "weight_bytes_per_token", None)
        source = "engine"
        if not bytes_per_token:
            bytes_per_token, source = weight_bytes_per_token(model), "model"
    finally:
        for c in contenders:
            c.close()
    del engine
    gc.collect()

    report: dict[str, Any] = {
        "model": str(path),
        "engine": cfg.engine,
        "cpu": _cpu_name(),
        "threads": cfg.threads,
        "prompt_tokens": cfg.prompt_tokens,
        "tokens": cfg.tokens,
        "repeats": cfg.repeats,
        "statistic": "median",  # of *_runs, for every speed below
        **ours.summary(cfg.prompt_tokens),
        "startup_process_s": process_s,
        **ours.extra,
        "bytes_per_token": int(bytes_per_token),
        "bytes_per_token_source": source,
    }
    report.update(_bandwidth(cfg, report["decode_tok_s"], int(bytes_per_token)))
    report["llama_cpp"] = None
    if llama_error:
        report["llama_cpp_error"] = llama_error
    if len(contenders) > 1:
        other = contenders[1]
        theirs = {"version": other.version, **other.summary(cfg.prompt_tokens)}
        report["llama_cpp"] = theirs
        report["decode_ratio"] = report["decode_tok_s"] / theirs["decode_tok_s"]
        report["prefill_ratio"] = report["prefill_tok_s"] / theirs["prefill_tok_s"]
        if report.get("roofline_tok_s"):
            theirs["roofline_pct"] = 100.0 * theirs["decode_tok_s"] / report["roofline_tok_s"]
        a, b = ours.runs[0].generated, other.runs[0].generated
        report["greedy_agree_tokens"] = agreeing_prefix(a, b)
    return report


def _bandwidth(cfg: BenchConfig, decode_tok_s: float, bytes_per_token: int) -> dict[str, Any]:
    out: dict[str, Any] = {"bandwidth_gb_s": None, "bandwidth_gb_s_runs": [], "roofline_tok_s": None, "roofline_pct": None}
    if cfg.bandwidth_mib == 0:
        return out
    from .jit.membw import measure_bandwidth

    bw = measure_bandwidth(cfg.threads, cfg.bandwidth_mib << 20, BANDWIDTH_RUNS)
    roofline = bw.gb_s * 1e9 / bytes_per_token
    out.update(
        bandwidth_gb_s=bw.gb_s,
        bandwidth_gb_s_runs=list(bw.runs_gb_s),
        bandwidth_bytes=bw.nbytes,
        roofline_tok_s=roofline,
        roofline_pct=100.0 * decode_tok_s / roofline,
    )
    return out


# ---------------------------------------------------------------------------------------------
# output


def _runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"model      {r['model']}",
        f"engine     {r['engine']}, {r['threads']} thread(s), prompt {r['prompt_tokens']} tokens, "
        f"decode {r['tokens']} tokens, median of {r['repeats']} run(s); {r['cpu']}",
        f"startup    {r['startup_s']:.2f} s to first logits (load {r['load_s']:.2f} s, engine {r['engine_init_s']:.2f} s, "
        f"first forward {r['first_logits_s']:.2f} s)"
        + (f"; {r['startup_process_s']:.2f} s since process start" if r.get("startup_process_s") is not None else ""),
        f"prefill    {r['prefill_tok_s']:.1f} tok/s (runs {_runs(r['prefill_tok_s_runs'])})",
        f"decode     {r['decode_tok_s']:.1f} tok/s (runs {_runs(r['decode_tok_s_runs'])})",
        f"weights    {r['bytes_per_token'] / 1e6:.1f} MB per token",
    ]
    if r.get("bandwidth_gb_s") is not None:
        lines.append(
            f"bandwidth  {r['bandwidth_gb_s']:.1f} GB/s measured on {r['threads']} thread(s) "
            f"(runs {_runs(r['bandwidth_gb_s_runs'])})"
        )
        lines.append(
            f"roofline   {r['roofline_tok_s']:.1f} tok/s; decode reaches {r['roofline_pct']:.1f} % of it"
        )
    else:
        lines.append("bandwidth  not measured (--bandwidth-mib 0)")
    lc = r.get("llama_cpp")
    if lc:
        lines.append(
            f"llama.cpp  {lc['version']}: prefill {lc['prefill_tok_s']:.1f} tok/s (runs {_runs(lc['prefill_tok_s_runs'])}), "
            f"decode {lc['decode_tok_s']:.1f} tok/s (runs {_runs(lc['decode_tok_s_runs'])}), startup {lc['startup_s']:.2f} s"
        )
        lines.append(
            f"ratio      ours / llama.cpp: prefill {r['prefill_ratio']:.2f}x, decode {r['decode_ratio']:.2f}x "
            f"(greedy tokens agree for {r['greedy_agree_tokens']} of {r['tokens'] + 1})"
        )
    elif r.get("llama_cpp_error"):
        lines.append(f"llama.cpp  failed to start: {r['llama_cpp_error']}")
    else:
        lines.append("llama.cpp  not run (install with: pip install -e '.[bench]')")
    return "\n".join(lines)


def main(args: argparse.Namespace, out=None, err=None, cache_dir=None) -> int:  # noqa: ANN001
    out = out or sys.stdout
    err = err or sys.stderr
    from .errors import user_facing_errors

    try:
        cfg = replace(bench_config(args, err), cache_dir=cache_dir)
        if cfg.load:
            return bench_load.main(cfg, bench_load.BenchTools(make_engine, prompt_ids, timed_run), out, err)
        if cfg.llama_cpp == "on" and not llama_cpp_available():
            raise ValueError("--llama-cpp on needs llama-cpp-python: pip install -e '.[bench]'")
        report = run_bench(cfg)
    except user_facing_errors() as e:
        print(f"dllp2p: error: {e}", file=err)
        return 1
    print(json.dumps(report) if cfg.json else format_report(report), file=out)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="dllp2p bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
