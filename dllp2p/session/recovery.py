"""What a root needs to lose a worker mid-generation without losing the request.

    StepClock   the root's mesh receive timeout per step, from the step times it measured: a worker
                that falls silent fails the step within max(STEP_FACTOR x the recent time per token x
                the step's tokens, STEP_FLOOR_S), not the configured socket timeout (30 s). A closed
                link or a failed send fails it at once anyway (kill -9: the kernel closes its sockets).
    InFlight    one request's state that outlives an engine: the prompt ids, the sampler (its random
                state), the text decoder and stop filter, the tokens generated and streamed so far.
                After a lost worker (service.py re-plans over those still alive) the generation loop
                runs again on the new engine with generate(..., already=tokens): one batched prefill
                of prompt + tokens, the sampler not drawn again, the text going on where it stopped.
                InFlight.resume builds one for a request another root began (a forced prefix).
    Recovery    what happened (the cause, the pause the client saw, the tokens replayed, the nodes
                before and after): logged, counted in Status, a line in `run --stats`.

The generation thread (produce) is the one service.py runs; no I/O but the channel to the connection.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from ..generate import GenerationStats, StopFilter, generate
from ..sampler import Sampler, SamplerConfig
from ..tokenizer import StreamDecoder

STEP_FLOOR_S = 1.0  # the shortest step timeout: scheduling hiccups of a busy device are not deaths
STEP_FACTOR = 10.0  # x the slowest recent time per token
STEP_WINDOW = 8  # steps remembered
MAX_RECOVERIES = 4  # re-plans one request may take (each leaves a node out)


class StepClock:
    """The receive timeout of a root's mesh sockets for a step of n tokens, from recent step times.
    Until a step was measured, `ceiling` (the configured socket timeout: the first step of a new engine
    may include one-time work)."""

    def __init__(self, ceiling: float, floor: float = STEP_FLOOR_S, factor: float = STEP_FACTOR):
        self.ceiling, self.floor, self.factor = ceiling, min(floor, ceiling), factor
        self._per_token: deque[float] = deque(maxlen=STEP_WINDOW)  # seconds per token of recent steps
        self._armed = 0.0  # the timeout the sockets have now

    @property
    def armed(self) -> float:
        """The receive timeout the sockets have now (0: not armed yet)."""
        return self._armed

    def timeout(self, n: int) -> float:
        if not self._per_token:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.factor * max(self._per_token) * max(1, n)))

    def measured(self, n: int, seconds: float) -> None:
        self._per_token.append(seconds / max(1, n))

    def arm(self, socks: Sequence[socket.socket | None], n: int) -> None:
        """Set the sockets' SO_RCVTIMEO for a step of n tokens (a system call only when it changes by
        over a fifth)."""
        t = self.timeout(n)
        if self._armed and abs(t - self._armed) <= 0.2 * self._armed:
            return
        tv = struct.pack("ll", int(t), int((t % 1) * 1e6))
        for sock in socks:
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                except OSError:
                    pass  # closed: the step fails on it anyway
        self._armed = t


@dataclass(frozen=True)
class Recovery:
    """A request that lost a node and went on. pause_s: from the last token streamed before the loss to
    the first after it (what the client saw); at: time.time() of the resumption."""

    cause: str
    pause_s: float
    replayed: int  # tokens prefilled again (prompt + generated so far)
    nodes_before: int
    nodes_after: int
    at: float

    def line(self) -> str:
        return (f"recovered: {self.cause}; re-planned {self.nodes_before} -> {self.nodes_after} nodes, "
                f"replayed {self.replayed} tokens, paused {self.pause_s:.2f} s")


@dataclass
class _Lost:
    """A loss not yet resumed from: the client's pause runs from `since` (time.monotonic())."""

    cause: str
    since: float
    nodes_before: int
    nodes_after: int
    replayed_before: int  # stats.replayed_tokens at the loss


