"""The wire protocol, sans I/O: typed messages <-> length-prefixed msgpack frames. No sockets here.

A frame is a fixed 10-byte header then a msgpack body (big-endian header; these offsets never change,
so any version can tell another version apart):

    magic    4 bytes  b"DLP2"
    version  u8       PROTOCOL_VERSION
    type     u8       MsgType
    length   u32      body bytes, at most MAX_FRAME
    body     msgpack map {field name: value}: exactly the message dataclass's fields, each of its type

Messages are frozen dataclasses; each checks its own invariants when built, so a decoded message is
as trustworthy as a local one. Field types on the wire: int, float, str, bytes (msgpack bin), bool,
tuples (msgpack arrays) and nested dataclasses (maps), e.g. the scheduler's Plan and its NodeSlices.

A session between a root and a worker (daemon.py and cluster.py run it): Hello both ways; Session
(plan, model config, ctx, the worker's slice list) -> Need (the sha256s its cache lacks) -> exactly those
as WeightChunks -> WeightsReady; Mesh -> node-to-node connections, each opened by a MeshHello both
ways -> Ready; then Step after Step; Stop. A wrong message at a given point is an UnexpectedMessage;
Error.code names the problem (an error_codes.ErrorCode; error_code maps each ProtocolError to one).

Anyone may ask a daemon what it knows: Status -> StatusReply (its membership, roles, session plan, last
step; since added: its memory and load, its measured round-trips to the members it polls, its weight-push
progress), as often as it likes on one connection (`dllp2p status`, and daemons polling their --peer list).
Fields added to a message later are `wire_optional` (WIRE_OPTIONAL metadata): a body without them (from
an older daemon) decodes with their defaults; every other field must be present.

A prompt: Generate (`dllp2p run` -> its local daemon, forwarded to the root with hops + 1) -> TokenChunk
... TokenChunk -> Done, or Error at any point; one request per connection.

Activations travel as ggml Q8_0 blocks (34 bytes per 32 values: f16 scale + 32 i8), about a quarter of f32;
logits travel as f32, since greedy decoding must match the single-node engine exactly: all of them, or
a node's `top` best (Step.top) when that is all the root's sampling reads.

Error handling: every problem with received bytes is a ProtocolError (a ValueError) with a one-line
message. `fatal` errors (BadMagic, ProtocolVersionError, FrameTooLarge) leave the byte stream
unusable: the decoder refuses everything after them and the connection must be closed. The others
(MalformedFrame, UnknownMessageType, ChunkError, SliceHashMismatch) concern one frame or one slice,
which is dropped; the decoder goes on with the next frame and the peer may be told with an Error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import struct
import types
import typing
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Iterator, Union

import msgpack
import numpy as np

from .election import Member
from .error_codes import ErrorCode
from .formats import ModelConfig
from .formats.quant import QK, TRAITS, QType, dequantize, quantize
from .scheduler import NodeSlice, Peer, Plan

MAGIC = b"DLP2"
PROTOCOL_VERSION = 3  # 2: Plan.exchange; 3: Step.top
HEADER = struct.Struct(">4sBBI")  # magic, version, type, body length
HEADER_SIZE = HEADER.size  # 10
MAX_FRAME = 64 << 20  # body bytes
MAX_CHUNK = 4 << 20  # weight bytes per WeightChunk
Q8_0_BLOCK = TRAITS[QType.Q8_0].block_bytes  # 34
MAX_TOP = 64  # Step.top: the most logits a step may ask each node for

ROLES = ("root", "worker")
STAGE_ATTENTION, STAGE_FFN = 0, 1  # the two exchanges of every layer
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- errors ---------------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """Bytes or a message from a peer that cannot be used. `fatal`: the stream must be closed."""

    fatal = False


class BadMagic(ProtocolError):
    fatal = True


class ProtocolVersionError(ProtocolError):
    fatal = True


class FrameTooLarge(ProtocolError):
    fatal = True


class MalformedFrame(ProtocolError):
    """A frame whose body is not a valid message (it is skipped)."""


class UnknownMessageType(MalformedFrame):
    """A well-framed message of a type this version does not know (it is skipped)."""


class ChunkError(ProtocolError):
    """Weight chunks that do not make up their slice (wrong order, inconsistent metadata)."""


class SliceHashMismatch(ChunkError):
    """A reassembled weight slice whose sha256 is not the one announced."""


class UnexpectedMessage(ProtocolError):
    """A valid message at the wrong time (a Step before any plan, a chunk nobody asked for)."""


_ERROR_CODES: tuple[tuple[type, ErrorCode], ...] = (
    (BadMagic, ErrorCode.BAD_MAGIC),
    (ProtocolVersionError, ErrorCode.VERSION),
    (FrameTooLarge, ErrorCode.TOO_LARGE),
    (UnknownMessageType, ErrorCode.UNKNOWN_TYPE),
    (MalformedFrame, ErrorCode.MALFORMED_FRAME),
    (SliceHashMismatch, ErrorCode.SLICE_HASH),
    (ChunkError, ErrorCode.CHUNK),
    (UnexpectedMessage, ErrorCode.UNEXPECTED),
)


def error_code(e: ProtocolError) -> ErrorCode:
    """The Error.code that tells a peer about e."""
    return next((code for cls, code in _ERROR_CODES if isinstance(e, cls)), ErrorCode.PROTOCOL)


# --- messages -------------------------------------------------------------------------------------


class MsgType(IntEnum):
    HELLO = 1
    PLAN = 2
    WEIGHT_CHUNK = 3
    WEIGHTS_READY = 4
    STEP = 5
    ACTIVATIONS = 6
    LOGITS = 7
    STOP = 8
    ERROR = 9
    SESSION = 10
    NEED = 11
    MESH = 12
    MESH_HELLO = 13
    READY = 14
    STATUS = 15
    STATUS_REPLY = 16
    GENERATE = 17
    TOKEN_CHUNK = 18
    DONE = 19


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


@dataclass(frozen=True)
class Hello:
    """First message on every connection, both ways."""

    protocol_version: int
    node_id: str
    role: str  # "root" | "worker"
    threads: int
    capacity: float  # relative speed, e.g. measured memory GB/s
    cache_keys: tuple[str, ...] = ()  # sha256 of the weight slices the node holds

    def __post_init__(self) -> None:
        _need(bool(self.node_id), "node_id is empty")
        _need(self.role in ROLES, f"role {self.role!r} is not one of {ROLES}")
        _need(self.threads >= 1, f"threads {self.threads} < 1")
        _need(math.isfinite(self.capacity) and self.capacity > 0, f"capacity {self.capacity} is not finite and > 0")
        _need(all(_SHA256.fullmatch(k) for k in self.cache_keys), "cache_keys must be lowercase hex sha256")

    def peer(self, address: str) -> Peer:
        return Peer(self.node_id, address, self.threads, self.capacity)


@dataclass(frozen=True)
class WeightChunk:
    """Bytes [offset, offset + len(data)) of one weight slice's raw ggml storage."""

    epoch: int
    tensor: str  # name of the node's tensor, e.g. "blk.0.attn_q.weight"
    slice_id: str  # which cut of which source tensor, e.g. "blk.0.attn_q.weight[0:384, :]"
    qtype: int  # QType of the storage
    shape: tuple[int, ...]  # logical shape of the slice, numpy order
    offset: int
    total: int  # bytes of the whole slice
    sha256: str  # of the whole slice's bytes, lowercase hex
    data: bytes

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")
        _need(bool(self.tensor), "tensor name is empty")
        _need(self.qtype in QType._value2member_map_, f"unknown tensor type {self.qtype}")
        _need(len(self.shape) >= 1 and all(d >= 1 for d in self.shape), f"bad shape {self.shape}")
        _need(self.total == slice_nbytes(QType(self.qtype), self.shape),
              f"total {self.total} is not the size of {QType(self.qtype).name}{list(self.shape)}")
        _need(0 <= self.offset and self.offset + len(self.data) <= self.total,
              f"bytes [{self.offset}, {self.offset + len(self.data)}) outside the slice's {self.total}")
        _need(0 < len(self.data) <= MAX_CHUNK, f"chunk of {len(self.data)} bytes (1..{MAX_CHUNK})")
        _need(bool(_SHA256.fullmatch(self.sha256)), "sha256 must be 64 lowercase hex digits")


