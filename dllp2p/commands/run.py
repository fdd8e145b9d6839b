"""`dllp2p run`: through a daemon (it hands the prompt to the cluster's root and streams the text back),
else in this process: model -> tokens -> engine -> streamed text on stdout, stats on stderr.

Which: a daemon named with --daemon must answer (else the command fails, saying why); the default
local daemon is used if one answers there, else the prompt runs here (RunConfig.fallback).
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..config import ClientTimeouts
from ..engine import Engine
from ..memlimit import engine_options
from ..formats import GGUFModel, load_model
from ..generate import GenerationStats, generate
from ..models import resolve_model
from ..prompt import prompt_tokens
from ..reference import ReferenceEngine
from ..sampler import Sampler
from ..session.root import ClusterEngine, ClusterOptions
from ..textsafe import printable
from ..tokenizer import StreamDecoder, Tokenizer
from ..wire.client import NoDaemon, ask_blocking, daemon_request
from .progress import RichEvents


def make_engine(kind: str, model: GGUFModel, ctx: int, threads: int | None = None,
                cluster: ClusterOptions | None = None, err: TextIO = sys.stderr, cache_dir=None,  # noqa: ANN001
                mem_limit: int | None = None) -> Engine:
    extra = engine_options(cache_dir=cache_dir, mem_limit=mem_limit)
    if kind == "reference":
        return ReferenceEngine(model, ctx, keep_weights=True)
    if kind == "jit":
        from ..jit.engine import JITEngine  # llvmlite: loaded when an engine is made here

        return JITEngine(model, ctx, threads, **extra)
    if kind == "cluster":
        with RichEvents(err) as events:
            return ClusterEngine.connect(model, cluster, ctx, threads, events=events)
    raise ValueError(f"unknown engine {kind!r}")


def chosen_threads(err: TextIO = sys.stderr) -> int:
    """The default thread count (jit/cpus.py: affinity, cgroup quota, the load now), said in one line on err."""
    from ..jit.engine import default_thread_choice  # llvmlite: loaded when an engine is made here

    choice = default_thread_choice()
    print(f"dllp2p: compute threads: {choice.reason}", file=err)
    return choice.threads


def run(cfg, out: TextIO = sys.stdout, err: TextIO = sys.stderr,  # noqa: ANN001
        timeouts: ClientTimeouts = ClientTimeouts()) -> int:
    """Through cfg.daemon if it is set (and answers, when cfg.fallback), else in this process."""
    if cfg.daemon is not None:
        try:
            return run_via_daemon(cfg, cfg.daemon, out, err, timeouts)
        except NoDaemon:
            if not cfg.fallback:
                raise
    return run_local(cfg, out, err)


def run_via_daemon(cfg, address: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr,  # noqa: ANN001
                   timeouts: ClientTimeouts = ClientTimeouts()) -> int:
    """Send the prompt to the daemon at address and print what comes back. Raises NoDaemon (nothing
    listens there), NotADaemon, DaemonError."""
    g = daemon_request(cfg.sampler, cfg.steps, cfg.ctx, prompt=cfg.prompt, chat=cfg.chat, system=cfg.system)

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    msg = ask_blocking(address, g, show, getattr(cfg, "key", None), connect_timeout=timeouts.connect, probe_timeout=timeouts.probe,
                       answer_timeout=timeouts.answer)
    out.write("\n")
    out.flush()
    tok_s = f"prefill {msg.prefill_tok_s:.1f} tok/s, decode {msg.decode_tok_s:.1f} tok/s"
    print(f"dllp2p: prompt {msg.prompt_tokens} tokens, generated {msg.generated_tokens} tokens; {tok_s} "
          f"(root {printable(msg.root)}, {msg.nodes} node{'s' if msg.nodes != 1 else ''})", file=err)
    if cfg.stats:  # the root's lines: escaped (textsafe)
        for line in msg.stats:
            print(f"dllp2p: {printable(line)}", file=err)
    return 0


def run_local(cfg, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:  # noqa: ANN001
    model = load_model(resolve_model(cfg.model))
    tokenizer = Tokenizer.from_metadata(model.metadata)
    ids = prompt_tokens(tokenizer, model, cfg.prompt, cfg.chat, cfg.system)
    cluster = None
    if cfg.workers:
        cluster = ClusterOptions(cfg.workers, cfg.plan, exchange=cfg.exchange, cache_dir=cfg.cache_dir,
                                 key=getattr(cfg, "key", None), mem_limit=getattr(cfg, "mem_limit", None))
    threads = cfg.threads
    if threads is None and (cluster or cfg.engine == "jit"):
        threads = chosen_threads(err)
    engine = make_engine("cluster" if cluster else cfg.engine, model, cfg.ctx, threads, cluster, err, cfg.cache_dir,
                         getattr(cfg, "mem_limit", None))
    stats = GenerationStats()
    decoder = StreamDecoder(tokenizer)
    try:
        for token in generate(engine, ids, Sampler(cfg.sampler), cfg.steps, tokenizer.eos_ids, stats):
            out.write(decoder.push(token))
            out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
    finally:
        engine.close()
    print(f"dllp2p: {stats.summary()}", file=err)
    if cfg.stats and hasattr(engine, "stats_summary"):
        for line in engine.stats_summary():
            print(f"dllp2p: {line}", file=err)
    return 0
