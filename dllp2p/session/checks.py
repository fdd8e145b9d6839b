"""What a worker checks of a root's Session before it allocates or dials anything: every value the peer
sends against what this node computes itself. Pure functions (the memory figure is read by the caller).

    check_config     the model config's sizes are sane (each under a hard bound) and the context fits a
                     local maximum and the memory this node actually has (KV cache + slices)
    expected_shape   the logical shape (numpy order) of a named slice, from the config and the plan's
                     ranges for this node; None for a name this check does not know (the fake engine's)
    check_shapes     every known slice of the Session has exactly that shape: a Session claiming a
                     4,194,304-token vocabulary with 512-row embedding slices is refused here, so the
                     compiled embedding lookup never indexes past its buffer (jit/tp_program.py)
    check_addresses  the nodes the worker will dial are on known members' hosts or the root's own host: a
                     plan cannot turn a worker into a port scanner of the LAN

Error handling: each raises SessionRefused (a ValueError) naming the value and the bound.
"""

from __future__ import annotations

import re

from ..formats import ModelConfig
from ..formats.quant import QType
from ..pipeline import PipelinePlan
from ..scheduler import NodeSlice, Plan
from ..wire.link import parse_address
from ..wire.messages import Session, SliceInfo

# hard bounds on a peer's model config: far above any model this project runs on home devices
MAX_DIM = 65_536
MAX_LAYERS = 1_024
MAX_HEADS = 1_024
MAX_HEAD_DIM = 1_024
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 22  # 4,194,304 ids: the int32 token ids of the compiled code stay far from overflowing
MAX_CTX = 1 << 20  # KV positions a worker allocates at most, whatever the memory
MEMORY_SHARE = 0.9  # of MemAvailable that one session's KV cache and slices may take


class SessionRefused(ValueError):
    """A Session this worker will not serve (its sizes, shapes or addresses)."""


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise SessionRefused(problem)


def kv_bytes(config: ModelConfig, node: NodeSlice, ctx: int, layers: int | None = None) -> int:
    """Bytes of the node's KV cache: K and V, f16[its kv heads, ctx, head_dim] per layer and sequence slot
    (jit/engine.py) of its `layers` (all of the model's, or its pipeline stage's)."""
    kv0, kv1 = node.kv_heads
    return 2 * (config.n_layers if layers is None else layers) * ctx * (kv1 - kv0) * config.head_dim * 2


def check_config(s: Session, index: int, mem_available: int | None, max_ctx: int = MAX_CTX) -> None:
    """The config's sizes are sane and the session fits this node's memory (mem_available bytes; None: unknown)."""
    c = s.config
    for name, value, bound in (("dim", c.dim, MAX_DIM), ("n_layers", c.n_layers, MAX_LAYERS),
                               ("n_heads", c.n_heads, MAX_HEADS), ("n_kv_heads", c.n_kv_heads, MAX_HEADS),
                               ("head_dim", c.head_dim, MAX_HEAD_DIM), ("ffn_dim", c.ffn_dim, MAX_FFN),
                               ("vocab_size", c.vocab_size, MAX_VOCAB)):
        _need(1 <= value <= bound, f"model config {name} {value} is not in 1..{bound}")
    _need(c.n_heads % c.n_kv_heads == 0, f"{c.n_heads} heads cannot be grouped over {c.n_kv_heads} KV heads")
    _need(s.ctx <= max_ctx, f"ctx {s.ctx} is over this node's maximum of {max_ctx} positions")
    if mem_available is not None:  # the KV the root's budget lets every slot hold together (default: all full)
        kv = kv_bytes(c, s.plan.nodes[index], s.kv_positions or s.ctx * s.max_seqs, _stage_layers(s, index))
        need = kv + sum(si.nbytes for si in s.slices)
        slots = "" if s.max_seqs == 1 else f" x {s.max_seqs} slots" if not s.kv_positions else \
            f" ({s.kv_positions} positions in {s.max_seqs} slots)"
        _need(need <= mem_available * MEMORY_SHARE,
              f"ctx {s.ctx}{slots} and {len(s.slices)} slices need {need / 2**20:.0f} MiB; this node has "
              f"{mem_available / 2**20:.0f} MiB available")


def _stage_layers(s: Session, index: int) -> int | None:
    """How many layers node `index` computes in a pipeline plan (None: a tensor-parallel plan's, all)."""
    if not isinstance(s.plan, PipelinePlan):
        return None
    if s.plan.n_layers != s.config.n_layers:
        raise SessionRefused(f"the plan is for {s.plan.n_layers} layers, the model has {s.config.n_layers}")
    l0, l1 = s.plan.stages[s.plan.locate(index)[0]].layers
    return l1 - l0


