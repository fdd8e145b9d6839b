"""A node's whole forward step as one compiled function: the IR of `forward(table, tid)`.

Every thread of the node runs the same `forward`: it embeds the chunk's tokens, then, per layer,

    private  h = rmsnorm(x_t); hq = quantize(h)             each thread keeps its own residual x_t
    split    q, k, v = Wq hq, Wk hq, Wv hq                  16-row groups shared out among threads
    barrier
    split    (+ biases; per-head q/k norms) rope(k), k, v -> row i's slot of the f16 KV cache at row_pos[i]; rope(q)   by chunk row
    barrier
    split    att[i, group] = attention(...)                 by (row, KV group) pair, which quantizes its
                                                            blocks of att into the shared aq; a decode
                                                            step (one row) splits by (span, group) pair,
    (barrier, merge by head: one row)                       then merges the spans' partials by head
    barrier
    (private aq = quantize(att): one row)
    split    o = Wo aq
    barrier
    private  x_t += o (or rmsnorm(o) * post norm); h = rmsnorm(x_t); hq = quantize(h)
    split    g, u = Wg hq, Wu hq; s = act(g) * u; sq = quantize(s)   a chunk of rows of g, u, s, sq by one thread
    barrier                                                 (decode: g, then u; barrier; private s)
    (private sq = quantize(s): one row, or static sharing)
    split    d = Wd sq
    barrier
    private  x_t += d (or rmsnorm(d) * post norm)

Model families (formats/arch.py) are the config's flat switches read while emitting: QKV biases, q/k
RMSNorm, post-sublayer norms, SiLU or GELU-tanh, an embedding scale, a score scale (applied to q), NEOX
RoPE (Q/K rows permuted at pack time: family.py), a second RoPE table and the window W of sliding layers
(a row at position p attends to [max(0, p - W + 1), p]).

A step's rows may belong to several sequences (continuous batching): row i sits at position row_pos[i] of the
KV slot at cache row row_kv[i] (head-major: kv_head) and attends to it only; the linear layers take all rows.

and finally, for the rows out_rows[k] (each sequence's last row), h = rmsnorm(x_t), logits[k] = Wout hq
split by vocabulary rows, a barrier. Cheap work (norms, quantizing a vector, residual adds) is repeated by
every thread instead of a barrier. A node over its memory budget streams its weights (ir_stream.py).

The function reads everything through `table`, an i64 array of scalars and buffer addresses whose
slots are fixed by `Slots`: the IR depends only on the model's shapes and tensor types, never on
addresses, the thread count or the context length, so its compiled code is cached on disk and reused.

A layer is a call of `_layer<k>(table, tid, layer)`, one function for all the layers of a signature (weight
types, sliding or not), its slots and sharing sites worked out from the index at run time: the same kernel
calls as the layer inlined, so the same results, and LLVM optimizes one layer, not 30 (SmolLM2: 6.2 -> 2.6 s).

"split": each op's work is cut into chunks fixed by its shape, which the threads take from per-thread
counters, their own first, then the others' leftovers (ir_share.py; ProgramSpec.dynamic=False: static).

Threads: `worker(table, tid)` spins, then sleeps on a futex, until the go-counter moves, runs `forward`, and
loops until `quit` is set; `step(table)` bumps the counter (waking workers) and runs `forward(table, 0)` on the
caller's thread until all threads are done: one ctypes call per step. Barriers spin, then sleep (ir_barrier.py).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import llvmlite.ir as ir

from ..formats import ModelConfig, QType
from .family import LAYER_EXTRAS
from .ir_barrier import emit_step, emit_worker
from .program_attention import AttentionSteps, span_partial_bytes
from .ir_share import Sites, chunk_units
from .ir_stream import emit_after_layer
from .irutil import I64, PTR, VOID, for_range, gep, i64
from .layout import G, act_bytes
from .specs import QUANT_WEIGHTS, KernelSpec, Op

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ProgramSpec:
    """Everything the compiled forward depends on: shapes, tensor types, the largest chunk."""

    config: ModelConfig
    layer_types: tuple[tuple[QType, ...], ...]  # per layer, the types of LAYER_MATRICES in order
    embed_type: QType
    output_type: QType
    max_chunk: int = 64  # tokens per forward call (prefill chunk)
    matmul_tile: int = 8  # most activation rows per pass over a matrix (ir_matvec.emit_matmul_q: 8, 4, 2, 1)
    # a pipeline stage's program (jit/tp_stage.py): its layers [l0, l1) (None: all; layer_types () outside)
    layers: tuple[int, int] | None = None
    embeds: bool = True  # looks the tokens up; else x_t comes in (receive_residual)
    emits_logits: bool = True  # final norm and logits; else x_t goes out (send_residual)
    dynamic: bool = True  # chunks taken dynamically by the threads (ir_share.py); False: one static piece each

    @property
    def run_layers(self) -> range:
        return range(*(self.layers or (0, self.config.n_layers)))

    def kernel_specs(self) -> tuple[KernelSpec, ...]:
        types = {t for lt in self.layer_types for t in lt} | {self.output_type}
        specs = [KernelSpec(Op.QUANTIZE), KernelSpec(Op.QUANTIZE_PART), KernelSpec(Op.QUANTIZE_Q8_0), KernelSpec(Op.ADD_Q8_0),
                 KernelSpec(Op.EMBED, self.embed_type)]
        for t in sorted(types, key=lambda t: t.value):
            specs.append(KernelSpec(Op.MATVEC, t))
            if t in QUANT_WEIGHTS:
                specs.append(KernelSpec(Op.MATMUL, t, self.matmul_tile))
        for op in (Op.RMSNORM, Op.ROPE, Op.ATTENTION, Op.ATTENTION_MERGE, Op.TO_F16, Op.SILU_MUL, Op.GELU_TANH_MUL,
                   Op.SCALE, Op.ADD, Op.TOP_K, Op.BARRIER):
            specs.append(KernelSpec(op))
        return tuple(specs)


class Slots:
    """Names -> indices in the i64 table. Scalars first, then buffers, then per-layer tensors."""

    SCALARS = ("go", "quit", "n", "n_out", "n_threads", "ctx", "idle")  # idle: i32 count of sleeping workers
    BUFFERS = (
        # the step's rows: tokens, row_pos (position), row_kv (first cache row of its sequence's slot: slot x
        # ctx) i64[n]; out_rows i64[n_out]: the rows whose logits are wanted, logits f32[n_out, vocab]
        "barrier", "chunks", "tokens", "row_pos", "row_kv", "out_rows", "rope", "rope_local", "logits",
        # private, one region per thread (stride in the *_stride scalar or a constant)
        "x_t", "h_t", "xq_t", "scratch_t", "attp_t", "s_t",
        # shared between threads
        "q", "k", "v", "att", "att_po", "att_st", "aq", "o", "g", "u", "s", "sq", "d",
        "embed", "output", "output_norm",
        "stream",  # i64[n_layers, 4] of madvise ranges, or 0: this node does not stream (ir_stream.py)
    )
    PER_LAYER = ("attn_norm", "ffn_norm", "k_cache", "v_cache") + LAYER_MATRICES + tuple(LAYER_EXTRAS)

    def __init__(self, n_layers: int):
        names = list(self.SCALARS) + list(self.BUFFERS)
        for layer in range(n_layers):
            names += [f"{layer}.{name}" for name in self.PER_LAYER]
        self.index = {name: i for i, name in enumerate(names)}

    def of_layer(self, name: str) -> tuple[int, int]:
        """A per-layer tensor's slot as (layer 0's index, stride): layer L's is index + L * stride."""
        return self.index[f"0.{name}"], len(self.PER_LAYER)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, name: str) -> int:
        return self.index[name]


