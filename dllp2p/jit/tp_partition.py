"""What a tensor-parallel node's compiled program works on, as plain data (no IR): its Partition of the
plan, its table slots, its buffers' sizes, the reduce-scatter's byte offsets, and the payload bytes one step
sends and receives. tp_program.py emits the program over these; tp.py sizes the buffers with them."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import MAX_TOP
from .layout import act_bytes, q8_0_bytes
from .program import ProgramSpec, Slots

RS_MIN_NODES = 3  # from this many nodes a q8 all-reduce is a reduce-scatter then an all-gather


@dataclass(frozen=True)
class Partition:
    """Which rows each node computes; node `index` is this program's. Ranges are half-open (start, stop)."""

    index: int
    kv_heads: tuple[tuple[int, int], ...]  # per node
    ffn_rows: tuple[tuple[int, int], ...]
    dim_rows: tuple[tuple[int, int], ...]
    vocab_rows: tuple[tuple[int, int], ...]
    exchange: str = "exact"  # "q8" (Megatron, Q8_0 partial sums) or "exact" (row split); scheduler.EXCHANGES
    q_heads: tuple[tuple[int, int], ...] = ()  # per node; () = kv_heads x group (no KV head shared by nodes)

    def q_of(self, node: int, group: int) -> tuple[int, int]:
        """Node's query heads [h0, h1): its own share, or its KV heads' whole groups."""
        if self.q_heads:
            return self.q_heads[node]
        a, b = self.kv_heads[node]
        return a * group, b * group

    @property
    def n_nodes(self) -> int:
        return len(self.kv_heads)


class TPSlots(Slots):
    SCALARS = Slots.SCALARS + ("error", "sync_ns", "exchanges", "recv_spins", "top", "seal_fn", "open_fn")
    BUFFERS = Slots.BUFFERS + ("fds", "staging", "att_q", "o_full", "s_q", "d_full", "logits_full", "clock", "sums_q",
                               "cands", "emb_all", "xkeys", "xcount", "xnonce", "sealed")


def tp_buffer_sizes(spec: ProgramSpec, part: Partition) -> dict[str, int]:
    """Bytes of the exchange buffers (shared, one each)."""
    c, mc = spec.config, spec.max_chunk
    if part.exchange == "q8":
        unused = dict.fromkeys(("staging", "att_q", "o_full", "s_q", "d_full"), 0)
        sums = (ReduceScatter(spec, part).total if part.n_nodes >= RS_MIN_NODES
                else part.n_nodes * mc * q8_0_bytes(c.dim))  # every node's quantized partial sums
        return {**unused, "sums_q": sums, "logits_full": c.vocab_size * 4, "clock": 16, "cands": candidate_bytes(part),
                "emb_all": embed_bytes(spec, part)}
    widest_local = max(
        max(act_bytes((b - a) * c.head_dim) for a, b in (part.q_of(j, c.group_size) for j in range(part.n_nodes))),
        max(act_bytes(b - a) for a, b in part.ffn_rows),
        max((b - a) * 4 for a, b in part.dim_rows),
    )
    return {
        "staging": mc * widest_local,
        "att_q": mc * act_bytes(c.q_dim),
        "o_full": mc * c.dim * 4,
        "s_q": mc * act_bytes(c.ffn_dim),
        "d_full": mc * c.dim * 4,
        "logits_full": c.vocab_size * 4,
        "clock": 16,
        "sums_q": 0,
        "cands": candidate_bytes(part),
        "emb_all": embed_bytes(spec, part),
    }


def embed_bytes(spec: ProgramSpec, part: Partition) -> int:
    """`emb_all`: per node a section of max_chunk f32 rows of the model dimension (node j's at j * section)."""
    return part.n_nodes * spec.max_chunk * spec.config.dim * 4


def candidate_bytes(part: Partition) -> int:
    """`cands`: MAX_TOP records of 8 bytes per node (node j's at j * MAX_TOP * 8)."""
    return part.n_nodes * MAX_TOP * 8


