"""Pure scheduling: (model config, peers with capacities) -> a frozen Plan of who computes which slice.

Slicing is Megatron-style, along the layer's natural seams:

    attn_q        rows    q heads  [q0, q1) * head_dim   (whole KV groups, or a share of one group)
    attn_k/v      rows    kv heads [kv0, kv1) * head_dim (those its q heads read: replicated when shared)
    attn_output   columns the node's q rows, so its partial output sums with the others'
    ffn_gate/up   rows    [f0, f1)                f0 a multiple of `block` (whole blocks of down's rows)
    ffn_down      columns [f0, f1)
    output        rows    [v0, v1)                v0 a multiple of 32; logits are concatenated
    token_embd    rows    [v0, v1)                each node looks up the tokens it owns (tp_program)

Each node computes partial (dim,) outputs of attention and FFN; summing them over the nodes (the two
exchanges per layer) gives the full layer's output: the plan's exchange "q8". With exchange "exact"
(the default) attn_output and ffn_down are split by `dim_rows` instead, and the nodes all-gather exact
results, four exchanges per layer (jit/tp_program.py). Norms are whole on every node.

Policies:
    "pow2"      the largest 2^n <= #peers nodes that the model's heads allow (see below), equal slices (as
                equal as whole heads and blocks allow: SmolLM2's 3 KV heads on 2 nodes are 2 + 1).
    "weighted"  as many nodes as peers (and heads) allow, slices proportional to each node's capacity.

Heads: up to n_kv_heads nodes, a node owns whole KV groups. More nodes than KV heads (Gemma 3 has 1) are
allowed when they divide evenly over the KV heads, up to one query head per node: each KV group's query
heads are shared out among its n / n_kv_heads nodes, and every one of them computes (replicates) that KV
head's K and V itself. For Gemma 3 270M that costs each node the 2 x 256 x 640 K/V rows (Q5_0 K 112,640 B +
Q8_0 V 174,080 B = 0.29 MB per layer, 5.2 MB a token over 18 layers: ~19 us a layer at ~15 GB/s, plus
2 x 256 values of RoPE and cache writes); computing them once and sending them would cost an extra
exchange per layer (a network round trip, ~50-100 us on a LAN, for 2 KB of K/V). So: replicated.

Blocks: FFN and vocabulary ranges start on multiples of BLOCK_ROWS (32, a ggml block); `block` raises the
FFN alignment to the largest block among the tensors cut by columns (256 for K-quant ffn_down / attn_output
in the q8 exchange: tp.split_block computes it from the file's tensor types).

Either way the first peer is the root and always takes part; the others are taken by capacity (then
node id), so the plan does not depend on the order peers were discovered in. Every share is rounded by
largest remainder with at least one unit per node (a KV head, a block of 32 FFN or vocabulary rows).

A Plan validates itself when built (every head and row covered exactly once, in order, aligned), so a
Plan decoded off the wire is as trustworthy as one built here. Errors: PlanError (a ValueError).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import astuple, dataclass, field
from fractions import Fraction
from typing import Sequence

from .formats import ModelConfig

BLOCK_ROWS = 32  # FFN and vocabulary ranges start on multiples of this (a ggml block of down's columns)
POLICIES = ("pow2", "weighted")
EXCHANGES = ("exact", "q8")  # how nodes combine their shares of a layer (jit/tp_program.py)
DEFAULT_EXCHANGE = "exact"


class PlanError(ValueError):
    """No valid plan for these peers and this model, or a plan that is not valid."""


@dataclass(frozen=True)
class Peer:
    node_id: str  # unique, stable across restarts
    address: str  # "host:port" the node listens on ("" for a root that is not listening)
    threads: int  # compute threads the node will use
    capacity: float  # relative speed (e.g. measured memory GB/s); finite, > 0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise PlanError(f"peer node id must be a non-empty string, got {self.node_id!r}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise PlanError(f"peer {self.node_id}: threads must be an int >= 1, got {self.threads!r}")
        cap = self.capacity
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise PlanError(f"peer {self.node_id}: capacity must be a finite number > 0, got {cap!r}")


@dataclass(frozen=True)
class NodeSlice:
    """What node `index` of a plan holds and computes. Ranges are half-open [start, stop)."""

    index: int  # 0 is the root
    node_id: str
    address: str
    threads: int
    head_dim: int
    kv_heads: tuple[int, int]  # its K/V heads: those its query heads read (shared with a neighbour when replicated)
    q_heads: tuple[int, int]  # its query heads: kv_heads * group_size, or part of one KV head's group
    ffn_rows: tuple[int, int]  # rows of gate/up, columns of down
    vocab_rows: tuple[int, int]  # rows of the output projection (its slice of the logits)
    dim_rows: tuple[int, int]  # rows of attn_output and ffn_down when those are split by rows (tp.py)

    @property
    def q_rows(self) -> tuple[int, int]:
        """Rows of attn_q, columns of attn_output."""
        return self.q_heads[0] * self.head_dim, self.q_heads[1] * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        """Rows of attn_k and attn_v."""
        return self.kv_heads[0] * self.head_dim, self.kv_heads[1] * self.head_dim


@dataclass(frozen=True)
class Plan:
    """Who computes what, for one epoch. Valid by construction (see validate_plan)."""

    epoch: int  # grows with every re-plan; every message of the epoch carries it
    model: str  # model fingerprint: root and workers must agree on it
    policy: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    dim: int
    nodes: tuple[NodeSlice, ...]
    exchange: str = DEFAULT_EXCHANGE  # "q8": Megatron partial sums in Q8_0; "exact": row split, bit-exact
    block: int = field(default=BLOCK_ROWS, metadata={"wire_optional": True})  # FFN ranges start on multiples

    def __post_init__(self) -> None:
        validate_plan(self)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def node(self, node_id: str) -> NodeSlice:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise PlanError(f"node {node_id!r} is not in the plan of epoch {self.epoch}")


def model_fingerprint(config: ModelConfig) -> str:
    """A short stable id of the model's shape: 16 hex digits of sha256 over the config's fields."""
    return hashlib.sha256(repr(astuple(config)).encode()).hexdigest()[:16]


def plan(
    config: ModelConfig,
    peers: Sequence[Peer],
    epoch: int,
    policy: str = "pow2",
    *,
    max_nodes: int | None = None,
    model: str | None = None,
    exchange: str = DEFAULT_EXCHANGE,
    block: int = BLOCK_ROWS,
) -> Plan:
    """peers[0] is the root. Returns the plan for `epoch`; same inputs, same plan.

    max_nodes caps the node count further; model overrides the fingerprint (e.g. a hash of the file);
    exchange picks how nodes combine their shares (EXCHANGES); block: FFN ranges start on multiples of it
    (a multiple of BLOCK_ROWS: the largest block among the tensors cut by columns, tp.split_block).
    Raises PlanError: no peers, duplicate node ids, unknown policy or exchange, a model that cannot be split.
    """
    if policy not in POLICIES:
        raise PlanError(f"unknown scheduling policy {policy!r} (known: {', '.join(POLICIES)})")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise PlanError(f"epoch must be an int >= 0, got {epoch!r}")
    if not peers:
        raise PlanError("cannot plan without peers (the root itself is the first peer)")
    ids = [p.node_id for p in peers]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"duplicate node ids: {', '.join(dup)}")
    _check_config(config)
    if max_nodes is not None and max_nodes < 1:
        raise PlanError(f"max_nodes must be >= 1, got {max_nodes}")

    if not isinstance(block, int) or isinstance(block, bool) or block < BLOCK_ROWS or block % BLOCK_ROWS:
        raise PlanError(f"block must be a positive multiple of {BLOCK_ROWS}, got {block!r}")

    limit = min(len(peers), max_nodes or len(peers))
    n = max(k for k in range(1, limit + 1) if allowed_nodes(config, k) and (policy != "pow2" or k & (k - 1) == 0))
    chosen = _choose(peers, n)
    weights = [Fraction(1)] * n if policy == "pow2" else [Fraction(p.capacity) for p in chosen]

    heads = head_split(config, weights)
    ffn = _block_split(config.ffn_dim, weights, "FFN rows", block)
    vocab = _block_split(config.vocab_size, weights, "vocabulary rows")
    dim = _block_split(config.dim, weights, "model dimension rows")
    g = config.group_size
    nodes = []
    for i, peer in enumerate(chosen):
        q0, q1 = heads[i]
        nodes.append(
            NodeSlice(
                index=i,
                node_id=peer.node_id,
                address=peer.address,
                threads=peer.threads,
                head_dim=config.head_dim,
                kv_heads=(q0 // g, -(-q1 // g)),
                q_heads=(q0, q1),
                ffn_rows=ffn[i],
                vocab_rows=vocab[i],
                dim_rows=dim[i],
            )
        )
    return Plan(
        epoch=epoch,
        model=model if model is not None else model_fingerprint(config),
        policy=policy,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        ffn_dim=config.ffn_dim,
        vocab_size=config.vocab_size,
        dim=config.dim,
        nodes=tuple(nodes),
        exchange=exchange,
        block=block,
    )


def allowed_nodes(config: ModelConfig, n: int) -> bool:
    """Whether n nodes can share the heads: n <= n_kv_heads (whole KV groups each), or n a multiple of
    n_kv_heads up to n_heads (each KV group's query heads over n / n_kv_heads nodes, its K/V replicated)."""
    return 1 <= n <= config.n_kv_heads or (n % config.n_kv_heads == 0 and n <= config.n_heads)


def head_split(config: ModelConfig, weights: Sequence[Fraction]) -> list[tuple[int, int]]:
    """Each node's query heads [q0, q1): whole KV groups (n <= n_kv_heads), or a share of one group."""
    n, n_kv, g = len(weights), config.n_kv_heads, config.group_size
    if n <= n_kv:
        kv = apportion(n_kv, weights)
        ends = [sum(kv[: i + 1]) * g for i in range(n)]
    else:
        per = n // n_kv
        ends = []
        for grp in range(n_kv):
            shares = apportion(g, weights[grp * per : (grp + 1) * per])
            ends += [grp * g + sum(shares[: i + 1]) for i in range(per)]
    return list(zip([0] + ends[:-1], ends))


def apportion(total: int, weights: Sequence[Fraction]) -> tuple[int, ...]:
    """Split `total` units in proportion to `weights`, every share >= 1, summing to `total`.

    Largest remainder (Hamilton): floors of the exact quotas, leftover units to the largest remainders
    (ties to the lower index); then any zero share takes a unit from the share furthest above its quota
    (ties to the higher index). Exact rational arithmetic, so the result is the same on every machine.
    """
    n = len(weights)
    if total < n:
        raise PlanError(f"cannot give {n} nodes at least one of {total} units each")
    w_sum = sum(weights, Fraction(0))
    quotas = [total * w / w_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    for i in range(n):
        if shares[i] == 0:
            donor = max((j for j in range(n) if shares[j] > 1), key=lambda j: (shares[j] - quotas[j], j))
            shares[donor] -= 1
            shares[i] = 1
    return tuple(shares)


def validate_plan(p: Plan) -> None:
    """Raises PlanError unless the plan covers every head and row exactly once, in node order, aligned."""
    where = f"plan of epoch {p.epoch}"
    for name in ("epoch", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "dim"):
        v = getattr(p, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "epoch" else 1):
            raise PlanError(f"{where}: {name} must be a positive int, got {v!r}")
    if p.policy not in POLICIES:
        raise PlanError(f"{where}: unknown policy {p.policy!r}")
    if p.exchange not in EXCHANGES:
        raise PlanError(f"{where}: unknown exchange {p.exchange!r} (known: {', '.join(EXCHANGES)})")
    if p.n_heads % p.n_kv_heads:
        raise PlanError(f"{where}: {p.n_heads} heads are not a multiple of {p.n_kv_heads} KV heads")
    if not p.nodes:
        raise PlanError(f"{where}: no nodes")
    if len({n.node_id for n in p.nodes}) != len(p.nodes):
        raise PlanError(f"{where}: duplicate node ids")
    g = p.n_heads // p.n_kv_heads
    if not isinstance(p.block, int) or isinstance(p.block, bool) or p.block < BLOCK_ROWS or p.block % BLOCK_ROWS:
        raise PlanError(f"{where}: block must be a positive multiple of {BLOCK_ROWS}, got {p.block!r}")
    ends = {"kv_heads": 0, "q_heads": 0, "ffn_rows": 0, "vocab_rows": 0, "dim_rows": 0}
    for i, node in enumerate(p.nodes):
        if not isinstance(node, NodeSlice):
            raise PlanError(f"{where}: node {i} is a {type(node).__name__}, not a NodeSlice")
        at = f"{where}, node {i} ({node.node_id})"
        if node.index != i:
            raise PlanError(f"{at}: index is {node.index}")
        if node.threads < 1:
            raise PlanError(f"{at}: threads {node.threads} < 1")
        if node.head_dim != p.head_dim:
            raise PlanError(f"{at}: head_dim {node.head_dim}, the plan's is {p.head_dim}")
        for name in ("kv_heads", "q_heads", "ffn_rows", "vocab_rows", "dim_rows"):
            start, stop = _range(getattr(node, name), f"{at}: {name}")
            # a KV head may be shared with the previous node when both hold part of its group
            follows = start == ends[name] or (name == "kv_heads" and start == ends[name] - 1 and node.q_heads[0] % g)
            if not follows or stop <= start:
                raise PlanError(f"{at}: {name} [{start}, {stop}) does not follow [.., {ends[name]}) or is empty")
            align = p.block if name == "ffn_rows" else BLOCK_ROWS
            if name not in ("kv_heads", "q_heads") and start % align:
                raise PlanError(f"{at}: {name} start {start} is not a multiple of {align}")
            ends[name] = stop
        q0, q1 = node.q_heads
        if p.exchange == "q8" and (q0 * p.head_dim) % p.block:  # attn_output cut by columns at q0 * head_dim
            raise PlanError(f"{at}: q_heads start {q0} cuts attn_output's columns at {q0 * p.head_dim}, not a "
                            f"multiple of the block {p.block} (use the exact exchange)")
        whole = q0 % g == 0 and q1 % g == 0
        if node.kv_heads != (q0 // g, -(-q1 // g)) or not (whole or q0 // g == (q1 - 1) // g):
            raise PlanError(f"{at}: q_heads {node.q_heads} are neither kv_heads {node.kv_heads} x group {g} "
                            "nor part of one KV head's group")
    for field, total in (("kv_heads", p.n_kv_heads), ("q_heads", p.n_heads), ("ffn_rows", p.ffn_dim),
                         ("vocab_rows", p.vocab_size), ("dim_rows", p.dim)):
        if ends[field] != total:
            raise PlanError(f"{where}: {field} end at {ends[field]}, expected {total}")


def check_plan_fits(p: Plan, config: ModelConfig, model: str | None = None) -> None:
    """Raises PlanError unless the plan was made for this model's shape (and fingerprint)."""
    want = (config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim, config.vocab_size, config.dim)
    have = (p.n_heads, p.n_kv_heads, p.head_dim, p.ffn_dim, p.vocab_size, p.dim)
    if want != have:
        raise PlanError(f"plan of epoch {p.epoch} is for (heads, kv, hd, ffn, vocab, dim) {have}, the model is {want}")
    expected = model if model is not None else model_fingerprint(config)
    if p.model != expected:
        raise PlanError(f"plan of epoch {p.epoch} is for model {p.model}, this one is {expected}")


def _check_config(config: ModelConfig) -> None:
    if config.n_kv_heads < 1 or config.n_heads % config.n_kv_heads:
        raise PlanError(f"{config.n_heads} heads cannot be grouped over {config.n_kv_heads} KV heads")


def _choose(peers: Sequence[Peer], n: int) -> list[Peer]:
    """The root, then the n - 1 other peers of highest capacity (ties: node id)."""
    others = sorted(peers[1:], key=lambda p: (-p.capacity, p.node_id))
    return [peers[0], *others[: n - 1]]


def _block_split(total: int, weights: Sequence[Fraction], what: str, block: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    """[0, total) in len(weights) ranges starting on multiples of block (the last may be partial)."""
    units = -(-total // block)
    if units < len(weights):
        raise PlanError(f"{total} {what} cannot give {len(weights)} nodes a block of {block} each")
    out, start = [], 0
    for share in apportion(units, weights):
        stop = min(start + share * block, total)
        out.append((start, stop))
        start = stop
    return out


def _range(r: object, what: str) -> tuple[int, int]:
    if not (isinstance(r, tuple) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
        raise PlanError(f"{what} must be a pair of ints, got {r!r}")
    return r  # type: ignore[return-value]


# --- speed: weights from the nodes' measured compute rates (issue 19) ------------------------------------

RATE_TOLERANCE = 0.25  # a node's share of the cluster's speed must move by more than this to re-plan


def node_work(p: Plan, index: int, n_layers: int) -> int:
    """Weights (parameters) node `index` multiplies per token: its rows of every layer's matrices (attn_output
    and ffn_down by dim_rows in the exact exchange, by its columns in q8) and of the output projection."""
    n = p.nodes[index]
    span = lambda r: r[1] - r[0]  # noqa: E731
    attn = (span(n.q_rows) + 2 * span(n.kv_rows)) * p.dim
    ffn = 2 * span(n.ffn_rows) * p.dim
    if p.exchange == "exact":
        out = span(n.dim_rows) * (p.n_heads * p.head_dim + p.ffn_dim)
    else:
        out = p.dim * (span(n.q_rows) + span(n.ffn_rows))
    return n_layers * (attn + ffn + out) + span(n.vocab_rows) * p.dim


def node_share(p: Plan, index: int, n_layers: int) -> float:
    """Node `index`'s part of the whole model's per-token weights (K/V replicated over nodes counts on
    each): its compute time / this share = the time it would take for the whole model, so measured rates
    of nodes holding different shares compare (session/rates.py)."""
    whole = n_layers * p.dim * (2 * p.n_heads * p.head_dim + 2 * p.n_kv_heads * p.head_dim + 3 * p.ffn_dim)
    return node_work(p, index, n_layers) / (whole + p.vocab_size * p.dim)


def with_rates(peers: Sequence[Peer], rates: Sequence[float]) -> list[Peer]:
    """The peers with capacity = their measured rate (whole-model tokens/s), when every one has one (> 0);
    else as they are (capacities of different units never mix in one plan)."""
    if len(rates) != len(peers) or not all(math.isfinite(r) and r > 0 for r in rates):
        return list(peers)
    return [Peer(p.node_id, p.address, p.threads, float(r)) for p, r in zip(peers, rates)]


def steady_rates(previous: dict[str, float], new: dict[str, float],
                 tolerance: float = RATE_TOLERANCE) -> dict[str, float]:
    """The weights to plan `new`'s nodes with: the previous plan's weights of those nodes while their shares
    have not moved by more than `tolerance` (rates_moved), else `new`. A plan made again (the next request,
    a re-plan after a lost node) then cuts the same slices, so the workers' slice caches and the compiled
    programs serve it instead of a push and a compile for every few percent of measurement noise."""
    kept = {k: previous.get(k, 0.0) for k in new}
    if new and all(v > 0 for v in kept.values()) and not rates_moved(kept, new, tolerance):
        return kept
    return new


def rates_moved(old: dict[str, float], new: dict[str, float], tolerance: float = RATE_TOLERANCE) -> bool:
    """Whether a plan made with weights `old` (node id -> its rate, or its capacity when not every node was
    measured: only the shares count, not the units) should be made again with the rates `new`: every node
    of old is measured now, and some node's share of the total moved by more than `tolerance` (relative;
    a weight of 0, never measured, always has). Hysteresis: noise within it keeps the plan."""
    if not old or not all(new.get(k, 0.0) > 0 for k in old):
        return False
    if not all(v > 0 for v in old.values()):
        return True
    total_old, total_new = sum(old.values()), sum(new[k] for k in old)
    return any(abs((new[k] / total_new) / (v / total_old) - 1) > tolerance for k, v in old.items())