def private_sizes(spec: ProgramSpec) -> dict[str, int]:
    """Bytes of each thread's region of the private buffers (scratch_t: per context position; attp_t: per
    attention span, max_spans(ctx) of them)."""
    c = spec.config
    widest = max(c.dim, c.q_dim, c.ffn_dim)
    return {
        "x_t": spec.max_chunk * c.dim * 4,
        "h_t": spec.max_chunk * c.dim * 4,
        "xq_t": spec.max_chunk * act_bytes(widest),
        "scratch_t": c.n_heads * 4,  # x ctx
        "attp_t": span_partial_bytes(c),  # x max_spans(ctx)
        "s_t": c.ffn_dim * 4,  # a decode step's act(g) * u, f32[ffn rows] (gated_ffn)
    }


def product_chunk(rows: int, k: int) -> int:
    """16-row groups per chunk of a product over a rows x k matrix (_Forward.product shares them out so)."""
    return chunk_units((rows + G - 1) // G, G * k)


def build_program(module: ir.Module, spec: ProgramSpec) -> None:
    """Add forward, worker and step to a module that already holds spec.kernel_specs()."""
    _Forward(module, spec).emit()
    _emit_worker(module)
    _emit_step(module)


class _Forward(AttentionSteps):
    """Emits `void forward(i64* table, i64 tid)`; see the module docstring for what it computes."""

    # what each emitted function of the step holds for itself (saved and restored around a layer's function)
    FUNCTION_STATE = ("b", "table", "tid", "nt", "n", "ctx", "x_t", "h_t", "xq_t", "scratch", "layer_at")

    def __init__(self, module: ir.Module, spec: ProgramSpec):
        self.m, self.spec, self.c = module, spec, spec.config
        self.slots = Slots(spec.config.n_layers)
        self.fn = ir.Function(module, ir.FunctionType(VOID, [PTR, I64]), "forward")
        self.fn.attributes.add("nounwind")
        self.table, self.tid = self.fn.args
        self.sites = Sites(spec.config.n_layers, spec.dynamic)
        self.b = ir.IRBuilder(self.fn.append_basic_block("entry"))
        self.k = {s.op if s.op not in (Op.MATVEC, Op.MATMUL, Op.EMBED) else (s.op, s.qtype): module.globals[s.name]
                  for s in spec.kernel_specs()}
        self.layer_at: tuple[int, ir.Value] | None = None  # in a layer's function: (the layer emitted, its index)
        self.layer_fns: dict[tuple, ir.Function] = {}  # by layer_signature

    # --- table access --------------------------------------------------------------------------------

    def slot(self, name: str) -> ir.Value:
        """The table index of `name`; in a layer's function a per-layer name ("<layer>.<tensor>", the layer
        being emitted) is worked out from the layer index the function was called with."""
        layer, dot, tensor = name.partition(".")
        if self.layer_at is None or not dot or not layer.isdigit():
            return i64(self.slots[name])
        emitted, value = self.layer_at
        assert int(layer) == emitted, f"layer {emitted}'s function names another layer's tensor {name!r}"
        first, stride = self.slots.of_layer(tensor)
        return self.b.add(i64(first), self.b.mul(value, i64(stride)))

    def scalar(self, name: str) -> ir.Value:
        return self.b.load(gep(self.b, self.table, self.slot(name), I64), typ=I64)

    def ptr(self, name: str) -> ir.Value:
        return self.b.inttoptr(self.scalar(name), PTR)

    def thread_ptr(self, name: str) -> ir.Value:
        """A weight matrix's base address for this thread: the slot holds the address of an i64[n_threads]
        array, because each thread's rows of every matrix are laid out contiguously (weights.thread_layout)."""
        per_thread = self.ptr(name)
        return self.b.inttoptr(self.b.load(gep(self.b, per_thread, self.tid, I64), typ=I64), PTR)

    def private(self, name: str) -> ir.Value:
        return gep(self.b, self.ptr(name), self.b.mul(self.tid, i64(private_sizes(self.spec)[name])))

    def call(self, op, *args) -> None:
        conv = [a if isinstance(a, ir.Value) else (ir.Constant(ir.FloatType(), a) if isinstance(a, float) else i64(a))
                for a in args]
        self.b.call(self.k[op], conv)

    def barrier(self) -> None:
        self.call(Op.BARRIER, self.ptr("barrier"), self.nt)
        self.sites.reset(self.b, self.ptr("chunks"), self.tid)

    def row(self, base: ir.Value, i: ir.Value, row_bytes: int) -> ir.Value:
        return gep(self.b, base, self.b.mul(i, i64(row_bytes)))

    def at(self, name: str, i: ir.Value) -> ir.Value:
        """Element i of the i64 buffer `name` (row_pos, row_kv, out_rows, tokens)."""
        return self.b.load(gep(self.b, self.ptr(name), i, I64), typ=I64)

    def share(self, total: ir.Value | int, chunk: int):
        """`with self.share(total, chunk) as (lo, hi):` the body runs for each chunk [lo, hi) of range(total)
        this thread computes (chunks of `chunk` units, taken dynamically, or one static piece: ir_share.py)."""
        return self.sites.each(self.b, self.ptr("chunks"), self.tid, self.nt, total, chunk)

    @contextlib.contextmanager
    def items(self, total: ir.Value, name: str):
        """`with self.items(total, name) as i:` the body runs for each i in range(total) this thread computes."""
        with self.share(total, 1) as (lo, hi), for_range(self.b, lo, hi, name=name) as i:
            yield i

    # --- the step --------------------------------------------------------------------------------------

    def emit(self) -> None:
        b, c = self.b, self.c
        self.enter_function()
        if self.spec.embeds:
            self.embed()
            if c.embed_scale != 1.0:
                self.call(Op.SCALE, self.x_t, b.mul(self.n, i64(c.dim)), float(c.embed_scale))
        else:
            self.receive_residual()  # a pipeline stage's program only (jit/tp_stage.py), as send_residual
        for layer in self.spec.run_layers:
            self.call_layer(layer)
            emit_after_layer(b, self.table, self.tid, self.slots["stream"], layer)  # streaming only
        if self.spec.emits_logits:
            self.logits()
        else:
            self.send_residual()
        b.ret_void()

    def enter_function(self) -> None:
        """At each function's entry (forward, a layer's): the values the emitting code takes from self."""
        b, c = self.b, self.c
        self.nt, self.n, self.ctx = (self.scalar(s) for s in ("n_threads", "n", "ctx"))
        self.x_t, self.h_t, self.xq_t = self.private("x_t"), self.private("h_t"), self.private("xq_t")
        self.scratch = gep(b, self.ptr("scratch_t"), b.mul(b.mul(self.tid, self.ctx), i64(c.n_heads * 4)))

    def layer_signature(self, layer: int) -> tuple:
        """What the code of a layer depends on besides its index: its matrices' types, and whether it slides."""
        return self.spec.layer_types[layer], self.c.is_sliding(layer)

    def call_layer(self, layer: int) -> None:
        sig = self.layer_signature(layer)
        if sig not in self.layer_fns:
            self.layer_fns[sig] = self.emit_layer_function(layer, len(self.layer_fns))
        self.b.call(self.layer_fns[sig], [self.table, self.tid, i64(layer)])

    def emit_layer_function(self, layer: int, k: int) -> ir.Function:
        """`void _layer<k>(table, tid, index)`: self.layer(layer)'s code for whichever layer of layer's
        signature `index` names (its slots: slot; its sharing sites: Sites.layer_function)."""
        fn = ir.Function(self.m, ir.FunctionType(VOID, [PTR, I64, I64]), f"_layer{k}")
        fn.attributes.add("noinline")
        fn.attributes.add("nounwind")
        fn.linkage = "internal"
        saved = {name: getattr(self, name) for name in self.FUNCTION_STATE}
        self.table, self.tid, index = fn.args
        self.b = ir.IRBuilder(fn.append_basic_block("entry"))
        try:
            self.enter_function()
            self.layer_at = (layer, index)
            with self.sites.layer_function(self.b, index):
                self.layer(layer)
            self.b.ret_void()
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return fn

    def embed(self) -> None:
        """x_t[i] = row tokens[i] of the embedding, dequantized, for the chunk's rows (every thread)."""
        b, c = self.b, self.c
        tokens = self.ptr("tokens")
        with for_range(b, i64(0), self.n, name="e") as i:
            tok = b.load(gep(b, tokens, i, I64), typ=I64)
            self.call((Op.EMBED, self.spec.embed_type), self.ptr("embed"), tok, self.row(self.x_t, i, c.dim * 4), c.dim)

    def norm_quantize(self, norm: ir.Value, rows_from: ir.Value, rows_to: ir.Value) -> None:
        """h_t = rmsnorm(x_t) * norm; xq_t = quantize(h_t), for chunk rows [rows_from, rows_to)."""
        b, c = self.b, self.c
        with for_range(b, rows_from, rows_to, name="nrm") as i:
            self.call(Op.RMSNORM, self.row(self.x_t, i, c.dim * 4), norm, self.row(self.h_t, i, c.dim * 4), c.dim, float(c.norm_eps))
        rows = b.sub(rows_to, rows_from)
        self.call(Op.QUANTIZE, self.row(self.h_t, rows_from, c.dim * 4), self.row(self.xq_t, rows_from, act_bytes(c.dim)), c.dim, rows)

    def product(self, qtype: QType, w: ir.Value, xf: ir.Value, xq: ir.Value, y: ir.Value, rows: int, k: int,
                n: ir.Value, ldy: int, then=None) -> None:
        """y[i, r] = W[r] . x[i] for i < n, shared out by chunks of 16-row groups of r; x as f32 rows xf (stride k)
        or Q8S rows xq (block weights). then(r0, r1): more work on the chunk's rows by the same thread."""
        b = self.b
        groups = (rows + G - 1) // G
        with self.share(groups, product_chunk(rows, k)) as (g0, g1):
            r0, r1 = b.mul(g0, i64(G)), b.select(b.icmp_signed("<", b.mul(g1, i64(G)), i64(rows)), b.mul(g1, i64(G)), i64(rows))
            self.rows_product(qtype, w, xf, xq, y, k, r0, r1, n, ldy)
            if then is not None:
                then(r0, r1)

    def rows_product(self, qtype: QType, w: ir.Value, xf: ir.Value, xq: ir.Value, y: ir.Value, k: int,
                     r0: ir.Value, r1: ir.Value, n: ir.Value, ldy: int) -> None:
        """y[i, r] = W[r] . x[i] for i < n and r in [r0, r1) (see product)."""
        if qtype in QUANT_WEIGHTS:
            self.call((Op.MATMUL, qtype), w, xq, y, k, r0, r1, n, ldy)
        else:
            with for_range(self.b, i64(0), n, name="fr") as i:
                self.call((Op.MATVEC, qtype), w, self.row(xf, i, k * 4), self.row(y, i, ldy * 4), k, r0, r1)

    def attention(self, layer: int, t: dict, nq: int, nkv: int) -> ir.Value:
        """Q/K/V for nq query and nkv KV heads from hq (xq_t), RoPE, K/V into row i's slot of the f16 cache at row_pos[i],
        attention of each row against its slot up to its position -> `att` f32[n, nq * hd]; a barrier. tp_program's too."""
        b, c, n, hd = self.b, self.c, self.n, self.c.head_dim
        qd, kvd = nq * hd, nkv * hd
        L = lambda name: self.ptr(f"{layer}.{name}")  # noqa: E731
        q, k, v, att = self.ptr("q"), self.ptr("k"), self.ptr("v"), self.ptr("att")
        for name, y, rows in (("attn_q", q, qd), ("attn_k", k, kvd), ("attn_v", v, kvd)):
            self.product(t[name], self.thread_ptr(f"{layer}.{name}"), self.h_t, self.xq_t, y, rows, c.dim, n, rows)
        self.barrier()

        sliding = c.is_sliding(layer)
        rope = self.ptr("rope_local" if sliding and c.rope_base_local is not None else "rope")
        kc, vc = L("k_cache"), L("v_cache")
        q_scale = c.score_scale * hd**0.5  # the kernel scales by 1/sqrt(hd); any other factor goes on q
        with self.items(n, "kv") as i:
            p = self.at("row_pos", i)
            qrow, krow, vrow = self.row(q, i, qd * 4), self.row(k, i, kvd * 4), self.row(v, i, kvd * 4)
            if c.qkv_bias:
                for row, name, width in ((qrow, "q_bias", qd), (krow, "k_bias", kvd), (vrow, "v_bias", kvd)):
                    self.call(Op.ADD, row, L(name), width)
            if c.qk_norm:
                for row, name, heads in ((qrow, "q_norm", nq), (krow, "k_norm", nkv)):
                    w = L(name)
                    with for_range(b, i64(0), i64(heads), name="hn") as h:
                        head = gep(b, row, b.mul(h, i64(hd * 4)))
                        self.call(Op.RMSNORM, head, w, head, hd, float(c.norm_eps))
            self.call(Op.ROPE, krow, rope, p, nkv, hd, c.rope_dim)
            for (cache, row), g in itertools.product(((kc, krow), (vc, vrow)), range(nkv)):  # head g -> its position p
                self.call(Op.TO_F16, gep(b, row, i64(g * hd * 4)), self.row(self.kv_head(self.seq_cache(cache, i, kvd), g), p, hd * 2), hd)
            self.call(Op.ROPE, qrow, rope, p, nq, hd, c.rope_dim)
            if q_scale != 1.0:
                self.call(Op.SCALE, qrow, qd, float(q_scale))
        self.barrier()

        window = c.sliding_window if sliding else 0
        with b.if_else(b.icmp_signed("==", n, i64(1))) as (one_row, rows):
            with one_row:
                self.attention_spans(kc, vc, nq, nkv, window)
            with rows:
                self.attention_rows(kc, vc, nq, nkv, window)
        self.barrier()
        return att

    def ffn_quantized_in_chunks(self, rows: int) -> bool:
        """Whether the FFN of several rows can quantize act(g) * u chunk by chunk into the shared `sq` (each
        chunk of the gate's 16-row groups a whole number of 32-value blocks; dynamic sharing: a static piece per
        thread need not be): then no thread re-reads and re-quantizes all of s."""
        return self.spec.dynamic and rows % 32 == 0 and product_chunk(rows, self.c.dim) * G % 32 == 0

    def gated_ffn(self, layer: int, t: dict, rows: int, sq: ir.Value | None = None) -> ir.Value:
        """h = rmsnorm(x_t); s = act(Wg h) * (Wu h) (SiLU or GELU-tanh) for `rows` FFN rows (all, or a TP node's) ->
        s f32[n, rows]: shared `s`, or for one row this thread's s_t. Ends with a barrier. Several rows: a chunk of
        Wg rows, then the same rows of Wu and act by the same thread. One row: Wg, then Wu, each its own site
        (alternating chunks cost ~8 % of a 1-thread decode step: bench_ab.py), then every thread act into s_t."""
        b, c, n, zero = self.b, self.c, self.n, i64(0)
        W = lambda name: self.thread_ptr(f"{layer}.{name}")  # noqa: E731
        self.norm_quantize(self.ptr(f"{layer}.ffn_norm"), zero, n)
        g, u, s, s_t, up = self.ptr("g"), self.ptr("u"), self.ptr("s"), self.private("s_t"), W("ffn_up")
        act = Op.GELU_TANH_MUL if self.c.activation == "gelu_tanh" else Op.SILU_MUL

        def up_and_act(r0: ir.Value, r1: ir.Value) -> None:  # the gate's rows of this chunk are done
            self.rows_product(t["ffn_up"], up, self.h_t, self.xq_t, u, c.dim, r0, r1, n, rows)
            with for_range(b, zero, n, name="silu") as i:
                off = b.add(b.mul(i, i64(rows)), r0)
                self.call(act, *(gep(b, buf, off, ir.FloatType()) for buf in (g, u, s)), b.sub(r1, r0))
                if sq is not None:  # this chunk's blocks of row i's quantized s (see ffn_quantized_in_chunks)
                    self.call(Op.QUANTIZE_PART, self.row(s, i, rows * 4), self.row(sq, i, act_bytes(rows)), rows,
                              b.sdiv(r0, i64(32)), b.sdiv(r1, i64(32)))

        one_row = b.icmp_signed("==", n, i64(1))
        with b.if_else(one_row) as (decode, several):
            with decode:
                self.product(t["ffn_gate"], W("ffn_gate"), self.h_t, self.xq_t, g, rows, c.dim, n, rows)
                self.product(t["ffn_up"], up, self.h_t, self.xq_t, u, rows, c.dim, n, rows)
                self.barrier()
                self.call(act, g, u, s_t, rows)
            with several:
                self.product(t["ffn_gate"], W("ffn_gate"), self.h_t, self.xq_t, g, rows, c.dim, n, rows, then=up_and_act)
                self.barrier()
        return b.select(one_row, s_t, s)

    def layer(self, layer: int) -> None:
        c, spec = self.c, self.spec
        t = dict(zip(LAYER_MATRICES, spec.layer_types[layer]))
        L = lambda name: self.ptr(f"{layer}.{name}")  # noqa: E731
        W = lambda name: self.thread_ptr(f"{layer}.{name}")  # noqa: E731
        zero, n = i64(0), self.n
        qd = c.q_dim

        # attention block
        self.norm_quantize(L("attn_norm"), zero, n)
        att = self.attention(layer, t, c.n_heads, c.n_kv_heads)
        fused = self.att_quantized_by_groups(c.n_heads, c.n_kv_heads)  # several rows: quantized into aq already
        aq = self.quantized(att, qd, self.ptr("aq") if fused else None)
        o = self.ptr("o")
        self.product(t["attn_output"], W("attn_output"), att, aq, o, c.dim, qd, n, c.dim)
        self.barrier()

        # feed-forward block
        self.residual(layer, "post_attn_norm", o)
        f = c.ffn_dim
        d = self.ptr("d")
        sq = self.ptr("sq") if self.ffn_quantized_in_chunks(f) else None  # several rows: the chunks quantize s
        s = self.gated_ffn(layer, t, f, sq)
        xq = self.quantized(s, f, sq)
        self.product(t["ffn_down"], W("ffn_down"), s, xq, d, c.dim, f, n, c.dim)
        self.barrier()
        self.residual(layer, "post_ffn_norm", d)

    def quantized(self, y: ir.Value, k: int, shared: ir.Value | None) -> ir.Value:
        """The Q8S rows of y f32[n, k] a product takes: this thread's xq_t := quantize(y); or, when the step's
        several rows were quantized into `shared` where they were computed, that (one row: xq_t still)."""
        b = self.b
        if shared is None:
            self.call(Op.QUANTIZE, y, self.xq_t, k, self.n)
            return self.xq_t
        one_row = b.icmp_signed("==", self.n, i64(1))
        with b.if_then(one_row):
            self.call(Op.QUANTIZE, y, self.xq_t, k, self.n)
        return b.select(one_row, self.xq_t, shared)

    def residual(self, layer: int, post_norm: str, y: ir.Value) -> None:
        """x_t += y f32[n, dim], or with post norms x_t += rmsnorm(y) * the layer's post_norm weight (each
        thread normalizes every row into its private h_t: y is shared and read by all)."""
        b, c, n = self.b, self.c, self.n
        if not c.post_norms:
            self.call(Op.ADD, self.x_t, y, b.mul(n, i64(c.dim)))
            return
        w = self.ptr(f"{layer}.{post_norm}")
        with for_range(b, i64(0), n, name="post") as i:
            self.call(Op.RMSNORM, self.row(y, i, c.dim * 4), w, self.row(self.h_t, i, c.dim * 4), c.dim, float(c.norm_eps))
        self.call(Op.ADD, self.x_t, self.h_t, b.mul(n, i64(c.dim)))

    def out_rows(self) -> ir.Value:
        """h_t[k] = rmsnorm(x_t[out_rows[k]]) * output norm, xq_t[k] its quantization, for k < n_out (every
        thread); returns n_out."""
        b, c = self.b, self.c
        n_out = self.scalar("n_out")
        with for_range(b, i64(0), n_out, name="lg") as k:
            self.call(Op.RMSNORM, self.row(self.x_t, self.at("out_rows", k), c.dim * 4), self.ptr("output_norm"),
                      self.row(self.h_t, k, c.dim * 4), c.dim, float(c.norm_eps))
        self.call(Op.QUANTIZE, self.h_t, self.xq_t, c.dim, n_out)
        return n_out

    def logits(self) -> None:
        """logits[k] = Wout h_t[k] for k < n_out: one product over the wanted rows (weights streamed once)."""
        c, n_out = self.c, self.out_rows()
        self.product(self.spec.output_type, self.thread_ptr("output"), self.h_t, self.xq_t, self.ptr("logits"),
                     c.vocab_size, c.dim, n_out, c.vocab_size)
        self.barrier()


def _emit_worker(module: ir.Module) -> None:
    """void worker(i64* table, i64 tid): run `forward` each time `go` moves, until `quit` is set (ir_barrier.py)."""
    emit_worker(module, *(Slots.SCALARS.index(name) for name in ("go", "quit", "idle")))


def _emit_step(module: ir.Module) -> None:
    """void step(i64* table): wake the workers, run forward as thread 0; void kick(i64* table): wake only."""
    emit_step(module, *(Slots.SCALARS.index(name) for name in ("go", "idle")))
