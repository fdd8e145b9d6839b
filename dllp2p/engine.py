"""What every engine (numpy reference, JIT, tensor-parallel root) offers the generation loop."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .error_codes import ErrorCode
from .formats import ModelConfig


MAX_TOP = 64  # forward(..., top=K): the most best logits a step may ask each node for (wire Step.top too)


class ContextFull(Exception):
    """The KV cache has no room for more positions (raise --ctx)."""

    code = ErrorCode.CONTEXT_LENGTH


class Engine(Protocol):
    config: ModelConfig
    ctx: int  # KV cache positions

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """Run `tokens` at positions start_pos.. through the model, writing their K/V into the cache.

        Returns f32[vocab]: the logits of the last token. Positions >= start_pos in the cache are
        overwritten, so rewinding is just calling with a smaller start_pos.
        Raises ContextFull when start_pos + len(tokens) > ctx.
        """
        ...

    def close(self) -> None:
        """Free threads and buffers; the engine is unusable afterwards."""
        ...