@dataclass
class InFlight:
    """One request's generation state, kept by the root across engines (see the module docstring)."""

    ids: list[int]  # the prompt
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopFilter
    tokens: list[int] = field(default_factory=list)  # generated and streamed (the stop filter may hold text)
    stats: GenerationStats = field(default_factory=GenerationStats)
    last_token_at: float = 0.0  # time.monotonic() of the latest token (or of the start)
    recoveries: list[Recovery] = field(default_factory=list)  # resumed from, in order
    pending: _Lost | None = None  # lost, not resumed yet
    reported: int = 0  # of the recoveries, those the root service has counted and logged
    sent: int = 0  # of the tokens, those whose text has gone out (the rest are held by the decoder or stop filter)

    def lost(self, cause: str, nodes_before: int) -> None:
        """A node was lost; the request will resume on a new plan (a second loss before resuming adds to
        the cause: the client's one pause goes on)."""
        if self.pending is None:
            self.pending = _Lost(cause, self.last_token_at, nodes_before, nodes_before, self.stats.replayed_tokens)
        else:
            self.pending.cause += f"; {cause}"

    def replanned(self, nodes: int) -> None:
        if self.pending is not None:
            self.pending.nodes_after = nodes

    def resumed(self) -> None:
        """The first token after a loss (or the end of the request): the recovery is complete."""
        p, self.pending = self.pending, None
        if p is not None:
            self.recoveries.append(Recovery(p.cause, time.monotonic() - p.since,
                                            self.stats.replayed_tokens - p.replayed_before, p.nodes_before,
                                            p.nodes_after, time.time()))

    @classmethod
    def resume(cls, tokenizer: Any, ids: list[int], sampler: SamplerConfig, stop: Sequence[str],
               already: Sequence[int] = ()) -> InFlight:
        """A request whose first tokens (`already`, shown to the client by another root) are not generated
        again: the sampler is moved past them, the decoder and stop filter have seen their text."""
        s = Sampler(sampler)
        s.advance(len(already))
        decoder, stops = StreamDecoder(tokenizer), StopFilter(stop)
        for t in already:
            stops.push(decoder.push(t))
        return cls(list(ids), s, decoder, stops, list(already), last_token_at=time.monotonic(), sent=len(already))


def produce(engine: Any, request: InFlight, steps: int, stop_ids: Sequence[int], send: trio.MemorySendChannel,
            cached: Sequence[int] = ()) -> None:
    """(thread) The generation loop for request on engine, from where it stands: each text piece and the ids
    it completes through `send` (blocking while the connection lags), every token appended to request.tokens as it is handed
    on. Ends early at a stop string (stats.stop_reason "stop") or when the receiving side is closed; an
    engine's failure (a lost worker: ClusterError) propagates, request keeping what was streamed."""
    decoder, stops, stats = request.decoder, request.stops, request.stats
    if stops.stopped:  # resumed after a stop string another root had reached (only its Done was lost)
        stats.stop_reason = "stop"
        return

    def out(text: str) -> None:
        """A piece of text, with the ids generated since the last piece (TokenChunk.ids)."""
        if text:
            trio.from_thread.run(send.send, (text, tuple(request.tokens[request.sent:])))
            request.sent = len(request.tokens)

    tokens = generate(engine, request.ids, request.sampler, steps, stop_ids, stats, cached=cached,
                      already=tuple(request.tokens))
    try:
        for token in tokens:
            request.tokens.append(token)
            request.last_token_at = time.monotonic()
            if request.pending is not None:
                request.resumed()
            out(stops.push(decoder.push(token)))
            if stops.stopped:
                break
        else:
            out(stops.push(decoder.flush()))
            out(stops.flush())  # nothing once stopped
        if stops.stopped:
            stats.stop_reason = "stop"
        request.resumed()  # ended before a new token (nothing was left to generate)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled, trio.RunFinishedError):
        pass  # nobody listens any more
    finally:
        tokens.close()  # now, so stats.kv_tokens says what the KV cache holds
