"""What every engine (numpy reference, JIT, tensor-parallel root) offers the generation loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

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


# --- many sequences per step (issue 18) -------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRow:
    """One sequence's contribution to a batched step."""

    seq: int                 # sequence slot, 0 <= seq < max_seqs; each slot has its own KV cache
    tokens: tuple[int, ...]  # a decode token (1) or a prompt chunk (several), at positions start_pos..
    start_pos: int


def kv_bytes_per_position(config: ModelConfig, n_kv_heads: int | None = None) -> int:
    """Bytes of KV cache one position of one sequence takes: K and V, f16, every layer."""
    kv = config.n_kv_heads if n_kv_heads is None else n_kv_heads
    return 2 * config.n_layers * kv * config.head_dim * 2


class BatchEngine(Protocol):
    """Several sequences, each in its own slot of KV cache, stepped together (continuous batching)."""

    config: ModelConfig
    ctx: int       # KV cache positions of each slot
    max_seqs: int  # slots
    kv_bytes_per_position: int  # one position of one slot (a KV budget in bytes is the caller's to enforce)
    # (optional, default 0) a step of at most this many one-token rows is short, pure compute: a server may run
    # it on its event loop instead of handing it to a thread (session/batching.py)
    inline_rows: int

    def forward_batch(self, rows: Sequence[BatchRow]) -> np.ndarray:
        """f32[len(rows), vocab]: the logits of each row's last token (rows' seqs distinct).

        Positions >= start_pos of that seq are overwritten (rewind = smaller start_pos).
        Raises ContextFull if a row passes ctx; ValueError for an empty row, a seq out of range, two rows of
        one seq, or a start_pos beyond the positions that seq holds (its length).
        """
        ...

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """dst's KV positions 0..n-1 := src's (prefix sharing); dst then holds n positions."""
        ...

    def close(self) -> None:
        ...


def check_rows(rows: Sequence[BatchRow], lengths: Sequence[int], ctx: int, vocab: int) -> None:
    """The checks every BatchEngine makes before touching a cache (`lengths`: positions each slot holds)."""
    if not rows:
        raise ValueError("forward_batch needs at least one row")
    seen: set[int] = set()
    for r in rows:
        if not 0 <= r.seq < len(lengths):
            raise ValueError(f"sequence slot {r.seq} outside 0..{len(lengths) - 1}")
        if r.seq in seen:
            raise ValueError(f"two rows of sequence slot {r.seq} in one step")
        seen.add(r.seq)
        if not r.tokens:
            raise ValueError(f"row of sequence slot {r.seq} has no tokens")
        if not 0 <= r.start_pos <= lengths[r.seq]:
            raise ValueError(f"start_pos {r.start_pos} of slot {r.seq} beyond its {lengths[r.seq]} positions")
        if r.start_pos + len(r.tokens) > ctx:
            raise ContextFull(f"positions {r.start_pos}..{r.start_pos + len(r.tokens) - 1} of slot {r.seq} "
                              f"do not fit a context of {ctx}")
        if min(r.tokens) < 0 or max(r.tokens) >= vocab:
            raise ValueError(f"token id outside the vocabulary of {vocab}")


class SoloBatch:
    """The slow, obvious BatchEngine (the fast ones' test oracle): one ordinary Engine per slot, made on
    first use by `make_engine()`, rows run one after another. copy_prefix replays src's first n tokens into
    dst (engines are bit-identical across chunkings, so a replayed prefix is the prefix computed anew)."""

    def __init__(self, make_engine: Callable[[], Engine], max_seqs: int):
        if max_seqs < 1:
            raise ValueError("max_seqs must be at least 1")
        self._make = make_engine
        self._engines: list[Engine | None] = [None] * max_seqs
        self._tokens: list[list[int]] = [[] for _ in range(max_seqs)]  # what each slot's cache holds
        first = self._engine(0)
        self.config, self.ctx, self.max_seqs = first.config, first.ctx, max_seqs
        self.kv_bytes_per_position = kv_bytes_per_position(first.config)

    def _engine(self, seq: int) -> Engine:
        engine = self._engines[seq]
        if engine is None:
            engine = self._engines[seq] = self._make()
        return engine

    def forward_batch(self, rows: Sequence[BatchRow]) -> np.ndarray:
        check_rows(rows, [len(t) for t in self._tokens], self.ctx, self.config.vocab_size)
        out = np.empty((len(rows), self.config.vocab_size), np.float32)
        for i, r in enumerate(rows):
            out[i] = self._engine(r.seq).forward(list(r.tokens), r.start_pos)
            del self._tokens[r.seq][r.start_pos:]
            self._tokens[r.seq].extend(r.tokens)
        return out

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for s in (src, dst):
            if not 0 <= s < self.max_seqs:
                raise ValueError(f"sequence slot {s} outside 0..{self.max_seqs - 1}")
        if not 0 <= n <= len(self._tokens[src]):
            raise ValueError(f"slot {src} holds {len(self._tokens[src])} positions, not {n}")
        prefix = self._tokens[src][:n]
        if src != dst and n:
            self._engine(dst).forward(prefix, 0)
        self._tokens[dst] = prefix

    def close(self) -> None:
        for e in self._engines:
            if e is not None:
                e.close()
        self._engines = [None] * self.max_seqs
