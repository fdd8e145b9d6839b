"""Tensor parallelism, compute side: a node's weight slices and the engine that runs its share.

    tensors = node_tensors(model, plan, i)        # root: what node i holds (slices of the GGUF)
    node = TPNode(config, plan, i, tensors, peers, ctx, threads)
    logits = node.forward(tokens, start_pos)     # on every node, same arguments; node 0 gets the logits

Q/K/V are split by KV-head group (or, with more nodes than KV heads, by query heads, each node computing
the K/V head its query heads read), gate/up by FFN rows, the output projection by vocabulary rows; the
norms are whole on every node. The token embedding is cut by the same vocabulary rows: a node looks up
the tokens it owns and the nodes swap those rows once per step (tp_program._TPForward.embed), so no node
holds the whole table (Gemma 3's is 178 MB of Q8_0), and a tied output projection is that same slice.
attn_output and ffn_down depend on the plan's exchange (jit/tp_program.py): by model-dimension rows for
"exact" (the cluster's logits are bit-identical to the single-node JIT engine's), by the node's heads
and FFN rows as columns for "q8" (Megatron partial sums in Q8_0: fewer bytes and exchanges, logits
within quantization noise of one node's).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from .diskcache import evict, touch
from .engine import BatchRow
from .formats import GGUFModel, ModelConfig, QType
from .formats.cuts import PIECE_BYTES, Cut
from .formats.quant import TRAITS
from .jit.compiler import DEFAULT_CACHE_DIR, sources_digest
from .jit.engine import JITEngine, _kernel_type
from .jit.family import LAYER_EXTRAS, arranged_rows, layer_extras
from .jit.layout import CANDIDATE, aligned_zeros
from .jit.program import LAYER_MATRICES, ProgramSpec
from .jit.specs import QUANT_WEIGHTS
from .jit.tp_partition import RS_MIN_NODES, Partition, TPSlots, bytes_per_step, top_of, tp_buffer_sizes
from .jit.tp_program import MAX_TOP, RECV_SPINS, build_tp_program
from .jit.tp_seal import AUTH_FAILED, KEY_BYTES, TAG
from .jit.weights import LAYOUT_VERSION, PackedModel, cached, execution_order, pack, pack_into
from .scheduler import BLOCK_ROWS, Plan

TP_CACHE_BYTES = 4096 << 20  # default budget of a cache dir's packed slice sets (tp-*.bin): DaemonConfig.cache_mb


class PeerLost(Exception):
    """A peer's connection failed (closed, reset or timed out) during a step."""

    def __init__(self, node: int, reason: str):
        super().__init__(f"node {node}: {reason}")
        self.node = node


class ExchangeAuthFailed(PeerLost):
    """A sealed exchange message from a peer failed to open: altered in flight, or sealed under another key."""


def sodium_aead() -> tuple[int, int]:
    """Addresses of libsodium's ChaCha20-Poly1305 (IETF) encrypt and decrypt, from the copy PyNaCl bundles,
    for the compiled exchange to call (tp_program: the sealed exchange)."""
    import nacl.bindings  # noqa: F401  (runs sodium_init)
    from nacl._sodium import ffi, lib

    return tuple(int(ffi.cast("uintptr_t", ffi.addressof(lib, f"crypto_aead_chacha20poly1305_ietf_{op}")))
                 for op in ("encrypt", "decrypt"))


@dataclass(frozen=True)
class NodeTensor:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # of the slice
    data: np.ndarray  # ggml storage of the slice: u8[rows, row_bytes] for block types, f32/f16/u16 otherwise
    sha256: str

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def pieces(self, limit: int = PIECE_BYTES) -> Iterator[np.ndarray]:
        """The storage's bytes in order, u8[n] pieces of at most `limit` bytes (as CutTensor.pieces)."""
        flat = np.ascontiguousarray(self.data).reshape(-1).view(np.uint8)
        for offset in range(0, max(1, len(flat)), limit):
            yield flat[offset:offset + limit]


