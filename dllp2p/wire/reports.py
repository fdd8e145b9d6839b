"""The wire's status messages: what a daemon knows, asked for with Status and answered with StatusReply
(its membership with roles, the plan it serves, its last step, its machine's resources, its polls'
round-trips, its weight push and its set-up's progress). Frozen dataclasses, valid by construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..election import Member
from ..pipeline import AnyPlan
from .messages import ROLES, WIRE_OPTIONAL, _need


@dataclass(frozen=True)
class Status:
    """Anyone -> a daemon: what do you know? The first frame of a status connection, or any frame after a
    StatusReply on it (`dllp2p status` asks once a second on one connection)."""

    seq: int

    def __post_init__(self) -> None:
        _need(self.seq >= 0, f"seq {self.seq} < 0")


@dataclass(frozen=True)
class NodeStatus:
    """One member of the answering daemon's membership, as it sees it."""

    member: Member
    role: str  # "root" | "worker", by the answering daemon's election
    sources: tuple[str, ...]  # how it knows the member: "self", "mdns", "static"
    last_seen: float  # unix seconds of the latest news of it

    def __post_init__(self) -> None:
        _need(self.role in ROLES, f"role {self.role!r} is not one of {ROLES}")
        _need(len(self.sources) >= 1, "a member known from nowhere")


@dataclass(frozen=True)
class StepStatus:
    """The last Step the answering daemon computed."""

    tokens: int
    step_ms: float  # wall time of the node's forward
    sync_ms: float  # of which waiting for and moving activations
    at: float  # unix seconds when it ended

    def __post_init__(self) -> None:
        _need(self.tokens >= 1, f"tokens {self.tokens} < 1")
        _need(all(math.isfinite(x) and x >= 0 for x in (self.step_ms, self.sync_ms, self.at)),
              "step times must be finite and >= 0")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_ms * 1e3 if self.step_ms > 0 else 0.0


@dataclass(frozen=True)
class Resources:
    """The answering daemon's machine and process, measured when it answers."""

    rss: int  # bytes resident of the daemon process
    ram: int  # bytes of RAM of the machine (0: unknown)
    ram_available: int  # bytes the machine can still give (MemAvailable; 0: unknown)
    load1: float  # 1-minute load average (runnable tasks, all cores together)
    cores: int  # cores the daemon may run on
    # its measured figures for the cost model (daemon/figures.py; 0: not measured)
    gbps: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # GB/s of weights per token, its kernels
    disk_gbps: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)

    def __post_init__(self) -> None:
        _need(min(self.rss, self.ram, self.ram_available) >= 0, "negative memory size")
        _need(math.isfinite(self.load1) and self.load1 >= 0, "load must be finite and >= 0")
        _need(self.cores >= 1, f"cores {self.cores} < 1")
        _need(all(math.isfinite(x) and x >= 0 for x in (self.gbps, self.disk_gbps)), "figures must be finite and >= 0")


@dataclass(frozen=True)
class LinkRtt:
    """The answering daemon's latest Status round-trip to a member it polls (static --peer, mDNS probe)."""

    node_id: str
    rtt_ms: float  # Status sent -> StatusReply received, on an open connection
    at: float  # unix seconds of that poll

    def __post_init__(self) -> None:
        _need(bool(self.node_id), "node_id is empty")
        _need(math.isfinite(self.rtt_ms) and self.rtt_ms >= 0 and math.isfinite(self.at) and self.at >= 0,
              "link round-trip and time must be finite and >= 0")


@dataclass(frozen=True)
class PushStatus:
    """The weight push of the answering worker's latest session: bytes of the slices it needed (its cache
    lacked) received and verified so far, of their total."""

    epoch: int
    done: int
    total: int
    started_at: float  # unix seconds of the Need
    finished: bool  # every needed slice arrived (WeightsReady sent)

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")
        _need(0 <= self.done <= self.total, f"push progress {self.done} of {self.total} bytes")
        _need(not self.finished or self.done == self.total, "a finished push with bytes missing")
        _need(math.isfinite(self.started_at) and self.started_at >= 0, "start time must be finite and >= 0")

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class LeftOut:
    """A worker the answering root plans without until `until` (unix seconds), and why (its disk is full)."""

    node_id: str
    address: str
    code: str  # an ErrorCode's value: "disk_full"
    reason: str  # the worker's own message
    until: float

    def __post_init__(self) -> None:
        _need(bool(self.node_id) and bool(self.code), "a left-out node without id or code")
        _need(math.isfinite(self.until) and self.until >= 0, "until must be finite and >= 0")


@dataclass(frozen=True)
class RecoveryStatus:
    """The answering root's latest recovery (session.recovery.Recovery): a request lost a node (`cause`),
    was re-planned over the nodes still alive and resumed; the client saw a pause of pause_s seconds."""

    cause: str
    pause_s: float  # from the last token before the loss to the first after it
    replayed: int  # tokens prefilled again on the new plan
    nodes_before: int
    nodes_after: int
    at: float  # unix seconds of the resumption

    def __post_init__(self) -> None:
        _need(min(self.replayed, self.nodes_before, self.nodes_after) >= 0, "negative recovery counts")
        _need(all(math.isfinite(x) and x >= 0 for x in (self.pause_s, self.at)), "pause and time must be finite and >= 0")


