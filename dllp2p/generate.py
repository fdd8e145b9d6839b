"""The generation loop: prefill the prompt, then decode one token at a time, timing both."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Collection, Iterator, Sequence

from .engine import Engine
from .sampler import Sampler


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time of the forward passes after the prefill, and of sampling each token
    stop_reason: str = ""  # "eos", "steps", "context", or "stop" (a stop string; set by the caller)
    reused_tokens: int = 0  # prompt tokens whose KV entries the engine already held (not computed again)
    kv_tokens: tuple[int, ...] = ()  # after the run: the ids at the positions the engine's KV cache holds
    replayed_tokens: int = 0  # prompt + already-generated tokens prefilled again to resume (a recovery)
    replay_s: float = 0.0  # the time of those prefills (not in prefill_s)

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from the prefill's logits; every later one costs a forward
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens, generated {self.generated_tokens} tokens; "
            f"prefill {self.prefill_tok_s:.1f} tok/s, decode {self.decode_tok_s:.1f} tok/s"
        )


def generate(
    engine: Engine,
    prompt: Sequence[int],
    sampler: Sampler,
    max_tokens: int,
    stop_ids: Collection[int] = (),
    stats: GenerationStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cached: Sequence[int] = (),
    already: Sequence[int] = (),
) -> Iterator[int]:
    """Yield up to max_tokens generated ids; stop tokens end generation and are not yielded.

    already: ids generated (and shown) already, by an earlier run of this request that was cut short
    (a lost worker) or by another root: they are prefilled with the prompt in one batch, counted in
    max_tokens and stats.generated_tokens, and never yielded. The sampler must be where that run left
    it (the same Sampler object; or a fresh one moved past them: Sampler.advance), so a seeded run
    continues with the very tokens it would have drawn.

    cached: the ids at the positions the engine's KV cache already holds (an earlier run's
    stats.kv_tokens, on the same engine): the prompt's common prefix with them is not computed again
    (the last prompt token always is, for its logits). The JIT engine's results do not depend on how
    a prompt is chunked, so the tokens are those of a fresh run."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if len(prompt) >= engine.ctx:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {engine.ctx} (raise --ctx)")
    history = [*prompt, *already]
    stats.generated_tokens = len(already)
    stats.stop_reason = "steps"
    if already and (len(already) >= max_tokens or len(history) >= engine.ctx):
        stats.stop_reason = "steps" if len(already) >= max_tokens else "context"
        stats.kv_tokens = ()
        return
    forward = engine.forward
    top = sampler.cfg.best_logits()
    if 0 < top <= getattr(engine, "max_top", 0):  # a cluster: workers send their best `top` logits only
        forward = partial(engine.forward, top=top)
    reuse = 0
    while reuse < min(len(cached), len(history) - 1) and cached[reuse] == history[reuse]:
        reuse += 1
    stats.reused_tokens, stats.kv_tokens = min(reuse, len(prompt)), ()
    t0 = clock()
    logits = forward(history[reuse:], reuse)
    if already:
        stats.replay_s += clock() - t0
        stats.replayed_tokens += len(history) - reuse
    else:
        stats.prefill_s = clock() - t0
    held = len(history)  # the KV cache holds the ids history[:held]
    try:
        for i in range(len(already), max_tokens):
            t0 = clock()
            token = sampler(logits, history)
            stats.decode_s += clock() - t0  # what a token costs is its forward and its draw
            if token in stop_ids:
                stats.stop_reason = "eos"
                return
            history.append(token)
            stats.generated_tokens += 1
            yield token
            if i + 1 == max_tokens:
                return
            if len(history) >= engine.ctx:
                stats.stop_reason = "context"
                return
            t0 = clock()
            logits = forward([token], len(history) - 1)
            held = len(history)
            stats.decode_s += clock() - t0
    finally:  # also when the caller stops early (a stop string, a client gone)
        stats.kv_tokens = tuple(history[:held])


class StopFilter:
    """Streamed text up to the first of some stop strings (which is not part of it).

    push(piece) returns what can be shown now: text that might be the start of a stop string is held
    back until the next piece tells; `stopped` turns True when one is complete (generation should
    end), the text cut where it starts. Of several, the one completed first (ending earliest) wins,
    and of those the longest, so the result does not depend on how the text came in pieces.
    flush() returns what was held back once the text ends without one."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)[1]]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