@dataclass(frozen=True)
class CutTensor:
    """A node's slice as a recipe (formats.cuts.Cut) with NodeTensor's fields: its storage is cut from the
    model's memory map when asked for (`data`: all of it, a view or a fresh copy each time; `pieces`: piece
    by piece, the map's pages released behind), so what a root remembers of a plan's slices (their hashes:
    session/slices.PlanSlices) holds no weights, and it pushes a worker's slices without holding them."""

    name: str
    qtype: QType
    shape: tuple[int, ...]  # of the slice
    cut: Cut
    sha256: str

    @property
    def data(self) -> np.ndarray:
        return self.cut.array()

    @property
    def nbytes(self) -> int:
        return self.cut.nbytes

    def pieces(self, limit: int = PIECE_BYTES) -> Iterator[np.ndarray]:
        return self.cut.pieces(limit)


def partition_of(plan: Plan, index: int) -> Partition:
    nodes = plan.nodes
    return Partition(index, tuple(n.kv_heads for n in nodes), tuple(n.ffn_rows for n in nodes),
                     tuple(n.dim_rows for n in nodes), tuple(n.vocab_rows for n in nodes), plan.exchange,
                     tuple(n.q_heads for n in nodes))


def slice_ranges(config: ModelConfig, part: Partition) -> dict[str, tuple[str, tuple[int, int]]]:
    """What node part.index holds of each layer matrix (and the output projection): ("rows" or
    "columns", (start, stop)). attn_output and ffn_down are cut by rows in the exact exchange, by
    columns (the node's heads, its FFN rows: Megatron) in the q8 exchange."""
    c, me = config, part.index
    kv0, kv1 = part.kv_heads[me]
    g, hd = c.group_size, c.head_dim
    h0, h1 = part.q_of(me, g)
    q_rows = (h0 * hd, h1 * hd)
    megatron = part.exchange == "q8"
    return {
        "attn_q": ("rows", q_rows),
        "attn_k": ("rows", (kv0 * hd, kv1 * hd)),
        "attn_v": ("rows", (kv0 * hd, kv1 * hd)),
        "attn_output": ("columns", q_rows) if megatron else ("rows", part.dim_rows[me]),
        "ffn_gate": ("rows", part.ffn_rows[me]),
        "ffn_up": ("rows", part.ffn_rows[me]),
        "ffn_down": ("columns", part.ffn_rows[me]) if megatron else ("rows", part.dim_rows[me]),
        "output": ("rows", part.vocab_rows[me]),
    }


def split_block(model: GGUFModel) -> int:
    """The `block` a plan for this model needs (scheduler.plan): the largest block, in values, of the
    tensors a plan may cut by columns (attn_output, ffn_down: the q8 exchange), at least BLOCK_ROWS.
    256 for K-quants (a super-block's scales cover all 256 values, so a cut must not fall inside it)."""
    sizes = [TRAITS[model.tensor(f"blk.{i}.{n}.weight").qtype].block_values
             for i in range(model.config.n_layers) for n in ("attn_output", "ffn_down")]
    return max([BLOCK_ROWS, *sizes])


def node_tensors(model: GGUFModel, plan: Plan, index: int, layers: tuple[int, int] | None = None,
                 embed: bool = True, output: bool = True) -> dict[str, CutTensor]:
    """What node `index` of `plan` holds: row slices, column slices, Q/K rows of NEOX models in the order the
    programs read them (family.arranged_rows), as CutTensors with their sha256 (hashed piece by piece from
    the memory map, its pages released behind). The layers' extra vectors (family.LAYER_EXTRAS): biases cut
    like their matrix's rows, q/k and post norms whole. A pipeline stage's node (pipeline.py) holds only
    `layers` [l0, l1), the embedding's rows if it looks tokens up, the final norm and output projection
    (a tied one: the embedding's rows) if it makes the logits."""
    c = model.config
    part = partition_of(plan, index)
    cuts = slice_ranges(c, part)
    out: dict[str, CutTensor] = {}

    def add(name: str, source: str, how: tuple[str, tuple[int, int]] | None) -> None:
        t = model.tensor(source)
        cut = Cut.whole(t)
        order = arranged_rows(source, t.shape[0], c)
        if order is not None:
            cut = cut.ordered(order)
        if how is not None:
            cut = cut.row_range(*how[1]) if how[0] == "rows" else cut.column_range(*how[1])
        out[name] = CutTensor(name, t.qtype, cut.shape, cut, cut.sha256())

    if embed or (output and c.tied_output):  # its vocabulary rows: embedding and tied output
        add("token_embd.weight", "token_embd.weight", cuts["output"])
    if output:
        add("output_norm.weight", "output_norm.weight", None)
    if output and not c.tied_output:
        add("output.weight", "output.weight", cuts["output"])
    for i in range(*(layers or (0, c.n_layers))):
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", f"blk.{i}.{norm}.weight", None)
        for name in LAYER_MATRICES:
            t = model.tensor(f"blk.{i}.{name}.weight")
            if t.qtype not in QUANT_WEIGHTS:
                raise ValueError(f"tensor parallelism needs block-quantized layer weights; {t.name} is {t.qtype.name}")
            add(f"blk.{i}.{name}.weight", f"blk.{i}.{name}.weight", cuts[name])
        for slot in layer_extras(c):
            name = f"blk.{i}.{LAYER_EXTRAS[slot]}"
            matrix = {"q_bias": "attn_q", "k_bias": "attn_k", "v_bias": "attn_v"}.get(slot)
            add(name, name, cuts[matrix] if matrix else None)
    return out