_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def expected_shape(name: str, config: ModelConfig, node: NodeSlice, exchange: str) -> tuple[int, ...] | None:
    """The logical shape of node's slice `name` (tp.node_tensors' cuts), or None for a name not known here."""
    c = config
    v0, v1 = node.vocab_rows
    if name in ("token_embd.weight", "output.weight"):
        return (v1 - v0, c.dim)
    if name == "output_norm.weight":
        return (c.dim,)
    m = _LAYER.fullmatch(name)
    if m is None:
        return None
    if int(m.group(1)) >= c.n_layers:
        raise SessionRefused(f"{name}: layer {m.group(1)} of a {c.n_layers}-layer model")
    q = node.q_rows[1] - node.q_rows[0]
    kv = node.kv_rows[1] - node.kv_rows[0]
    f = node.ffn_rows[1] - node.ffn_rows[0]
    d = node.dim_rows[1] - node.dim_rows[0]
    megatron = exchange == "q8"
    return {
        "attn_norm.weight": (c.dim,), "ffn_norm.weight": (c.dim,),
        "attn_q.weight": (q, c.dim), "attn_k.weight": (kv, c.dim), "attn_v.weight": (kv, c.dim),
        "attn_output.weight": (c.dim, q) if megatron else (d, c.n_heads * c.head_dim),
        "ffn_gate.weight": (f, c.dim), "ffn_up.weight": (f, c.dim),
        "ffn_down.weight": (c.dim, f) if megatron else (d, c.ffn_dim),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
        "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
        "post_attention_norm.weight": (c.dim,), "post_ffw_norm.weight": (c.dim,),
    }.get(m.group(2))


_FLOAT = (QType.F32, QType.F16, QType.BF16)


def check_shapes(s: Session, index: int) -> None:
    """Every slice the worker knows by name has the shape the plan and config give it; vectors are floats;
    a pipeline stage's node gets no layer outside its stage."""
    node = s.plan.nodes[index]
    stage = s.plan.stages[s.plan.locate(index)[0]].layers if isinstance(s.plan, PipelinePlan) else None
    for si in s.slices:
        m = _LAYER.fullmatch(si.tensor)
        _need(stage is None or m is None or stage[0] <= int(m.group(1)) < stage[1],
              f"{si.tensor}: not a layer of this node's stage [{stage and stage[0]}, {stage and stage[1]})")
        want = expected_shape(si.tensor, s.config, node, s.plan.exchange)
        if want is None:
            continue
        _need(si.shape == want, f"{si.tensor}: shape {list(si.shape)}, the plan and config give {list(want)}")
        _need(len(want) > 1 or QType(si.qtype) in _FLOAT, f"{si.tensor}: a vector of type {QType(si.qtype).name}")


def dialed_hosts(plan: Plan, index: int) -> set[str]:
    """The hosts of the nodes this worker dials (k > index). Raises SessionRefused (an address not HOST:PORT)."""
    out = set()
    for n in plan.nodes[index + 1:]:
        try:
            out.add(parse_address(n.address)[0])
        except ValueError:
            raise SessionRefused(f"node {n.node_id}'s address {n.address!r} is not HOST:PORT") from None
    return out


def check_addresses(plan: Plan, index: int, allowed: set[str], ips: dict[str, set[str]] | None = None) -> None:
    """The nodes this worker dials (k > index) are on allowed hosts (the root's, the cluster members'),
    named alike or resolving to one of their addresses (ips: host -> its addresses, for hosts named two ways)."""
    ips = ips or {}
    allowed_ips = set().union(*(ips.get(h, {h}) for h in allowed)) if allowed else set()
    for n in plan.nodes[index + 1:]:
        host = parse_address(n.address)[0]
        _need(host in allowed or bool(ips.get(host, {host}) & allowed_ips),
              f"node {n.node_id}'s address {n.address} is neither on a member of this cluster nor on the root's host")


def allowed_hosts(known: set[str], root_host: str) -> set[str]:
    """The root's host and those of the members' addresses (HOST:PORT each)."""
    out = {root_host}
    for a in known:
        try:
            out.add(parse_address(a)[0])
        except ValueError:
            pass
    return out


def slice_bytes(slices: tuple[SliceInfo, ...]) -> int:
    return sum(si.nbytes for si in slices)


def mem_available(meminfo: str) -> int | None:
    """MemAvailable of a /proc/meminfo text, in bytes (None when absent)."""
    m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    return int(m.group(1)) * 1024 if m else None
