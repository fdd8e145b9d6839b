"""Pure cost model: (model shape, device and link figures, candidate plan) -> predicted ms per token.

A decode step reads every weight once, so a node's compute is the bytes of its share over its
effective rate on its own kernels (GB/s of weights per token), plus a fixed cost per layer it runs
(norms, attention, barriers: what does not shrink with its share) and per token. Exchanges cost a
one-way latency each (half the measured round trip) plus the bytes through the busiest port over
the link's bandwidth, times a crowding factor when several peers send through one port at once
(a small switch's buffers: 1 + crowding * fan_in^2; 0 on a switch that keeps up). A node whose share
is over its memory budget streams the rest from disk every token, overlapped with what the other
stages compute. Nothing here measures or does I/O; figures come in as frozen dataclasses.

Plans (Candidate): stages run one after another, each a tensor-parallel group of nodes over a
contiguous layer range. kind "tp" is one stage of k nodes, "pipeline" k stages of one node,
"hybrid" stages of groups. Exchanges inside a group:

    exact   dllp2p's row split: 4 all-gathers a layer (q8 activations, f32 projection outputs)
    q8      dllp2p's Megatron split: 2 all-reduces a layer of Q8_0 partial sums; from 3 nodes each is a
            reduce-scatter and an all-gather (4 messages a layer, 2 (k - 1) / k of a row each)
    star    distributed-llama as its paper measured it (seed 002): the root broadcasts the 3 dim-wide
            inputs and the FFN input to every worker and gathers the q/k/v, attention-output and FFN
            outputs, 4 syncs a layer, every byte through the root's port (this formula reproduces the
            paper's Figure 6 kB per token to 0.1 %). For calibration only: dllp2p does not run it.

Every byte count here is a formula of the shape; tests/test_costmodel.py holds the exact and q8 ones
to the compiled program's own count (jit/tp_partition.bytes_per_step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from .formats import ModelConfig

Q8_BYTES = 34 / 32  # ggml Q8_0: 32 int8 values and an f16 scale
ACT_BYTES = 40 / 32  # dllp2p's Q8S activation rows: 32 int8 values, an f32 scale and an f32 sum (jit/layout.py)
KINDS = ("tp", "pipeline", "hybrid")
EXCHANGES = ("exact", "q8", "star")


class CostModelError(ValueError):
    """Figures or a candidate that the model cannot price (a bad value, an empty stage)."""


@dataclass(frozen=True)
class ModelShape:
    """What a token's cost depends on. Bytes are of the quantized weights as stored."""

    dim: int
    ffn_dim: int
    n_layers: int
    q_dim: int  # n_heads * head_dim
    kv_dim: int  # n_kv_heads * head_dim
    vocab_size: int
    layer_bytes: float  # weight bytes of one layer's matrices (q, k, v, o, gate, up, down)
    output_bytes: float  # weight bytes of the output projection (vocab x dim)
    max_nodes: int = 1 << 30  # how many tensor-parallel nodes the heads allow (scheduler.allowed_nodes)

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "n_layers", "q_dim", "kv_dim", "vocab_size", "max_nodes"):
            if getattr(self, name) < 1:
                raise CostModelError(f"model shape: {name} must be >= 1")

    @property
    def weight_bytes(self) -> float:
        return self.n_layers * self.layer_bytes + self.output_bytes

    @classmethod
    def uniform(cls, config: ModelConfig, bytes_per_weight: float, **kw: int) -> ModelShape:
        """A shape whose every matrix has the same bytes per weight (e.g. 18/32 for Q4_0)."""
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        per_layer = config.dim * (2 * q + 2 * kv) + 3 * config.dim * config.ffn_dim
        return cls(config.dim, config.ffn_dim, config.n_layers, q, kv, config.vocab_size,
                   per_layer * bytes_per_weight, config.vocab_size * config.dim * bytes_per_weight, **kw)


@dataclass(frozen=True)
class DeviceFigures:
    """One node, as measured (or typed in from a paper)."""

    gbps: float  # effective GB/s (1e9 B/s) of weights per token on its kernels
    layer_ms: float = 0.0  # fixed cost per layer it runs, whatever its share
    token_ms: float = 0.0  # fixed cost per token
    ram_bytes: float = math.inf  # memory budget for weights (--mem-limit or what is available)
    disk_gbps: float = 0.5  # read speed of its slice cache
    # CPU wait per exchange: how long, on average, the node was ready to run but waited for a CPU that another
    # program holds, per exchange of its decode steps (session/rates.py; 0: quiet or not measured)
    wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (self.gbps > 0 and self.disk_gbps > 0 and self.ram_bytes > 0):
            raise CostModelError(f"device figures must be > 0: {self}")
        if self.layer_ms < 0 or self.token_ms < 0 or not 0 <= self.wait_ms < math.inf:
            raise CostModelError(f"fixed costs and waits must be finite and >= 0: {self}")


