"""Where a root's batched decode steps run: on the serving loop itself, or in a worker thread.

A local engine's decode steps (one token per row, at most its `inline_rows` rows: BatchEngine.inline_rows)
are pure compute of a few ms; run on the loop they spare each token two thread hand-offs (~0.5 ms here). The
loop waits for them meanwhile (other clients, Status, the cluster's control links), so an engine whose inline
steps take over INLINE_MAX_S INLINE_STREAK times in a row (a slow device, a big model, a busy machine) steps in
a thread until INLINE_STREAK of its decode steps there take under half of it. One slow step (a page-fault
storm, the VM's hiccup, a burst of other work on a shared device) changes nothing. Prompt chunks, larger
steps, tensor-parallel and streaming engines always step in a thread. session/batching.py asks and reports.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dllp2p.daemon")

INLINE_MAX_S = 0.025  # an engine whose inline steps take longer runs its steps in a thread; SmolLM2's take 2-8 ms here
INLINE_STREAK = 3  # consecutive decode steps against the present choice that turn it over


class InlineChoice:
    """The choice for the engines of one BatchService: `off` is the engine whose steps no longer run inline."""

    def __init__(self) -> None:
        self.off: Any = None
        self.streak = 0  # consecutive decode steps against the present choice (slow inline, fast in the thread)

    def inline(self, rows: Any, engine: Any) -> bool:
        """Run a step of `rows` on the loop: a decode step of an engine whose steps were not sent off it."""
        return self.off is not engine and decode_step(rows, engine)

    def ran_inline(self, engine: Any, seconds: float) -> None:
        """An inline step of `engine` took `seconds`."""
        self._judge(engine, seconds > INLINE_MAX_S)

    def ran_in_thread(self, rows: Any, engine: Any, seconds: float) -> None:
        """A step of `engine` took `seconds` in a thread: a decode step counts once its steps were sent off the loop."""
        if self.off is engine and decode_step(rows, engine):
            self._judge(engine, seconds < INLINE_MAX_S / 2)

    def reset(self) -> None:
        """A new engine: no streak."""
        self.streak = 0

    def _judge(self, engine: Any, against: bool) -> None:
        self.streak = self.streak + 1 if against else 0
        if self.streak < INLINE_STREAK:
            return
        self.streak = 0
        if self.off is engine:
            self.off = None
            log.info("decode steps run on the serving loop again (%d in a row took under %.1f ms)", INLINE_STREAK,
                     INLINE_MAX_S * 500)
        else:
            self.off = engine
            log.info("decode steps run in a thread from now on (%d in a row took over %.0f ms)", INLINE_STREAK,
                     INLINE_MAX_S * 1000)


def decode_step(rows: Any, engine: Any) -> bool:
    """A decode step (one token per row) of at most the engine's inline_rows."""
    return len(rows) <= getattr(engine, "inline_rows", 0) and all(len(r.tokens) == 1 for r in rows)
