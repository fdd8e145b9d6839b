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
    decode_s: float = 0.0  # time of the forward passes after the prefill
    stop_reason: str = ""  # "eos", "steps" or "context"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

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
) -> Iterator[int]:
    """Yield up to max_tokens generated ids; stop tokens end generation and are not yielded."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if len(prompt) >= engine.ctx:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {engine.ctx} (raise --ctx)")
    history = list(prompt)
    forward = engine.forward
    top = sampler.cfg.best_logits()
    if 0 < top <= getattr(engine, "max_top", 0):  # a cluster: workers send their best `top` logits only
        forward = partial(engine.forward, top=top)
    t0 = clock()
    logits = forward(prompt, 0)
    stats.prefill_s = clock() - t0
    stats.stop_reason = "steps"
    for i in range(max_tokens):
        token = sampler(logits, history)
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
        stats.decode_s += clock() - t0