@dataclass(frozen=True)
class WeightsReady:
    """A worker holds every slice of the epoch's plan: `received_bytes` came over the wire."""

    epoch: int
    received_bytes: int
    cached: int  # slices taken from the node's cache instead

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.received_bytes, self.cached) >= 0, "negative epoch or count")


@dataclass(frozen=True)
class Step:
    """Root -> every node: run `tokens` at positions start_pos.. (prefill when several)."""

    epoch: int
    seq: int  # step number within the epoch
    tokens: tuple[int, ...]
    start_pos: int
    top: int = 0  # the nodes send the root their `top` best logits only (greedy: 1, top-k: k); 0: all

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.seq, self.start_pos) >= 0, "negative epoch, seq or start_pos")
        _need(len(self.tokens) >= 1 and min(self.tokens) >= 0, "tokens must be one or more ids >= 0")
        _need(0 <= self.top <= MAX_TOP, f"top {self.top} outside 0..{MAX_TOP}")


@dataclass(frozen=True)
class Activations:
    """One node's partial (n_tokens, width) output of one layer stage, as Q8_0 blocks."""

    epoch: int
    seq: int
    layer: int
    stage: int  # STAGE_ATTENTION or STAGE_FFN
    node: int  # sender's index in the plan
    pos: int  # position of the first token
    n_tokens: int
    width: int  # values per token, a multiple of 32
    data: bytes  # Q8_0 of f32[n_tokens, width]

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.seq, self.layer, self.node, self.pos) >= 0, "negative index")
        _need(self.stage in (STAGE_ATTENTION, STAGE_FFN), f"unknown stage {self.stage}")
        _need(self.n_tokens >= 1 and self.width >= QK and self.width % QK == 0,
              f"shape ({self.n_tokens}, {self.width}) is not n >= 1 rows of whole 32-value blocks")
        want = q8_0_nbytes(self.n_tokens * self.width)
        _need(len(self.data) == want, f"{len(self.data)} bytes of data, expected {want}")

    def values(self) -> np.ndarray:
        """-> f32[n_tokens, width]."""
        return dequantize_activations(self.data, (self.n_tokens, self.width))