@dataclass(frozen=True)
class ServingStatus:
    """The answering root's requests served together (session/batching.py), now."""

    running: int  # sequences being generated
    queued: int  # requests waiting for a slot
    batch: int  # rows of its latest step
    max_batch: int
    queue: int  # the queue's bound (one more request is refused: 429)
    kv_reserved: int  # KV positions spoken for (running reservations, cached prefixes)
    kv_budget: int  # KV positions in all
    tok_s: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # tokens generated a second, all requests
    # together, over its latest steps (0: none in the last STEPS_WINDOW_S seconds)
    served: int = dataclasses.field(default=0, metadata=WIRE_OPTIONAL)  # requests answered since it started

    def __post_init__(self) -> None:
        _need(min(self.running, self.queued, self.batch, self.queue, self.kv_reserved, self.kv_budget, self.served) >= 0
              and self.max_batch >= 1, "negative serving counts")
        _need(math.isfinite(self.tok_s) and self.tok_s >= 0, "tok_s must be finite and >= 0")


@dataclass(frozen=True)
class ProgressStatus:
    """One step of the answering root's latest set-up (session.progress.Progress): `done` of `total`
    bytes pushed to a worker ("push"), or 0 / 1 engine built ("build")."""

    task: str  # "push" | "build"
    subject: str  # "worker HOST:PORT (node ID)" or "root"
    done: int
    total: int

    def __post_init__(self) -> None:
        _need(self.task in ("push", "build"), f"progress task {self.task!r}")
        _need(0 <= self.done <= self.total, f"progress {self.done} of {self.total}")


@dataclass(frozen=True)
class PlanEstimate:
    """One candidate plan the answering root priced for its latest prompt (planner.py), in ms per token:
    predicted (and its parts), and measured when it is the plan that ran (0: not run)."""

    label: str  # e.g. "tp 2 exact", "pipeline 1+1"
    nodes: int
    predicted_ms: float
    compute_ms: float
    latency_ms: float  # exchanges x one-way latency
    transfer_ms: float  # bytes / bandwidth
    stream_ms: float  # disk reads not hidden
    measured_ms: float  # of the plan that ran, per decoded token (0: not run or not yet)
    chosen: bool
    runnable: bool  # a kind this version runs (planner.RUNNABLE); the others are priced only
    kind: str = dataclasses.field(default="tp", metadata=WIRE_OPTIONAL)  # costmodel.KINDS: tp, pipeline, hybrid

    def __post_init__(self) -> None:
        _need(bool(self.label) and self.nodes >= 1, "a plan estimate without label or nodes")
        parts = (self.compute_ms, self.latency_ms, self.transfer_ms, self.stream_ms, self.measured_ms)
        _need(all(math.isfinite(x) and x >= 0 for x in parts) and self.predicted_ms >= 0,
              "plan estimates must be finite and >= 0 (predicted may be inf: does not fit)")


@dataclass(frozen=True)
class StatusReply:
    """Daemon -> asker: its membership with roles (root first, then the succession), the plan of its
    session if one runs, else (on the root) of the latest prompt it served (every node's slice), its
    last step."""

    seq: int
    node_id: str  # the answering daemon
    nodes: tuple[NodeStatus, ...]
    plan: AnyPlan | None  # a scheduler.Plan or a pipeline.PipelinePlan
    last_step: StepStatus | None
    sessions: int  # sessions ended since it started
    resources: Resources | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)
    links: tuple[LinkRtt, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # by node id
    push: PushStatus | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)  # of its latest session
    progress: tuple[ProgressStatus, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # its latest set-up, as root
    left_out: tuple[LeftOut, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # workers it plans without, as root
    plans: tuple[PlanEstimate, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # priced for its latest prompt, as root
    recoveries: int = dataclasses.field(default=0, metadata=WIRE_OPTIONAL)  # requests that lost a node and went on, as root
    last_recovery: RecoveryStatus | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)  # the latest of them
    rate: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # its measured compute rate (Hello.rate)
    serving: ServingStatus | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)  # its batched requests, as root
    wait_ms: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # its CPU wait per exchange (Hello.wait_ms)

    def __post_init__(self) -> None:
        _need(self.seq >= 0 and self.sessions >= 0, "negative seq or session count")
        ids = [n.member.node_id for n in self.nodes]
        _need(len(set(ids)) == len(ids), "a node is listed twice")
        linked = [link.node_id for link in self.links]
        _need(len(set(linked)) == len(linked), "a link is listed twice")
        _need(sum(n.role == "root" for n in self.nodes) <= 1, "more than one root")
        _need(math.isfinite(self.rate) and self.rate >= 0, f"rate {self.rate} is not finite and >= 0")
        _need(math.isfinite(self.wait_ms) and self.wait_ms >= 0, f"wait_ms {self.wait_ms} is not finite and >= 0")