def _load_node_weights(config: ModelConfig, tensors: Mapping[str, NodeTensor],
                       cache_dir: os.PathLike | str | None, budget: int = TP_CACHE_BYTES) -> PackedModel:
    """The node's packed weights, from the weight cache (keyed by every slice's name and sha256, so the
    same slices map the same file, ~ms, instead of being packed again, ~0.5 s per 50 MB). The file's own
    sha256 is checked at every open (weights.cached): a damaged one is packed afresh. The tp-*.bin files
    beside it stay within `budget` bytes, the least recently used going first."""
    def packed() -> PackedModel:
        tied = config.tied_output
        order = [n for n in execution_order(config, output=not tied) if n in tensors]  # a stage's: its layers
        return pack(order, tensors.__getitem__, "token_embd.weight" if tied else "output.weight")

    if cache_dir is None:
        return packed()
    ident = "|".join(f"{n}={t.sha256}" for n, t in sorted(tensors.items())) + f"|{LAYOUT_VERSION}|{sources_digest()}"
    path = Path(cache_dir).expanduser() / "weights" / f"tp-{hashlib.sha256(ident.encode()).hexdigest()[:32]}.bin"
    tied = config.tied_output
    order = [n for n in execution_order(config, output=not tied) if n in tensors]
    weights = cached(path, set(tensors), packed,
                     lambda p: pack_into(p, order, tensors.__getitem__, "token_embd.weight" if tied else "output.weight"))
    touch(path)
    evict(path.parent.glob("tp-*.bin"), budget, keep=[path])  # a file still mapped elsewhere stays readable
    return weights


PEER_TIMEOUT_S = 30.0