@dataclass(frozen=True)
class Logits:
    """One node's slice of the last token's logits: rows [vocab_start, vocab_start + n) as f32."""

    epoch: int
    seq: int
    node: int
    vocab_start: int
    data: bytes  # little-endian f32[n]

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.seq, self.node, self.vocab_start) >= 0, "negative index")
        _need(len(self.data) >= 4 and len(self.data) % 4 == 0, f"{len(self.data)} bytes is not one or more f32")

    def values(self) -> np.ndarray:
        """-> f32[n] (a fresh array)."""
        return np.frombuffer(self.data, "<f4").astype(np.float32)


@dataclass(frozen=True)
class Stop:
    """End of the epoch's work: the node frees its slices' buffers and returns to idle."""

    epoch: int
    reason: str

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")


@dataclass(frozen=True)
class Error:
    """A problem the sender could not get past; `message` is one line, for a person."""

    code: str  # an ErrorCode's value (built with the member; a plain str on the wire and once decoded)
    message: str

    def __post_init__(self) -> None:
        _need(isinstance(self.code, str) and bool(self.code), "error code is empty")
        object.__setattr__(self, "code", str(self.code))  # the wire carries plain strings

    @property
    def kind(self) -> ErrorCode:
        """code as an ErrorCode (OTHER: a code from a newer version)."""
        return ErrorCode.parse(self.code)


@dataclass(frozen=True)
class SliceInfo:
    """One tensor a node will hold: what WeightChunks of it carry, without the bytes."""

    tensor: str
    slice_id: str
    qtype: int
    shape: tuple[int, ...]
    sha256: str

    def __post_init__(self) -> None:
        _need(bool(self.tensor), "tensor name is empty")
        _need(self.qtype in QType._value2member_map_, f"{self.tensor}: unknown tensor type {self.qtype}")
        _need(len(self.shape) >= 1 and all(d >= 1 for d in self.shape), f"{self.tensor}: bad shape {self.shape}")
        slice_nbytes(QType(self.qtype), self.shape)  # rows of whole blocks
        _need(bool(_SHA256.fullmatch(self.sha256)), f"{self.tensor}: sha256 must be 64 lowercase hex digits")

    @property
    def nbytes(self) -> int:
        return slice_nbytes(QType(self.qtype), self.shape)