def top_of(part: Partition, node: int, top: int) -> int:
    """How many logits node sends for a step asking for its `top` best: at most its vocabulary rows."""
    v0, v1 = part.vocab_rows[node]
    return min(top, v1 - v0)


class ReduceScatter:
    """Byte offsets in `sums_q` for a q8 all-reduce over RS_MIN_NODES or more nodes. Node j owns the
    model-dimension columns dim_rows[j] (k_j of them, whole Q8_0 blocks). Every node quantizes each
    owner's columns of its partial (send[j]) and sends them to the owner; the owner adds the N quantized
    parts in node order (recv[j]: from node j; its own from send[me]) into `red` (f32), quantizes that
    sum (ag[me]) and sends it to everyone; every node then adds every owner's ag[j] to x. Each node
    sends 2 (N - 1) / N of a Q8_0 row per token instead of N - 1 rows, at the price of one more round
    trip and a second rounding (of the sum). Sections hold max_chunk rows."""

    def __init__(self, spec: ProgramSpec, part: Partition):
        mc, me = spec.max_chunk, part.index
        self.cols = list(part.dim_rows)
        self.k = [b - a for a, b in self.cols]
        self.q = [q8_0_bytes(k) for k in self.k]  # bytes of one row of owner j's columns
        at = 0

        def take(size: int) -> int:
            nonlocal at
            at += size
            return at - size

        self.send = [take(mc * q) for q in self.q]
        self.recv = [take(mc * self.q[me]) for _ in self.q]
        self.ag = [take(mc * q) for q in self.q]
        self.red = take(mc * self.k[me] * 4)
        self.total = at

    def bytes_per_token(self, me: int) -> int:
        """Sent by node me per all-reduce and token (and as many received)."""
        n_peers = len(self.q) - 1
        return sum(q for j, q in enumerate(self.q) if j != me) + n_peers * self.q[me]



def bytes_per_step(spec: ProgramSpec, part: Partition, n: int = 1, top: int = 0, n_out: int = 1) -> tuple[int, int]:
    """(sent, received) payload bytes of this node for one forward of n tokens, node 0 asking for every
    node's `top` best logits (0: all) of n_out rows (a batch's sequences; one for a prompt)."""
    c, me = spec.config, part.index
    g, hd = c.group_size, c.head_dim
    peers = part.n_nodes - 1

    def logits_bytes(j: int) -> int:
        v0, v1 = part.vocab_rows[j]
        return n_out * (top_of(part, j, top) * 8 if top else (v1 - v0) * 4)

    vocab = [logits_bytes(j) for j in range(part.n_nodes)]
    logits_sent = vocab[me] if me else 0
    logits_received = sum(vocab) - vocab[0] if me == 0 else 0
    embed = n * c.dim * 4 * peers if peers else 0  # each node's embedding rows to every peer (and theirs back)
    logits_sent, logits_received = logits_sent + embed, logits_received + embed
    if part.exchange == "q8":  # two all-reduces per layer
        if part.n_nodes >= RS_MIN_NODES:
            per = 2 * c.n_layers * n * ReduceScatter(spec, part).bytes_per_token(me)
        else:  # this node's Q8_0 partial to every peer
            per = 2 * c.n_layers * n * q8_0_bytes(c.dim) * peers
        return per + logits_sent, per + logits_received
    sizes = [
        [act_bytes((b - a) * hd) for a, b in (part.q_of(j, g) for j in range(part.n_nodes))],
        [(b - a) * 4 for a, b in part.dim_rows],
        [act_bytes(b - a) for a, b in part.ffn_rows],
        [(b - a) * 4 for a, b in part.dim_rows],
    ]
    sent = c.n_layers * n * sum(s[me] * peers for s in sizes)
    received = c.n_layers * n * sum(sum(s) - s[me] for s in sizes)
    return sent + logits_sent, received + logits_received