def prepare_peer_socket(sock: socket.socket, timeout: float = PEER_TIMEOUT_S) -> None:
    """What the native exchange needs of a peer socket: blocking at the fd level (Python's own timeouts
    make the fd non-blocking, which the compiled code would see as a failure), a kernel-level send and
    receive timeout so a dead peer fails the step instead of hanging it, no Nagle delay, big buffers."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def sealed_bytes(spec: ProgramSpec, part: Partition) -> int:
    """The sealed exchange's `sealed` buffer (tp_seal): the largest message plus its tag. Every message is a
    part of one exchange buffer (or of `logits`, vocab_size f32, no larger than `logits_full`)."""
    return max(tp_buffer_sizes(spec, part).values()) + TAG


def messages_per_step(spec: ProgramSpec, part: Partition, n: int = 1, n_out: int = 1) -> tuple[int, int]:
    """(sent, received) exchange messages of this node for one forward of n tokens (each sealed one carries
    TAG more bytes): per chunk, the embedding swap and the layers' exchanges; per wanted row (n_out), the
    logits to node 0."""
    peers, me = part.n_nodes - 1, part.index
    if not peers:
        return 0, 0
    chunks = -(-n // spec.max_chunk)
    if part.exchange == "q8":
        rounds = 2 * (2 if part.n_nodes >= RS_MIN_NODES else 1)  # 2 all-reduces, each 1 or 2 swaps
    else:
        rounds = 4  # four all-gathers
    per = (1 + spec.config.n_layers * rounds) * peers
    return chunks * per + (n_out if me else 0), chunks * per + (0 if me else n_out * peers)


class TPNode(JITEngine):
    """One node's engine. peers[j]: a connected blocking socket to node j (None at this node's index)."""

    slots_class = TPSlots
    talks_to_peers = True

    def __init__(self, config: ModelConfig, plan: Plan, index: int, tensors: Mapping[str, NodeTensor],
                 peers: Sequence[socket.socket | None], ctx: int, threads: int | None = None, *,
                 cache_dir: os.PathLike | str | None = DEFAULT_CACHE_DIR, max_chunk: int = 64, max_seqs: int = 1,
                 timeout: float = PEER_TIMEOUT_S, recv_spins: int = RECV_SPINS, cache_budget: int = TP_CACHE_BYTES,
                 exchange_keys: Sequence[tuple[bytes, bytes] | None] | None = None, dynamic: bool = True,
                 mem_limit: int | None = None):
        """exchange_keys[j]: (send key, receive key) for peer j (None at this node's index), 32 bytes each,
        the mirror image of peer j's: every exchange message is sealed (tp_program). None: plain exchange.
        mem_limit: the node's memory budget in bytes; a share beyond it streams (jit/ir_stream.py)."""
        t0 = time.perf_counter()
        self.mem_limit = mem_limit
        self.part = part = partition_of(plan, index)
        if len(peers) != self._n_links(part) or peers[index] is not None or None in peers[part.n_nodes:]:
            raise ValueError(f"need one socket per other node of the plan ({part.n_nodes - 1}), None at {index}")
        self.index, self.plan, self.max_seqs = index, plan, max_seqs
        self.n_kv_local = part.kv_heads[index][1] - part.kv_heads[index][0]
        self._peers = list(peers)
        self._keys = None if exchange_keys is None else list(exchange_keys)
        if self._keys is not None and (
                len(self._keys) != len(peers)
                or any((k is None) != (j == index) for j, k in enumerate(self._keys))
                or any(len(x) != KEY_BYTES for k in self._keys if k is not None for x in k)):
            raise ValueError(f"need a (send, receive) pair of {KEY_BYTES}-byte keys per other node, None at {index}")
        for sock in self._peers:
            if sock is not None:
                prepare_peer_socket(sock, timeout)
        self._dynamic = dynamic  # chunks taken dynamically by the threads (ir_share.py); False: static split
        spec = self._spec(config, tensors, max_chunk)
        packed = _load_node_weights(config, tensors, cache_dir, cache_budget)
        self._start(config, ctx, threads, spec, packed, cache_dir, t0)
        self._table[self._slots["recv_spins"]] = recv_spins
        if self.sealed:
            self._table[self._slots["seal_fn"]], self._table[self._slots["open_fn"]] = sodium_aead()
        self.stats: dict[str, float] = {}
        self._top = 0

    def _n_links(self, part: Partition) -> int:
        """Sockets this node's program addresses: one per node of the plan (a pipeline stage's: more)."""
        return part.n_nodes

    def _spec(self, config: ModelConfig, tensors: Mapping[str, NodeTensor], max_chunk: int) -> ProgramSpec:
        layer_types = tuple(tuple(_kernel_type(tensors[f"blk.{i}.{n}.weight"].qtype) for n in LAYER_MATRICES)
                            for i in range(config.n_layers))
        # the node's vocabulary rows of the embedding; of the output projection too when tied
        out_name = "token_embd.weight" if config.tied_output else "output.weight"
        return ProgramSpec(config, layer_types, _kernel_type(tensors["token_embd.weight"].qtype),
                           _kernel_type(tensors[out_name].qtype), max_chunk, dynamic=self._dynamic)

    @property
    def sealed(self) -> bool:
        return self._keys is not None

    def _program_key(self) -> str:
        # the table's layout too: a program compiled for other slot indices (another version) must not load
        layout = ",".join(TPSlots.SCALARS + TPSlots.BUFFERS)
        return repr(self.part) + f"|{layout}" + ("|sealed chacha20poly1305" if self.sealed else "")

    def _build_program(self, module) -> None:
        build_tp_program(module, self.spec, self.part, self.sealed)

    def _extra_buffers(self) -> dict[str, np.ndarray]:
        sizes = tp_buffer_sizes(self.spec, self.part)
        out_rows = min(self.spec.max_chunk, self.max_seqs)  # logits of a step's wanted rows, one a sequence
        sizes = {**sizes, "logits_full": out_rows * sizes["logits_full"], "cands": out_rows * sizes["cands"]}
        bufs = {name: aligned_zeros(n, np.uint8) for name, n in sizes.items()}
        fds = aligned_zeros(max(1, len(self._peers)), np.int64)
        for j, sock in enumerate(self._peers):
            fds[j] = -1 if sock is None else sock.fileno()
        bufs["fds"] = fds
        n = max(1, len(self._peers))
        keys = aligned_zeros(n * 2 * KEY_BYTES if self.sealed else 8, np.uint8)  # peer j: send key | receive key
        for j, pair in enumerate(self._keys or ()):
            if pair is not None:
                keys[j * 64:(j + 1) * 64] = np.frombuffer(pair[0] + pair[1], np.uint8)
        bufs["xkeys"] = keys
        bufs["xcount"] = aligned_zeros(2 * n, np.int64)  # messages sealed to / opened from peer j so far
        bufs["xnonce"] = aligned_zeros(16, np.uint8)
        bufs["sealed"] = aligned_zeros(self._sealed_bytes() if self.sealed else 8, np.uint8)
        return bufs

    def _sealed_bytes(self) -> int:
        return sealed_bytes(self.spec, self.part)

    max_top = MAX_TOP  # forward(..., top=K): see forward

    def forward(self, tokens: Sequence[int], start_pos: int, top: int = 0) -> np.ndarray | None:
        """Every node calls it with the same arguments; node 0 gets the logits of the last token. With
        top = K > 0 the other nodes send only their K best logits (tp_program.logits): node 0's own
        vocabulary rows are exact, the rest -inf but those, so greedy and top-k (k <= K) sampling read the
        same candidates, values and order as from all logits. Prompt chunks before the last send none."""
        result = self._measured(lambda: JITEngine.forward(self, tokens, start_pos), len(tokens), 1, top)
        return result if self.gets_logits else None

    def forward_batch(self, rows: Sequence[BatchRow], top: int = 0) -> np.ndarray | None:
        """The BatchEngine protocol on every node with the same rows: node 0 gets f32[len(rows), vocab] (with
        top = K: each row's as forward's), the others None."""
        result = self._measured(lambda: JITEngine.forward_batch(self, rows), sum(len(r.tokens) for r in rows),
                                len(rows), top)
        return result if self.gets_logits else None

    @property
    def gets_logits(self) -> bool:
        """Whether forward returns logits here: node 0 of the plan (the root)."""
        return self.index == 0

    def _measured(self, run, n: int, n_out: int, top: int) -> np.ndarray:
        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"top must be 0 (all logits) .. {MAX_TOP}, not {top}")
        t = self._table
        t[self._slots["sync_ns"]] = 0
        self._top = top
        t0 = time.perf_counter()
        result = run()
        total = time.perf_counter() - t0
        sync = t[self._slots["sync_ns"]] / 1e9
        sent, received = bytes_per_step(self.spec, self.part, n, top, n_out)
        if self.sealed:  # a tag per message
            m_sent, m_received = messages_per_step(self.spec, self.part, n, n_out)
            sent, received = sent + TAG * m_sent, received + TAG * m_received
        self.stats = {"step_ms": total * 1e3, "sync_ms": sync * 1e3, "compute_ms": (total - sync) * 1e3,
                      "bytes_sent": sent, "bytes_received": received, "tokens": n}
        return result

    def _before_step(self, last: bool) -> None:
        self._table[self._slots["top"]] = self._top

    def _after_step(self) -> None:
        err = int(self._table[self._slots["error"]])
        if err:
            self._table[self._slots["error"]] = 0
            if err > AUTH_FAILED:
                raise ExchangeAuthFailed(err - AUTH_FAILED - 1, "activation exchange authentication failed "
                                         "(a message altered in flight, or sealed under another key)")
            raise PeerLost(err - 1, "connection closed, reset or timed out during a step")

    def _result(self, n_out: int) -> np.ndarray | None:
        """f32[n_out, vocab] on node 0 (the step's wanted rows' logits), None on the others."""
        if not self.gets_logits:
            return None
        full = self._bufs["logits_full"].view(np.float32).reshape(-1, self.config.vocab_size)[:n_out]
        if not self._top:
            return full
        part = self.part
        cands = self._bufs["cands"].view(CANDIDATE).reshape(-1, part.n_nodes, MAX_TOP)
        out = np.full((n_out, self.config.vocab_size), -np.inf, np.float32)
        v0, v1 = part.vocab_rows[0]
        out[:, v0:v1] = full[:, v0:v1]
        for k in range(n_out):
            for j in range(1, part.n_nodes):
                best = cands[k, j, : top_of(part, j, self._top)]
                out[k, best["index"]] = best["value"]
        return out