@dataclass(frozen=True)
class Session:
    """Root -> worker: the epoch's plan, the model's shape (workers have no model file), the KV cache
    size and the tensors this worker will hold. The worker answers Need."""

    plan: Plan
    config: ModelConfig
    ctx: int  # KV cache positions
    slices: tuple[SliceInfo, ...]

    def __post_init__(self) -> None:
        c = self.config
        ints = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "context_length")
        _need(all(getattr(c, f) >= 1 for f in ints), f"model config has a size < 1: {c}")
        _need(bool(c.arch), "model architecture is empty")
        _need(0 < c.rope_dim <= c.head_dim and c.rope_dim % 2 == 0, f"rope_dim {c.rope_dim} does not fit head_dim {c.head_dim}")
        _need(math.isfinite(c.rope_base) and c.rope_base > 0 and math.isfinite(c.norm_eps) and c.norm_eps > 0,
              "rope_base and norm_eps must be finite and > 0")
        _need(1 <= self.ctx <= c.context_length, f"ctx {self.ctx} is not in 1..{c.context_length}")
        _need(len(self.slices) >= 1, "a session without tensors")
        names = [s.tensor for s in self.slices]
        _need(len(set(names)) == len(names), "a tensor is listed twice")

    @property
    def epoch(self) -> int:
        return self.plan.epoch


@dataclass(frozen=True)
class Need:
    """Worker -> root: the slices (sha256) of the Session it does not hold; the root sends exactly these."""

    epoch: int
    sha256s: tuple[str, ...]

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")
        _need(all(_SHA256.fullmatch(h) for h in self.sha256s), "sha256s must be lowercase hex sha256")
        _need(len(set(self.sha256s)) == len(self.sha256s), "a slice is asked for twice")


@dataclass(frozen=True)
class Mesh:
    """Root -> worker: every node holds its weights; connect to the plan's other nodes."""

    epoch: int

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")


@dataclass(frozen=True)
class MeshHello:
    """First frame of a node-to-node connection (src dials dst), echoed back with src and dst swapped."""

    epoch: int
    node_id: str  # the sender's
    src: int  # the sender's index in the plan
    dst: int

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.src, self.dst) >= 0, "negative epoch or index")
        _need(self.src != self.dst, f"a node cannot connect to itself (index {self.src})")
        _need(bool(self.node_id), "node_id is empty")


@dataclass(frozen=True)
class Ready:
    """Worker -> root: the node's engine is built and its mesh connected; it waits for Steps."""

    epoch: int
    node_id: str

    def __post_init__(self) -> None:
        _need(self.epoch >= 0, f"epoch {self.epoch} < 0")
        _need(bool(self.node_id), "node_id is empty")


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

    def __post_init__(self) -> None:
        _need(min(self.rss, self.ram, self.ram_available) >= 0, "negative memory size")
        _need(math.isfinite(self.load1) and self.load1 >= 0, "load must be finite and >= 0")
        _need(self.cores >= 1, f"cores {self.cores} < 1")


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


WIRE_OPTIONAL = {"wire_optional": True}  # field metadata: may be absent from a body (decoded as its default)