@dataclass(frozen=True)
class LinkFigures:
    """A node's port on the LAN, as the root measured it (round trip and a timed chunk)."""

    rtt_ms: float  # round trip of a small frame
    mbps: float  # MB/s (1e6 B/s) of payload
    crowding: float = 0.0  # extra time per byte is crowding * fan_in^2 when fan_in peers send at once

    def __post_init__(self) -> None:
        if not (self.rtt_ms >= 0 and self.mbps > 0 and self.crowding >= 0):
            raise CostModelError(f"link figures out of range: {self}")

    def seconds(self, nbytes: float, fan_in: int) -> float:
        """Time (ms) to move nbytes through this port while fan_in peers share it."""
        return nbytes / (self.mbps * 1e3) * (1 + self.crowding * fan_in * fan_in)


def slowest(links: Sequence[LinkFigures]) -> LinkFigures:
    """A group's exchange runs at its slowest port (a LAN switch: each node's port is its link)."""
    return LinkFigures(max(x.rtt_ms for x in links), min(x.mbps for x in links), max(x.crowding for x in links))


@dataclass(frozen=True)
class Candidate:
    """Stages in order; stage i is nodes stages[i] (indices into the cluster's figures) over layers[i]."""

    kind: str
    stages: tuple[tuple[int, ...], ...]
    layers: tuple[int, ...]
    exchange: str = "exact"

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.exchange not in EXCHANGES:
            raise CostModelError(f"unknown kind or exchange: {self.kind!r}, {self.exchange!r}")
        if not self.stages or len(self.stages) != len(self.layers) or any(not s for s in self.stages):
            raise CostModelError(f"candidate needs one non-empty node group per layer range: {self}")
        flat = [i for s in self.stages for i in s]
        if len(set(flat)) != len(flat) or min(flat) < 0 or any(n < 1 for n in self.layers):
            raise CostModelError(f"candidate repeats a node or has an empty layer range: {self}")

    @property
    def n_nodes(self) -> int:
        return sum(len(s) for s in self.stages)

    @property
    def label(self) -> str:
        groups = "+".join(str(len(s)) for s in self.stages)
        return f"{self.kind} {groups} {self.exchange}" if self.kind != "pipeline" else f"pipeline {groups}"


@dataclass(frozen=True)
class Prediction:
    """ms per token and where it goes. total_ms is inf when a node cannot hold its share."""

    candidate: Candidate
    compute_ms: float  # the stages' compute, one after another (each its slowest node's)
    latency_ms: float  # exchanges x (one-way latency + the CPU wait of the group's busiest node), hops included
    transfer_ms: float  # bytes / bandwidth on the busiest port of each exchange, crowding included
    stream_ms: float  # disk reads that the other stages' work does not hide
    exchanges: int  # messages in sequence per token
    port_bytes: float  # bytes through the busiest port per token
    feasible: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def total_ms(self) -> float:
        if not self.feasible:
            return math.inf
        return self.compute_ms + self.latency_ms + self.transfer_ms + self.stream_ms

    @property
    def sync_ms(self) -> float:
        return self.latency_ms + self.transfer_ms


def group_exchange(shape: ModelShape, exchange: str, k: int, layers: int, last: bool) -> tuple[int, float]:
    """(messages in sequence, bytes through the busiest port) for a k-node group over `layers` layers.

    last: this group produces the logits (dllp2p: each node's embedding rows and best logits to the
    others once a token; a few bytes against the layers', counted as one more message)."""
    if k == 1:
        return 0, 0.0
    d, f = shape.dim, shape.ffn_dim
    share = (k - 1) / k
    if exchange == "star":  # root sends every worker its inputs, receives each worker's share of outputs
        out = (k - 1) * (3 * d + f) * Q8_BYTES
        inp = share * (shape.q_dim + 2 * shape.kv_dim + 2 * d) * Q8_BYTES
        return 4 * layers, layers * (out + inp)
    if exchange == "q8":
        if k < 3:  # each node's whole Q8_0 partial to its peer, twice a layer
            return 2 * layers + last, layers * 2 * d * Q8_BYTES + last * d * 4 * (k - 1)
        return 4 * layers + last, layers * 2 * 2 * share * d * Q8_BYTES + last * d * 4 * (k - 1)
    # exact: all-gathers of the Q8S attention input, f32 o-projection, Q8S FFN input, f32 down-projection
    per_layer = share * (shape.q_dim * ACT_BYTES + d * 4 + f * ACT_BYTES + d * 4)
    return 4 * layers + last, layers * per_layer + last * d * 4 * (k - 1)


