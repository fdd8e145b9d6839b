"""Continuous batching's scheduler core: which requests run, which wait, which are refused, and what the
next step computes. Pure (no I/O, no trio, no engine): session/batching.py drives it and an engine.

    submit(seq)  admitted now (a free slot, room in the KV budget, nobody queued ahead), else queued FIFO
                 up to BatchConfig.queue, else refused (QueueFull: HTTP 429 with Retry-After)
    plan()       frees the slots of finished and cancelled sequences, admits from the queue's head, and
                 returns the next Step: the prefix copies to make first, then one BatchRow per running
                 sequence (a decode token, or its next prompt chunk), or None when nothing runs
    advance()    after the engine ran the step: what each slot's KV cache now holds
    rewind()     the engine was lost (a worker died): every running sequence's KV is computed again
    push()       a sampled token for a sequence (finished at its step limit or its context)
    finish()     a sequence ended by its sampler's caller (end of turn, a stop string)
    cancel()     its client went away: its slot is free at the next plan()
    plan_groups(stages, in_flight)
                 (a pipeline plan) the next steps of the sequences not in flight, as groups (groups()),
                 each marked in flight until advance(): the driver keeps up to `stages` steps in flight

Slots: the engine's `max_batch` sequence slots (BatchEngine.max_seqs). A running sequence holds one. A
finished sequence's slot stays filled as a cache entry (its tokens at the positions its KV holds) while no
new sequence needs it: a new request whose first tokens equal an entry's takes that slot over as it is
(the shared positions are not computed again), or, when they equal a running sequence's, gets them by
copy_prefix into a free slot. Either way at least the prompt's last token is computed (its logits).

KV budget: every running sequence reserves, when admitted, the positions it can ever fill
(min(prompt + max tokens, its context)); a cache entry the positions it holds. Their sum never exceeds
the budget (checked by plan(); entries are evicted, least recently used first, to admit a request).
With no kv_budget set, the budget is max_batch full contexts, or what the node's memory holds when its
driver says (set_memory: measured as the root's engine is made), whichever is less.
A slot no sequence or entry counts any more (an entry evicted, a sequence cancelled) gets a copy of
nothing into itself (Copy(slot, slot, 0)) before the next step's rows, and an engine whose memory follows
what its slots hold (JITEngine: the pages past them go back to the OS, as after a rewind) then takes the
memory of the budget, not of the most its slots ever held.

Fairness: every running sequence's decode token is in every step; new sequences' prompt tokens share
BatchConfig.chunk per step, oldest first, so a long prompt cannot hold back the running decodes and
queued requests are admitted in arrival order (no starvation).

Groups (a pipeline of s stages): the running sequences are stepped in up to s groups, each step submitted
before the previous ones complete, so each stage works on another group. A sequence is in at most one
step in flight (its next token is sampled when its step completes); between steps it may change groups
(its KV slot is its own whatever group it is in). A cancelled sequence whose step is in flight keeps its
slot until that step lands (advance()), so no new sequence is copied into a slot still being written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..engine import BatchRow
from ..error_codes import CodedError, ErrorCode


@dataclass(frozen=True)
class BatchConfig:
    """How a root serves many requests at once (daemon config max_batch, queue, kv_budget_mb)."""

    max_batch: int = 8  # sequences stepped together (the engine's slots)
    queue: int = 16  # requests waiting beyond them, FIFO; one more is refused (HTTP 429)
    kv_budget: int = 0  # bytes of KV cache for every sequence and cached prefix together; 0: max_batch contexts
    chunk: int = 64  # prompt tokens per step, all new sequences together
    cluster: bool = False  # a root with workers batches too (over a ClusterEngine); else one at a time in the slot
    groups: int = 0  # steps kept in flight over a pipeline plan: 0 its stages, 1 one batch (pipeline_groups)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue < 0 or self.kv_budget < 0 or self.chunk < 1 or self.groups < 0:
            raise ValueError(f"bad batch config {self}")


class QueueFull(CodedError):
    """Every slot runs and the queue is full: try again later (HTTP 429, Retry-After RETRY_AFTER_S)."""

    code = ErrorCode.RATE_LIMITED


@dataclass(eq=False)
class Seq:
    """One request's sequence. tokens: the prompt, then what was generated; `held` of them are in its slot's KV."""

    rid: int
    prompt: tuple[int, ...]
    steps: int  # most tokens to generate
    ctx: int  # its context: it ends when prompt + generated reaches it
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    held: int = 0  # positions of `tokens` whose K/V its slot holds
    cached: int = 0  # prompt tokens it did not compute (a shared prefix)
    generated: int = 0
    state: str = "new"  # new, queued, running, done, gone
    stop_reason: str = ""  # once done: steps, context, or what finish() was told (eos, stop)
    flying: bool = False  # in a step submitted and not yet advanced (plan_groups)
    planned: int = 0  # plan count when last given a row (plan_groups: the longest waiting go first)

    def __post_init__(self) -> None:
        if not self.prompt or len(self.prompt) >= self.ctx or self.steps < 1:
            raise ValueError(f"a sequence of {len(self.prompt)} prompt tokens, {self.steps} steps, ctx {self.ctx}")
        self.tokens = list(self.prompt)

    @property
    def reserve(self) -> int:
        """KV positions it may ever fill."""
        return min(len(self.prompt) + self.steps, self.ctx)

    @property
    def prefilled(self) -> bool:
        """Its slot holds every token but the last sampled one (its decode row computes that): the prompt, once
        prefilled, and what was generated; after rewind() it computes them all again as prompt chunks."""
        return self.held >= len(self.tokens) - (1 if self.generated else 0)


@dataclass
class _Entry:
    """A finished sequence's slot kept for its prefix: its KV holds `tokens`."""

    slot: int
    tokens: tuple[int, ...]
    used: int  # plan() count when last written or shared (least recently used goes first)