@dataclass(frozen=True)
class StatusReply:
    """Daemon -> asker: its membership with roles (root first, then the succession), the plan of its
    session if one runs, else (on the root) of the latest prompt it served (every node's slice), its
    last step."""

    seq: int
    node_id: str  # the answering daemon
    nodes: tuple[NodeStatus, ...]
    plan: Plan | None
    last_step: StepStatus | None
    sessions: int  # sessions ended since it started
    resources: Resources | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)
    links: tuple[LinkRtt, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # by node id
    push: PushStatus | None = dataclasses.field(default=None, metadata=WIRE_OPTIONAL)  # of its latest session

    def __post_init__(self) -> None:
        _need(self.seq >= 0 and self.sessions >= 0, "negative seq or session count")
        ids = [n.member.node_id for n in self.nodes]
        _need(len(set(ids)) == len(ids), "a node is listed twice")
        linked = [link.node_id for link in self.links]
        _need(len(set(linked)) == len(linked), "a link is listed twice")
        _need(sum(n.role == "root" for n in self.nodes) <= 1, "more than one root")


CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation (Generate.messages)."""

    role: str  # CHAT_ROLES
    content: str

    def __post_init__(self) -> None:
        _need(self.role in CHAT_ROLES, f"chat role {self.role!r} is not one of {', '.join(CHAT_ROLES)}")


@dataclass(frozen=True)
class Generate:
    """A prompt for the cluster: `dllp2p run` or the HTTP API -> its local daemon -> (forwarded, hops + 1)
    -> the root, which generates and answers TokenChunk ... TokenChunk, then Done or Error, on the same
    connection. The prompt is a conversation (`messages`, rendered with the model's chat template), or
    text (tokenized by the root, inside the chat template as the user's message when `chat`), or, if
    `tokens` is not empty, token ids used as they are. Sampling fields are sampler.SamplerConfig's."""

    prompt: str
    tokens: tuple[int, ...]
    chat: bool
    system: str | None
    steps: int
    ctx: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int | None
    hops: int = 0  # daemons this request has passed through; a forward past MAX_HOPS is refused
    messages: tuple[ChatTurn, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)
    stop: tuple[str, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)  # end before any of these texts

    def __post_init__(self) -> None:
        _need(self.steps >= 1 and self.ctx >= 2, f"steps {self.steps} < 1 or ctx {self.ctx} < 2")
        _need(all(t >= 0 for t in self.tokens), "a negative token id")
        _need(bool(self.prompt) or bool(self.tokens) or bool(self.messages), "an empty prompt")
        _need(0 <= self.hops <= MAX_HOPS, f"hops {self.hops} not in 0..{MAX_HOPS}")
        _need(len(self.stop) <= MAX_STOPS and all(0 < len(s) <= 256 for s in self.stop),
              f"at most {MAX_STOPS} stop strings of 1-256 characters")


MAX_HOPS = 4
MAX_STOPS = 8


@dataclass(frozen=True)
class TokenChunk:
    """Root -> asker: the next piece of generated text (whole UTF-8 characters)."""

    text: str


@dataclass(frozen=True)
class Done:
    """Root -> asker: generation ended; what the root's run would print on stderr."""

    prompt_tokens: int
    generated_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    nodes: int  # of the plan that served the request (1: the root alone)
    root: str  # the root's node id
    stats: tuple[str, ...]  # the cluster's per-token statistics lines (empty on one node)
    stop_reason: str = dataclasses.field(default="", metadata=WIRE_OPTIONAL)  # generate.GenerationStats': eos, steps, context


Message = Union[Hello, Plan, WeightChunk, WeightsReady, Step, Activations, Logits, Stop, Error,
                Session, Need, Mesh, MeshHello, Ready, Status, StatusReply, Generate, TokenChunk, Done]

MESSAGE_TYPES: dict[MsgType, type] = {
    MsgType.HELLO: Hello,
    MsgType.PLAN: Plan,
    MsgType.WEIGHT_CHUNK: WeightChunk,
    MsgType.WEIGHTS_READY: WeightsReady,
    MsgType.STEP: Step,
    MsgType.ACTIVATIONS: Activations,
    MsgType.LOGITS: Logits,
    MsgType.STOP: Stop,
    MsgType.ERROR: Error,
    MsgType.SESSION: Session,
    MsgType.NEED: Need,
    MsgType.MESH: Mesh,
    MsgType.MESH_HELLO: MeshHello,
    MsgType.READY: Ready,
    MsgType.STATUS: Status,
    MsgType.STATUS_REPLY: StatusReply,
    MsgType.GENERATE: Generate,
    MsgType.TOKEN_CHUNK: TokenChunk,
    MsgType.DONE: Done,
}
_TYPE_OF: dict[type, MsgType] = {cls: t for t, cls in MESSAGE_TYPES.items()}


# --- field schemas: each dataclass's fields and their resolved types -------------------------------

_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
    return _FIELDS[cls]


for _cls in (*MESSAGE_TYPES.values(), NodeSlice, SliceInfo, ModelConfig, Member, NodeStatus, StepStatus, Resources,
             LinkRtt, PushStatus, ChatTurn):
    _fields(_cls)  # resolve every schema at import: a bad annotation fails here, not mid-stream
del _cls


_OPTIONAL: dict[type, frozenset[str]] = {}


def _optional(cls: type) -> frozenset[str]:
    """cls's wire_optional fields."""
    if cls not in _OPTIONAL:
        _OPTIONAL[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("wire_optional"))
    return _OPTIONAL[cls]


def _bad(where: str, expected: str, value: object) -> MalformedFrame:
    return MalformedFrame(f"{where}: expected {expected}, got {type(value).__name__}")


def _from_wire(value: Any, tp: Any, where: str) -> Any:
    """A msgpack-decoded value -> the value of type tp, checked; raises MalformedFrame."""
    if tp is int:
        if type(value) is not int:
            raise _bad(where, "int", value)
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _bad(where, "float", value)
        return float(value)
    if tp in (str, bytes, bool):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if type(value) is not tuple:
            raise _bad(where, "array", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise MalformedFrame(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_from_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else _from_wire(value, inner, where)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_wire(tp, value, where)
    raise TypeError(f"{where}: no wire form for {tp!r}")  # pragma: no cover - schemas are fixed


def _dataclass_from_wire(cls: type, value: Any, where: str) -> Any:
    if type(value) is not dict:
        raise _bad(where, f"a {cls.__name__} map", value)
    fields = _fields(cls)
    names = {name for name, _ in fields}
    optional = _optional(cls)
    missing = [n for n, _ in fields if n not in value and n not in optional]
    if missing:
        raise MalformedFrame(f"{where}: missing field {missing[0]!r}")
    extra = sorted(str(k) for k in value if k not in names)
    if extra:
        raise MalformedFrame(f"{where}: unexpected field {extra[0]!r}")
    kwargs = {n: _from_wire(value[n], tp, f"{where}.{n}") for n, tp in fields if n in value}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own invariants (PlanError included)
        raise MalformedFrame(f"{where}: {e}") from None


def _to_wire(value: Any, tp: Any, where: str) -> Any:
    """A message's field value -> plain msgpack-able data, type-checked like _from_wire."""
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, "float", value)
        return float(value)
    if tp is bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _bad(where, "bytes", value)
        return value
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise _bad(where, "tuple", value)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise MalformedFrame(f"{where}: expected {len(item_types)} items, got {len(value)}")
        return [_to_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, item_types))]
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else _to_wire(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return {n: _to_wire(getattr(value, n), t, f"{where}.{n}") for n, t in _fields(tp)}
    raise TypeError(f"{where}: no wire form for {tp!r}")  # pragma: no cover


# --- frames ---------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One message -> one frame. Raises MalformedFrame (a field of the wrong type), FrameTooLarge."""
    cls = type(msg)
    if cls not in _TYPE_OF:
        raise MalformedFrame(f"{cls.__name__} is not a protocol message")
    body = msgpack.packb(_to_wire(msg, cls, cls.__name__), use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"{cls.__name__} frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, _TYPE_OF[cls], len(body)) + body


def decode_body(msg_type: int, body: bytes) -> Message:
    """A frame's type and body -> its message. Raises UnknownMessageType, MalformedFrame."""
    try:
        cls = MESSAGE_TYPES[MsgType(msg_type)]
    except ValueError:
        raise UnknownMessageType(f"unknown message type {msg_type} ({len(body)}-byte frame skipped)") from None
    try:
        value = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True)
    except (ValueError, TypeError) as e:  # msgpack's own errors are ValueErrors; unhashable keys TypeError
        raise MalformedFrame(f"{cls.__name__} body is not valid msgpack: {e}") from None
    msg = _dataclass_from_wire(cls, value, cls.__name__)
    if cls is Hello and msg.protocol_version != PROTOCOL_VERSION:
        raise _version_error(msg.protocol_version)
    return msg


def _version_error(theirs: int) -> ProtocolVersionError:
    return ProtocolVersionError(
        f"peer speaks dllp2p protocol version {theirs}, this node speaks version {PROTOCOL_VERSION}"
    )


class FrameDecoder:
    """Bytes in, messages out, for one stream; no I/O. Bytes may arrive split or joined anyhow.

    `receive(data)` buffers; `next_message()` returns the next whole message or None, raising a
    ProtocolError exactly at a bad frame. `feed(data)` does both: it returns every message before the
    first bad frame and raises that frame's error then, or on the next call if messages came first
    (so none is lost). The header is checked as soon as its bytes arrive: a bad magic as soon as the
    first bytes differ, an oversized frame before any of its body is buffered.

    Error handling: after a fatal error (BadMagic, ProtocolVersionError, FrameTooLarge) the decoder
    drops its buffer, ignores further bytes and raises the same error on every call: close the
    stream. After MalformedFrame / UnknownMessageType the bad frame is consumed and decoding goes on.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._fatal: ProtocolError | None = None
        self._deferred: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        if self._fatal is None:
            self._buf += data

    def next_message(self) -> Message | None:
        if self._fatal is not None:
            raise self._fatal
        try:
            header = self._check_header()
        except ProtocolError as e:
            self._fatal = e
            self._buf.clear()
            raise
        if header is None:
            return None
        msg_type, length = header
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:  # one copy of the body; the view is released before the del
            body = view[HEADER_SIZE:end].tobytes()
        del self._buf[:end]
        try:
            return decode_body(msg_type, body)
        except ProtocolError as e:
            if e.fatal:
                self._fatal = e
                self._buf.clear()
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self.receive(data)
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err
        out: list[Message] = []
        while True:
            try:
                msg = self.next_message()
            except ProtocolError as e:
                if not out:
                    raise
                self._deferred = e
                return out
            if msg is None:
                return out
            out.append(msg)

    def eof(self) -> None:
        """The stream ended: raises a deferred error, or MalformedFrame if it ended inside a frame."""
        if self._fatal is not None:
            raise self._fatal
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err
        if self._buf:
            raise MalformedFrame(f"stream ended inside a frame ({len(self._buf)} bytes left over)")

    def _check_header(self) -> tuple[int, int] | None:
        """-> (type, body length) once the header is whole and valid; None while it is incomplete."""
        buf = self._buf
        head = bytes(buf[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            raise BadMagic(f"not a dllp2p frame (magic {head!r}, expected {MAGIC!r})")
        if len(buf) > len(MAGIC) and buf[len(MAGIC)] != PROTOCOL_VERSION:
            raise _version_error(buf[len(MAGIC)])
        if len(buf) < HEADER_SIZE:
            return None
        _, _, msg_type, length = HEADER.unpack_from(buf)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes is over the {self.max_frame}-byte limit")
        return msg_type, length


# --- payload codecs -------------------------------------------------------------------------------


def q8_0_nbytes(n_values: int) -> int:
    """Bytes of n_values (a multiple of 32) as Q8_0 blocks."""
    return n_values // QK * Q8_0_BLOCK


def quantize_activations(x: np.ndarray) -> bytes:
    """f32[..., K] (K % 32 == 0, finite) -> ggml Q8_0 blocks, row after row."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK or x.size == 0:
        raise ValueError(f"activations of shape {x.shape}: the last axis must be a non-zero multiple of {QK}")
    if not np.isfinite(x).all():
        raise ValueError("activations are not all finite")
    return quantize(x, QType.Q8_0).tobytes()


def dequantize_activations(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 blocks -> f32[shape]. Raises MalformedFrame if the byte count does not fit the shape."""
    if not shape or shape[-1] % QK or min(shape) < 1:
        raise ValueError(f"shape {shape}: the last axis must be a non-zero multiple of {QK}")
    n = math.prod(shape)
    if len(data) != q8_0_nbytes(n):
        raise MalformedFrame(f"{len(data)} bytes of Q8_0 do not hold {shape} values ({q8_0_nbytes(n)} do)")
    raw = np.frombuffer(data, np.uint8).reshape(-1, shape[-1] // QK * Q8_0_BLOCK)
    return dequantize(raw, QType.Q8_0, shape)


def activations(epoch: int, seq: int, layer: int, stage: int, node: int, pos: int, x: np.ndarray) -> Activations:
    """A node's partial output x f32[n_tokens, width] -> its Activations message."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"activations must be f32[n_tokens, width], got shape {x.shape}")
    return Activations(epoch, seq, layer, stage, node, pos, x.shape[0], x.shape[1], quantize_activations(x))


def logits(epoch: int, seq: int, node: int, vocab_start: int, x: np.ndarray) -> Logits:
    """x f32[n]: the node's logits for rows [vocab_start, vocab_start + n)."""
    x = np.asarray(x, dtype="<f4")
    if x.ndim != 1:
        raise ValueError(f"logits must be f32[n], got shape {x.shape}")
    return Logits(epoch, seq, node, vocab_start, x.tobytes())


# --- weight slices in chunks ----------------------------------------------------------------------


def slice_nbytes(qtype: QType, shape: tuple[int, ...]) -> int:
    """Raw storage bytes of a tensor of this type and logical shape."""
    return TRAITS[qtype].row_bytes(shape[-1]) * math.prod(shape[:-1])


def weight_chunks(
    epoch: int,
    tensor: str,
    slice_id: str,
    qtype: QType,
    shape: tuple[int, ...],
    data: bytes | memoryview,
    sha256: str,
    chunk_size: int = MAX_CHUNK,
) -> Iterator[WeightChunk]:
    """One slice's raw bytes -> WeightChunks of at most chunk_size bytes, in order (no copies)."""
    if not 0 < chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size {chunk_size} is not in 1..{MAX_CHUNK}")
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), chunk_size):
        part = view[offset : offset + chunk_size]
        yield WeightChunk(epoch, tensor, slice_id, int(qtype), tuple(shape), offset, len(view), sha256, part)


@dataclass(frozen=True)
class AssembledSlice:
    tensor: str
    slice_id: str
    qtype: QType
    shape: tuple[int, ...]
    sha256: str
    data: bytes


class SliceAssembler:
    """Reassembles weight slices from their chunks (in order, per tensor) and checks their sha256.

    Error handling: a chunk out of order or disagreeing with its slice's first chunk raises ChunkError,
    a finished slice with another hash SliceHashMismatch; either way that slice is dropped and the
    assembler goes on with the others.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[WeightChunk, bytearray]] = {}
        self.received_bytes = 0

    @property
    def pending(self) -> tuple[str, ...]:
        """Tensors with some but not all of their bytes."""
        return tuple(self._open)

    def add(self, chunk: WeightChunk) -> AssembledSlice | None:
        """-> the whole slice once its last chunk arrives, else None."""
        first, buf = self._open.get(chunk.tensor, (chunk, bytearray()))
        meta = ("epoch", "slice_id", "qtype", "shape", "total", "sha256")
        if any(getattr(chunk, m) != getattr(first, m) for m in meta):
            del self._open[chunk.tensor]
            raise ChunkError(f"{chunk.tensor}: chunk at {chunk.offset} disagrees with the slice's first chunk")
        if chunk.offset != len(buf):
            self._open.pop(chunk.tensor, None)
            raise ChunkError(f"{chunk.tensor}: chunk at byte {chunk.offset}, expected byte {len(buf)}")
        buf += chunk.data
        self.received_bytes += len(chunk.data)
        if len(buf) < chunk.total:
            self._open[chunk.tensor] = (first, buf)
            return None
        self._open.pop(chunk.tensor, None)
        digest = hashlib.sha256(buf).hexdigest()
        if digest != chunk.sha256:
            raise SliceHashMismatch(
                f"{chunk.tensor}: received bytes hash to {digest[:16]}.., announced {chunk.sha256[:16]}.."
            )
        return AssembledSlice(chunk.tensor, chunk.slice_id, QType(chunk.qtype), chunk.shape, chunk.sha256, bytes(buf))