def messages(exchange: str, k: int, layers: int, last: bool = True) -> int:
    """Messages in sequence per token of a k-node group over `layers` layers (group_exchange's count): the
    exchanges a node waits at in one decode step (session/rates.py divides its CPU wait by them)."""
    if k == 1:
        return 0
    if exchange == "star":
        return 4 * layers
    return (2 if exchange == "q8" and k < 3 else 4) * layers + last


def predict(shape: ModelShape, devices: Sequence[DeviceFigures], links: Sequence[LinkFigures],
            cand: Candidate) -> Prediction:
    """Predicted ms per token of `cand` on nodes with these figures (devices[i], links[i]: node i)."""
    if len(devices) != len(links):
        raise CostModelError("one device and one link figure per node")
    if sum(cand.layers) != shape.n_layers or max(i for s in cand.stages for i in s) >= len(devices):
        raise CostModelError(f"{cand.label}: layers must sum to {shape.n_layers}, nodes exist")
    notes: list[str] = []
    stage_ms, loads = [], []
    latency = transfer = port_bytes = 0.0
    exchanges = 0
    feasible = True
    for s, (group, nl) in enumerate(zip(cand.stages, cand.layers)):
        last = s == len(cand.stages) - 1
        k = len(group)
        if k > shape.max_nodes:
            feasible = False
            notes.append(f"stage {s}: the heads allow at most {shape.max_nodes} nodes")
        weights = nl * shape.layer_bytes + (shape.output_bytes if last else 0.0)
        rates = [devices[i].gbps for i in group]
        node_ms, node_load = [], []
        for i, rate in zip(group, rates):
            dev = devices[i]
            mine = weights * rate / sum(rates)  # shares in proportion to the rate ("weighted")
            node_ms.append(mine / (rate * 1e6) + nl * dev.layer_ms + dev.token_ms / len(cand.stages))
            over = max(0.0, mine - dev.ram_bytes)
            node_load.append(over / (dev.disk_gbps * 1e6))
            if over and over > mine / 2:
                notes.append(f"node {i}: streams {over / 1e9:.2f} of {mine / 1e9:.2f} GB a token")
        stage_ms.append(max(node_ms))
        loads.append(max(node_load))
        n_msg, nbytes = group_exchange(shape, cand.exchange, k, nl, last)
        link = slowest([links[i] for i in group])
        exchanges += n_msg
        # every exchange waits for the group's slowest waker: a node whose CPU another program holds stalls
        # each of them until it runs again, whatever its share (issue 19)
        wait = max(devices[i].wait_ms for i in group) if n_msg else 0.0
        latency += n_msg * (link.rtt_ms / 2 + wait)
        if wait:
            notes.append(f"stage {s}: CPU wait {n_msg * wait:.2f} ms a token ({wait * 1e3:.0f} us x {n_msg} exchanges)")
        transfer += link.seconds(nbytes, k - 1 if k > 1 else 0)
        port_bytes = max(port_bytes, nbytes)
        if s:  # the activation (f32, dim) passes from the previous stage
            ends = (cand.stages[s - 1][0], group[0])
            hop = slowest([links[i] for i in ends])
            exchanges += 1
            latency += hop.rtt_ms / 2 + max(devices[i].wait_ms for i in ends)
            transfer += hop.seconds(shape.dim * 4, 0)
    if len(cand.stages) > 1 and 0 not in cand.stages[-1]:  # the last stage's token back to the root
        exchanges += 1
        latency += links[cand.stages[-1][0]].rtt_ms / 2
    compute = sum(stage_ms)
    # a stage prefetches its next layers from disk while it and the other stages compute
    stream = sum(max(0.0, load - compute) for load in loads)
    return Prediction(cand, compute, latency, transfer, stream, exchanges, port_bytes, feasible, tuple(notes))


def split_layers(n_layers: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Contiguous layer counts in proportion to weights, each >= 1 (largest remainder)."""
    if len(weights) > n_layers:
        raise CostModelError(f"{len(weights)} stages for {n_layers} layers")
    total = sum(weights)
    exact = [n_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) < n_layers:
        i = max(range(len(counts)), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    return tuple(counts)


def with_budget(devices: Sequence[DeviceFigures], ram_bytes: float) -> tuple[DeviceFigures, ...]:
    """The same devices with one memory budget each (what --mem-limit sets)."""
    return tuple(replace(d, ram_bytes=ram_bytes) for d in devices)