@dataclass(frozen=True)
class Copy:
    """Before the step's rows: copy_prefix(src, dst, n)."""

    src: int
    dst: int
    n: int


@dataclass(frozen=True)
class Step:
    copies: tuple[Copy, ...]
    rows: tuple[BatchRow, ...]
    seqs: tuple[Seq, ...]  # each row's sequence
    sample: tuple[bool, ...]  # each row's last token is its sequence's last: its logits give the next token


class BatchCore:
    """The scheduling state of one BatchEngine: `ctx` its positions per slot, `kv_position` the bytes one
    position of one sequence takes (the budget is in bytes, the bookkeeping in positions)."""

    def __init__(self, cfg: BatchConfig, ctx: int, kv_position: int):
        self.cfg, self.ctx, self.kv_position = cfg, ctx, kv_position
        self.memory = 0  # KV positions this node's memory holds (0: unknown): a default budget takes no more
        self._set_budget()
        self.running: list[Seq] = []  # admission order
        self.queue: deque[Seq] = deque()
        self.entries: dict[int, _Entry] = {}  # slot -> cache entry
        self.rebuilt = False  # plan() raised ctx for the queue's head: the engine must be made anew (empty)
        self.last_batch = 0  # rows of the latest step
        self._copies: list[Copy] = []
        self._plans = 0

    # --- what Status shows ---

    def reserved(self) -> int:
        """KV positions spoken for: running sequences' reservations and cache entries' contents."""
        return sum(s.reserve for s in self.running) + sum(len(e.tokens) for e in self.entries.values())

    def busy(self) -> bool:
        """Any request queued or running (a cancelled one only while a step in flight still writes its slot)."""
        return bool(self.queue) or any(s.state == "running" or s.flying for s in self.running)

    # --- requests ---

    def submit(self, seq: Seq) -> None:
        """Admit seq now, or queue it; raises QueueFull (queue at its bound) or CodedError (it can never fit)."""
        self._drop_gone()
        self._set_budget()
        if not self.queue and not self.running and seq.ctx > self.ctx:
            self._grow(seq.ctx)
        if self.cfg.kv_budget and seq.reserve > self.budget:
            raise CodedError(f"the request needs {seq.reserve} KV positions (prompt + max tokens); this root's KV "
                             f"budget holds {self.budget}", ErrorCode.CONTEXT_LENGTH)
        if not self.queue and self._admit(seq):
            return
        if len(self.queue) >= self.cfg.queue:
            raise QueueFull(f"{len(self.running)} requests are running and {len(self.queue)} are queued (the "
                            f"most: {self.cfg.max_batch} and {self.cfg.queue}); try again in a few seconds")
        seq.state = "queued"
        self.queue.append(seq)

    def cancel(self, seq: Seq) -> None:
        """Its client is gone: it leaves the queue now, its slot at the next plan()."""
        if seq.state == "queued":
            self.queue.remove(seq)
        if seq.state in ("new", "queued", "running"):
            seq.state = "gone"

    def push(self, seq: Seq, token: int) -> None:
        """Its next token (sampled from the step's logits); it finishes at its step limit or context."""
        seq.tokens.append(token)
        seq.generated += 1
        if seq.generated >= seq.steps:
            self.finish(seq, "steps")
        elif len(seq.tokens) >= seq.ctx:
            self.finish(seq, "context")

    def finish(self, seq: Seq, reason: str) -> None:
        """It ended (between steps): its slot becomes a cache entry of what its KV holds."""
        if seq.state == "running":
            seq.state, seq.stop_reason = "done", reason
            self.running.remove(seq)
            if seq.held:
                self.entries[seq.slot] = _Entry(seq.slot, tuple(seq.tokens[: seq.held]), self._plans)

    # --- steps ---

    def plan(self) -> Step | None:
        """The next step, or None when no sequence runs."""
        self._admit_queued()
        step = self._step([s for s in self.running if s.state == "running" and not s.flying])
        self.last_batch = len(step.rows) if step else 0
        return step

    def plan_groups(self, stages: int, in_flight: int) -> list[Step]:
        """(pipelined) The steps to submit now, `in_flight` steps being submitted and not yet advanced: the
        ready sequences (running, not in flight; the longest waiting first) in groups (groups()), each one
        step whose sequences are in flight until advance(). The prefix copies go with the first."""
        self._admit_queued()
        ready = sorted((s for s in self.running if s.state == "running" and not s.flying), key=lambda s: s.planned)
        steps = []
        for group in groups(ready, len(self.running), in_flight, stages):
            step = self._step(group)
            if step is not None:
                steps.append(step)
                for seq in step.seqs:
                    seq.flying, seq.planned = True, self._plans
        if steps:
            self.last_batch = max(len(s.rows) for s in steps)
        return steps

    def _drop_gone(self) -> None:
        """The cancelled sequences' slots are free, once no step in flight writes them, and their KV dropped."""
        keep = [s for s in self.running if s.state == "running" or s.flying]
        self._drop([s.slot for s in self.running if s not in keep and s.held])
        self.running = keep

    def _drop(self, slots: list[int]) -> None:
        """Slots whose KV no sequence or entry counts any more: a copy of nothing into each before the next
        step's rows, so the engine holds nothing there (JITEngine gives the pages back to the OS, and the KV
        budget bounds the memory the caches take, not just what they are said to hold)."""
        self._copies.extend(Copy(slot, slot, 0) for slot in slots)

    def _admit_queued(self) -> None:
        self._plans += 1
        self._drop_gone()
        self._set_budget()
        while self.queue and self._admit(self.queue[0]):
            self.queue.popleft()
        if self.queue and not self.running and self.queue[0].ctx > self.ctx:
            self._grow(self.queue[0].ctx)
            while self.queue and self._admit(self.queue[0]):
                self.queue.popleft()
        assert self.reserved() <= self.budget, (self.reserved(), self.budget)

    def _step(self, group: list[Seq]) -> Step | None:
        """A step of `group`'s rows (running sequences, none in flight), the pending copies first."""
        rows, seqs, sample = [], [], []
        budget = self.cfg.chunk
        for seq in group:  # decodes first: each running sequence's next token
            if seq.prefilled:
                rows.append(BatchRow(seq.slot, (seq.tokens[-1],), seq.held))
                seqs.append(seq)
                sample.append(True)
        for seq in group:  # then prompt chunks, oldest first, within the chunk budget
            if not seq.prefilled and budget > 0:
                n = min(budget, len(seq.tokens) - seq.held)
                budget -= n
                rows.append(BatchRow(seq.slot, tuple(seq.tokens[seq.held: seq.held + n]), seq.held))
                seqs.append(seq)
                sample.append(seq.held + n == len(seq.tokens))
        if not rows:
            return None
        copies, self._copies = tuple(self._copies), []
        return Step(copies, tuple(rows), tuple(seqs), tuple(sample))

    def advance(self, step: Step) -> None:
        """The engine ran `step`: each row's positions are in its slot (its sequences are no longer in flight)."""
        for row, seq in zip(step.rows, step.seqs):
            seq.held = row.start_pos + len(row.tokens)
            seq.flying = False

    def land(self, step: Step) -> None:
        """`step` will never run (its engine failed): its sequences are no longer in flight."""
        for seq in step.seqs:
            seq.flying = False

    def rewind(self) -> None:
        """The engine is gone with every slot's KV (a worker was lost): the next engine is made anew, and each
        running sequence computes again, as prompt chunks, all it had (prompt and tokens generated) before its
        next token. Cache entries and pending copies go; reservations stay as they were."""
        for seq in self.running:
            seq.held, seq.flying = 0, False
        self.entries.clear()
        self._copies.clear()
        self.rebuilt = True

    # --- admission ---

    def _grow(self, ctx: int) -> None:
        """Nothing runs and the next request needs a larger context: the engine is made anew (empty)."""
        self.ctx, self.rebuilt = ctx, True
        self._set_budget()
        self.entries.clear()
        self._copies.clear()

    def set_memory(self, positions: int) -> None:
        """The KV positions this node's memory holds now (0: unknown): a default budget takes no more."""
        self.memory = positions
        self._set_budget()

    def _set_budget(self) -> None:
        """The budget in positions: kv_budget's, else max_batch contexts, or fewer where `memory` holds fewer
        (but one context, and what is reserved already: a request admitted is never over budget)."""
        cfg, full = self.cfg, self.cfg.max_batch * self.ctx
        if cfg.kv_budget:
            self.budget = cfg.kv_budget // self.kv_position
        else:
            self.budget = max(self.ctx, min(full, self.memory), self.reserved()) if self.memory else full

    def _admit(self, seq: Seq) -> bool:
        """Give seq a slot (and a shared prefix) if one is free and the budget allows; False if not now."""
        if len(self.running) >= self.cfg.max_batch or seq.ctx > self.ctx:
            return False
        src, n = self._best_prefix(seq)
        take_over = n > 0 and src in self.entries  # an entry's slot, as it is; else a copy from a running one
        room = self.budget - self.reserved() + (len(self.entries[src].tokens) if take_over else 0)
        used = {s.slot for s in self.running}
        free = [i for i in range(self.cfg.max_batch) if i not in used and i not in self.entries]
        evict: list[_Entry] = []
        for e in sorted((e for e in self.entries.values() if not (take_over and e.slot == src)), key=lambda e: e.used):
            if room >= seq.reserve and (take_over or free or evict):
                break
            evict.append(e)  # least recently used first, until the reservation fits and a slot is free
            room += len(e.tokens)
        if room < seq.reserve or not (take_over or free or evict):
            return False
        for e in evict:
            del self.entries[e.slot]
            free.append(e.slot)
        self._drop([e.slot for e in evict])
        if take_over:
            del self.entries[src]
            seq.slot = src
        else:
            seq.slot = free[0]
            if n:
                self._copies.append(Copy(src, seq.slot, n))
        seq.held = seq.cached = n
        seq.state = "running"
        self.running.append(seq)
        return True

    def _best_prefix(self, seq: Seq) -> tuple[int | None, int]:
        """(slot, n): the slot whose KV holds the longest prefix of seq's prompt (at most all but its last
        token), an entry preferred on a tie (no copy); (None, 0) if none shares a token."""
        best: tuple[int | None, int] = (None, 0)
        most = len(seq.prompt) - 1
        candidates = [(e.slot, e.tokens) for e in self.entries.values()]
        candidates += [(s.slot, s.tokens[: s.held]) for s in self.running if s.state == "running"]
        for slot, tokens in candidates:
            n = _common(seq.prompt, tokens, most)
            if n > best[1]:
                best = (slot, n)
        return best


def groups(ready: list[Seq], running: int, in_flight: int, stages: int) -> list[list[Seq]]:
    """The groups to submit now: `ready` (the sequences not in flight, in the order they should go) split
    as evenly as possible into k = min(stages - in_flight, len(ready)) groups of at most
    ceil(running / stages) each; the rest wait for the next completion. So the pipeline keeps up to
    `stages` groups of about equal size in flight, and one that came back too large is evened out.
    Pure (works on any list)."""
    k = min(stages - in_flight, len(ready))
    if k <= 0:
        return []
    take = min(len(ready), k * -(-running // stages))
    base, extra = divmod(take, k)
    out, i = [], 0
    for g in range(k):
        n = base + (g < extra)
        out.append(ready[i: i + n])
        i += n
    return out


def _common(a, b, most: int) -> int:  # noqa: ANN001
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= most:
            break
        n += 1
    return n
