"""The wire protocol's messages: frozen dataclasses, each checking its own invariants when built, so a
decoded message is as trustworthy as a local one. No bytes here (codec.py), no sockets (link.py). Field
types: int, float, str, bytes, bool, tuples and nested dataclasses (the scheduler's Plan, ...). Fields
added later are `wire_optional` (WIRE_OPTIONAL): a body without them decodes with their defaults.

A session (session/worker.py, session/root.py): Hello both ways; Session (plan, model config, ctx, the
worker's slice list) -> Need (the sha256s its cache lacks) -> exactly those as WeightChunks ->
WeightsReady; Mesh -> node-to-node connections, each opened by a MeshHello both ways -> Ready; then
Step after Step; Stop. Error.code names a problem (an error_codes.ErrorCode). Status -> StatusReply,
again and again on one connection (`dllp2p status`, the daemons' polls). A prompt (client.py):
Generate -> TokenChunk ... -> Done or Error, one per connection, forwarded to the root with hops + 1
(and again, with Generate.already = the TokenChunks' ids, to the next root if that one is lost). Goodbye:
a daemon stopping, to every member, one per connection, no answer.
Activations and logits travel natively on the mesh sockets (jit/tp_program.py), not as messages.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from ..error_codes import ErrorCode
from ..engine import MAX_TOP, BatchRow
from ..formats import ModelConfig
from ..formats.quant import TRAITS, QType
from ..pipeline import AnyPlan
from ..scheduler import Peer

PROTOCOL_VERSION = 4  # 2: Plan.exchange; 3: Step.top; 4: Step.rows, Step.copies, Session.max_seqs
MAX_CHUNK = 4 << 20  # weight bytes per WeightChunk
MAX_TOKEN_ID = (1 << 31) - 1  # token ids are int32 in the compiled code; each node checks them against its vocabulary

ROLES = ("root", "worker")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def slice_nbytes(qtype: QType, shape: tuple[int, ...]) -> int:
    """Raw storage bytes of a tensor of this type and logical shape."""
    return TRAITS[qtype].row_bytes(shape[-1]) * math.prod(shape[:-1])


# --- messages -------------------------------------------------------------------------------------

WIRE_OPTIONAL = {"wire_optional": True}  # field metadata: may be absent from a body (decoded as its default)


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
    # the node's measured figures for the cost model (daemon/figures.py; 0: not measured)
    gbps: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # GB/s of weights per token, its kernels
    disk_gbps: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)  # reading its slice cache's disk
    ram: int = dataclasses.field(default=0, metadata=WIRE_OPTIONAL)  # bytes its weights may use
    # measured whole-model decode tokens/s of its recent steps (session/rates.py); 0.0: not measured yet
    rate: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)
    # ms it waited for a CPU per exchange of those steps (RateMeter.wait_ms); 0.0: quiet or not measured
    wait_ms: float = dataclasses.field(default=0.0, metadata=WIRE_OPTIONAL)

    def __post_init__(self) -> None:
        _need(bool(self.node_id), "node_id is empty")
        _need(all(math.isfinite(x) and x >= 0 for x in (self.gbps, self.disk_gbps, self.rate, self.wait_ms))
              and self.ram >= 0,
              "measured figures must be finite and >= 0")
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
    # a batch (issue 18): (KV slot, start_pos, token count) per row, `tokens` their concatenation; (): one row
    # of slot 0 at start_pos
    rows: tuple[tuple[int, int, int], ...] = dataclasses.field(default=(), metadata={"wire_optional": True})
    # (src, dst, n): copy_prefix(src, dst, n) on every node before the rows (prefix sharing)
    copies: tuple[tuple[int, int, int], ...] = dataclasses.field(default=(), metadata={"wire_optional": True})

    def __post_init__(self) -> None:
        _need(min(self.epoch, self.seq, self.start_pos) >= 0, "negative epoch, seq or start_pos")
        _need(len(self.tokens) >= 1 and min(self.tokens) >= 0 and max(self.tokens) <= MAX_TOKEN_ID,
              f"tokens must be one or more ids in 0..{MAX_TOKEN_ID}")
        _need(0 <= self.top <= MAX_TOP, f"top {self.top} outside 0..{MAX_TOP}")
        _need(all(min(r) >= 0 and r[2] >= 1 for r in self.rows), "a row with a negative slot or start, or no tokens")
        _need(not self.rows or sum(r[2] for r in self.rows) == len(self.tokens), "rows do not add up to the tokens")
        _need(len({r[0] for r in self.rows}) == len(self.rows), "two rows of one slot")
        _need(all(min(c) >= 0 for c in self.copies), "a negative copy_prefix argument")

    def batch(self) -> tuple[BatchRow, ...]:
        """The step's rows (one of slot 0 when it names none)."""
        if not self.rows:
            return (BatchRow(0, self.tokens, self.start_pos),)
        out, at = [], 0
        for slot, start, n in self.rows:
            out.append(BatchRow(slot, self.tokens[at : at + n], start))
            at += n
        return tuple(out)


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
    # PEER_LOST: the plan index of the node the sender lost (the root tells the dead from those waiting on it)
    node: int = dataclasses.field(default=-1, metadata=WIRE_OPTIONAL)

    def __post_init__(self) -> None:
        _need(isinstance(self.code, str) and bool(self.code), "error code is empty")
        _need(self.node >= -1, f"node {self.node} < -1")
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

    plan: AnyPlan  # a Plan (tensor parallel) or a pipeline.PipelinePlan (stages), told apart by their fields
    config: ModelConfig
    ctx: int  # KV cache positions
    slices: tuple[SliceInfo, ...]
    max_seqs: int = dataclasses.field(default=1, metadata={"wire_optional": True})  # KV slots (batched sequences)
    # KV positions all slots may hold together (the root's KV budget; 0: max_seqs full contexts)
    kv_positions: int = dataclasses.field(default=0, metadata={"wire_optional": True})

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
        _need(1 <= self.max_seqs <= MAX_SEQS, f"max_seqs {self.max_seqs} outside 1..{MAX_SEQS}")
        _need(0 <= self.kv_positions <= self.ctx * self.max_seqs,
              f"kv_positions {self.kv_positions} outside 0..{self.ctx * self.max_seqs} (ctx x max_seqs)")
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


