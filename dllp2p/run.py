"""`dllp2p run` on this machine: model -> tokens -> engine -> streamed text on stdout, stats on stderr."""

from __future__ import annotations

import sys
from typing import TextIO

from .chat import chat_messages, render_chat, template_from
from .engine import Engine
from .formats import GGUFModel, load_model
from .generate import GenerationStats, generate
from .models import resolve_model
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer


def prompt_tokens(tokenizer: Tokenizer, model: GGUFModel, prompt: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    text = render_chat(
        template_from(model.metadata),
        chat_messages(prompt, system),
        bos_token=tokenizer.token_text(tokenizer.bos_id),
        eos_token=tokenizer.token_text(tokenizer.eos_id),
    )
    # the template writes any BOS itself, as text that parses back into the special token
    return tokenizer.encode(text, add_bos=False, parse_special=True)


def make_engine(kind: str, model: GGUFModel, ctx: int, threads: int | None = None, cluster=None) -> Engine:
    if kind == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model, ctx, keep_weights=True)
    if kind == "jit":
        from .jit.engine import JITEngine

        return JITEngine(model, ctx, threads)
    if kind == "cluster":  # cluster: a cluster.ClusterOptions
        from .cluster import ClusterEngine

        return ClusterEngine.connect(model, cluster, ctx, threads)
    raise ValueError(f"unknown engine {kind!r}")


def run_local(cfg, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    model = load_model(resolve_model(cfg.model))
    tokenizer = Tokenizer.from_metadata(model.metadata)
    ids = prompt_tokens(tokenizer, model, cfg.prompt, cfg.chat, cfg.system)
    cluster = None
    if cfg.workers:
        from .cluster import ClusterOptions

        cluster = ClusterOptions(cfg.workers, cfg.plan)
    engine = make_engine("cluster" if cluster else cfg.engine, model, cfg.ctx, cfg.threads, cluster)
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