MAX_SEQS = 256  # KV slots a session may ask for


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
    # a resumption (handover): ids generated and streamed already (the TokenChunks' ids, in order) by a root
    # that was lost or left; the next root prefills prompt + these, advances the sampler past them and
    # streams only the text that follows. `steps` counts them.
    already: tuple[int, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)

    def __post_init__(self) -> None:
        _need(self.steps >= 1 and self.ctx >= 2, f"steps {self.steps} < 1 or ctx {self.ctx} < 2")
        _need(all(0 <= t <= MAX_TOKEN_ID for t in self.tokens + self.already), f"a token id outside 0..{MAX_TOKEN_ID}")
        _need(bool(self.prompt) or bool(self.tokens) or bool(self.messages), "an empty prompt")
        _need(0 <= self.hops <= MAX_HOPS, f"hops {self.hops} not in 0..{MAX_HOPS}")
        _need(len(self.stop) <= MAX_STOPS and all(0 < len(s) <= 256 for s in self.stop),
              f"at most {MAX_STOPS} stop strings of 1-256 characters")


MAX_HOPS = 4
MAX_STOPS = 8


@dataclass(frozen=True)
class Goodbye:
    """A daemon leaving the cluster (SIGTERM, `systemctl stop`), sent to every member on a connection of its
    own: they drop it from their membership at once (this incarnation: started_at), so the next root is
    elected without waiting for polls or mDNS to miss it. Answered with nothing."""

    node_id: str
    started_at: float
    reason: str

    def __post_init__(self) -> None:
        _need(bool(self.node_id), "node_id is empty")
        _need(math.isfinite(self.started_at) and self.started_at >= 0, f"start time {self.started_at!r} out of range")


@dataclass(frozen=True)
class TokenChunk:
    """Root -> asker: the next piece of generated text (whole UTF-8 characters). `ids`: the token ids
    generated since the previous chunk, whose text this piece completes: the text of all chunks so far is
    exactly what the root's decoder and stop filter give out for all their ids, so a daemon relaying them
    can resubmit the request with those ids as Generate.already when the root is lost."""

    text: str
    ids: tuple[int, ...] = dataclasses.field(default=(), metadata=WIRE_OPTIONAL)


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
    cached_tokens: int = dataclasses.field(default=0, metadata=WIRE_OPTIONAL)  # prompt tokens not computed (a shared prefix)
