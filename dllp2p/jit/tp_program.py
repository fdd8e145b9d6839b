"""One node's share of a tensor-parallel forward step, exchanges included, as compiled code.

Query heads: each node computes its own query heads and the K/V of the KV heads they read; with more
nodes than KV heads (Gemma 3: 1) each such KV head's K/V rows are computed on every node sharing it.

Two ways to combine the nodes' shares of a layer (Partition.exchange, chosen by the plan):

"exact": every matrix split by ROWS, so every output value is computed by exactly one node with exactly
the single-node kernel and summation order, and the cluster's logits are bit-identical to one node's:

    node i   q, k, v rows of its KV-head group       -> RoPE, its KV cache, attention of its heads
             quantize its heads' outputs (whole 32-blocks: head_dim % 32 == 0)
    A        all-gather the quantized attention output               (Q8S bytes, as one node makes them)
             o rows [d0, d1) = Wo[d0:d1] . att_q
    B        all-gather o                                            (f32, exact)
             x += o; h = rmsnorm(x); gate, up rows [f0, f1); s = silu(gate) * up; quantize s
    C        all-gather the quantized s                              (Q8S bytes)
             d rows [d0, d1) = Wd[d0:d1] . s_q
    D        all-gather d                                            (f32, exact)
             x += d

"q8" (Megatron, as distributed-llama): Wo and Wd split by COLUMNS, so each node's o and d are partial
sums over its heads / FFN rows; two all-reduces per layer instead of four exchanges, each node's partial
rounded to ggml's Q8_0 (34 bytes per 32 values: a third of the exact exchange's bytes):

    node i   attention of its heads as above; o_i = Wo[:, its heads] . att_q   (all dim rows)
    R1       all-reduce: x += sum over nodes j, in node order, of dequant(q8_0(o_j))
             h = rmsnorm(x); gate, up rows [f0, f1); s = silu(gate) * up; d_i = Wd[:, f0:f1] . s_q
    R2       all-reduce d likewise

On 2 nodes an all-reduce is one exchange of the whole partials. From RS_MIN_NODES nodes it is a
reduce-scatter (each node owns dim_rows[i] and sums everyone's quantized parts of them) then an
all-gather of the owners' quantized sums (ReduceScatter): 2 (N - 1) / N of a row per node instead of
N - 1 rows, for a second round trip and a second rounding.

Every node adds the same bytes in the same order, so x stays identical on all nodes; but the logits
differ from one node's by the partials' rounding (measured on SmolLM2: max |dlogit| ~2-3, mean ~0.3;
greedy choices agree except near ties; tests/test_tp.py states the tolerance). Even f32 partial sums
could not be bit-exact: a different summation order flips the rounding of some 8-bit activations.

Either way, first: the embedding. A node holds only its vocabulary rows [v0, v1) of token_embd (also its
rows of a tied output projection); it looks up the chunk's tokens it owns and the nodes swap those rows
(zeros for the others'), one exchange a step, after which every node's x is the one node's lookup.

Either way, at the end: logits rows [v0, v1) of the output projection; nodes send theirs to node 0: all
of them (f32), or, when the step asks for its `top` best (the table scalar; sampling that reads only the
best few, as greedy and top-k do), just those, as (f32 value, i32 vocabulary id) records: 8 bytes each
instead of 4 per vocabulary row (at 2 nodes of a 32000-token vocabulary, 64 KB -> 512 B per token).

An exchange runs on thread 0 of the node between two barriers (the other threads wait at the second):
send this node's part to every peer, then receive every peer's, in node order. Sends are small (< 1
MiB, the sockets' buffers), so every node may send before it receives without deadlock. The sockets
are blocking with receive/send timeouts set by the caller; a failed send or receive records the peer in
the table's `error` slot, later exchanges are skipped, and Python raises after the step. The residual
stream x is replicated: every node holds the same x after every exchange.
"""

from __future__ import annotations

from functools import partial

import llvmlite.ir as ir

from ..engine import MAX_TOP
from .irutil import I32, I64, PTR, VOID, for_range, gep, i64, intrinsic
from .layout import act_bytes, q8_0_bytes
from .program import LAYER_MATRICES, ProgramSpec, _emit_step, _emit_worker, _Forward
from .specs import Op
from .tp_partition import RS_MIN_NODES, Partition, ReduceScatter, TPSlots
from .tp_seal import sealed_transfer

MSG_NOSIGNAL = 0x4000  # Linux: a broken connection returns EPIPE instead of raising SIGPIPE
MSG_WAITALL = 0x100
MSG_DONTWAIT = 0x40
EAGAIN = 11
EINTR = 4
RECV_SPINS = 200  # non-blocking receive attempts (~0.3 us each: ~60 us) before blocking; more starves oversubscribed cores


def build_tp_program(module: ir.Module, spec: ProgramSpec, part: Partition, sealed: bool = False) -> None:
    _TPForward(module, spec, part, sealed).emit()
    _emit_worker(module)
    _emit_step(module)


class _TPForward(_Forward):
    att_exchanged = True  # attention's output is quantized for the exchange (layer_q8/layer_exact), not into aq
    FUNCTION_STATE = _Forward.FUNCTION_STATE + ("_slot_done", "_slot_spins")  # each function's, for transfer
    def __init__(self, module: ir.Module, spec: ProgramSpec, part: Partition, sealed: bool = False):
        super().__init__(module, spec)
        self.part = part
        if sealed:  # with a cluster key: every message sealed (ChaCha20-Poly1305, libsodium), see tp_seal.py
            self.transfer = partial(sealed_transfer, self, self.transfer)
        self.slots = TPSlots(spec.config.n_layers)
        self.me = part.index
        c = spec.config
        self.kv0, self.kv1 = part.kv_heads[self.me]
        self.f0, self.f1 = part.ffn_rows[self.me]
        self.d0, self.d1 = part.dim_rows[self.me]
        self.v0, self.v1 = part.vocab_rows[self.me]
        q0, q1 = part.q_of(self.me, c.group_size)
        self.nq = q1 - q0  # this node's query heads (all of its KV heads' groups, or a share of one group)
        self.nkv = self.kv1 - self.kv0
        i64t = ir.IntType(64)
        self.send = intrinsic(module, "send", i64t, [I32, PTR, i64t, I32])
        self.recv = intrinsic(module, "recv", i64t, [I32, PTR, i64t, I32])
        self.clock_gettime = intrinsic(module, "clock_gettime", I32, [I32, PTR])
        self.errno_location = intrinsic(module, "__errno_location", PTR, [])
        self.memcpy = intrinsic(module, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, ir.IntType(1)])

    # --- exchange helpers ----------------------------------------------------------------------------

    def copy(self, dst: ir.Value, src: ir.Value, nbytes: ir.Value) -> None:
        self.b.call(self.memcpy, [dst, src, nbytes, ir.Constant(ir.IntType(1), 0)])

    def now_ns(self) -> ir.Value:
        b = self.b
        ts = self.ptr("clock")
        b.call(self.clock_gettime, [ir.Constant(I32, 1), ts])  # CLOCK_MONOTONIC
        sec = b.load(ts, typ=I64)
        nsec = b.load(gep(b, ts, i64(1), I64), typ=I64)
        return b.add(b.mul(sec, i64(1_000_000_000)), nsec)

    def transfer(self, fn: ir.Function, peer: int, buf: ir.Value, nbytes: ir.Value, flags: int) -> None:
        """Send or receive exactly nbytes with peer; on failure set error = peer + 1 and stop.

        Receives first poll without blocking (MSG_DONTWAIT) for up to `recv_spins` tries (a table
        scalar; RECV_SPINS by default): the peer is normally microseconds away, and waking a thread
        blocked in recv costs more than that. Then they block (the socket's receive timeout still
        bounds the wait). Nodes sharing too few cores (tests) set it to 0: spinning would take the
        core from the node being waited for."""
        b = self.b
        err_slot = gep(b, self.table, i64(self.slots["error"]), I64)
        fd = b.trunc(b.load(gep(b, self.ptr("fds"), i64(peer), I64), typ=I64), I32)
        done, spins = self._slot_done, self._slot_spins
        b.store(i64(0), done)
        b.store(i64(0), spins)
        polling = fn is self.recv
        loop, body, out = (b.append_basic_block(s) for s in ("xfer", "xfer.body", "xfer.end"))
        b.branch(loop)
        b.position_at_end(loop)
        sofar = b.load(done, typ=I64)
        ok = b.icmp_signed("==", b.load(err_slot, typ=I64), i64(0))
        more = b.and_(ok, b.icmp_signed("<", sofar, nbytes))
        b.cbranch(more, body, out)
        b.position_at_end(body)
        if polling:
            tried = b.load(spins, typ=I64)
            poll = b.icmp_signed("<", tried, self.scalar("recv_spins"))
            call_flags = b.select(poll, ir.Constant(I32, MSG_DONTWAIT), ir.Constant(I32, flags))
        else:
            poll, call_flags = None, ir.Constant(I32, flags)
        got = b.call(fn, [fd, gep(b, buf, sofar), b.sub(nbytes, sofar), call_flags])
        with b.if_else(b.icmp_signed(">", got, i64(0))) as (then, otherwise):
            with then:
                b.store(b.add(sofar, got), done)
            with otherwise:
                # closed (0) or an error (-1), unless a signal interrupted the call (EINTR: a socket with
                # a timeout is never restarted) or a non-blocking receive merely found nothing yet
                errno = b.load(b.call(self.errno_location, []), typ=I32)
                again = b.icmp_signed("==", errno, ir.Constant(I32, EINTR))
                if polling:
                    again = b.or_(again, b.and_(poll, b.icmp_signed("==", errno, ir.Constant(I32, EAGAIN))))
                    b.store(b.add(tried, i64(1)), spins)
                failed = b.not_(b.and_(b.icmp_signed("<", got, i64(0)), again))
                with b.if_then(failed):
                    b.store(i64(peer + 1), err_slot)
        b.branch(loop)
        b.position_at_end(out)

    def on_thread0(self, name: str, arg: ir.Value, body) -> None:
        """Thread 0 runs body(arg) (it emits the exchange), then a barrier. The exchange is its own
        function, emitted once per name and called from every layer: inlined 30 times it made LLVM's
        optimizer take ~25 s instead of ~3."""
        fn = self.m.globals.get(f"_xchg_{name}")
        if fn is None:
            fn = ir.Function(self.m, ir.FunctionType(VOID, [PTR, I64, PTR]), f"_xchg_{name}")
            fn.attributes.add("noinline")
            fn.linkage = "internal"
            saved = (self.b, self.table, self.n, self._slot_done, self._slot_spins)
            self.table, self.n, inner = fn.args
            self.b = b = ir.IRBuilder(fn.append_basic_block("entry"))
            self._slot_done, self._slot_spins = b.alloca(I64), b.alloca(I64)
            body(inner)
            b.ret_void()
            self.b, self.table, self.n, self._slot_done, self._slot_spins = saved
        with self.b.if_then(self.b.icmp_signed("==", self.tid, i64(0))):
            self.b.call(fn, [self.table, self.n, arg])
        self.barrier()

    def swap(self, sent, received, after=None) -> None:
        """Send sent(peer) = (buffer, bytes) to every peer, then receive received(peer) = (buffer, bytes)
        from each, in node order, calling after(peer) once its bytes are in (see the module docstring)."""
        peers = [j for j in range(self.part.n_nodes) if j != self.me]
        for j in peers:
            self.transfer(self.send, j, *sent(j), MSG_NOSIGNAL)
        for j in peers:
            self.transfer(self.recv, j, *received(j), MSG_WAITALL)
            if after is not None:
                after(j)

    def allgather(self, name: str, local: ir.Value, local_bytes: list[int], make_place) -> None:
        """Thread 0: send `local` (n rows of local_bytes[me] bytes) to every peer; make_place() returns
        place(node, src), which copies a node's n rows from src into the full buffer; peers' rows arrive
        in `staging`. Then a barrier."""
        def body(loc: ir.Value) -> None:
            b = self.b
            place = make_place()
            t0 = self.now_ns()
            staging = self.ptr("staging")
            self.swap(lambda j: (loc, b.mul(self.n, i64(local_bytes[self.me]))),
                      lambda j: (staging, b.mul(self.n, i64(local_bytes[j]))),
                      lambda j: place(j, staging))
            place(self.me, loc)
            self.count_exchange(t0)

        self.on_thread0(name, local, body)

    def allreduce(self, name: str, partial: ir.Value, layer: int, post_norm: str) -> None:
        """x_t += the sum over nodes of every node's partial (n, dim) output, each quantized to Q8_0.

        Thread 0 quantizes this node's partial into its section of `sums_q`, sends it to every peer and
        receives theirs into their sections; after a barrier every thread adds all sections to its x_t in
        node order. Every node adds the same bytes in the same order, so x stays identical on all nodes.
        With post norms the sum goes to the thread's private h_t (zeroed first) and x_t += rmsnorm(h_t) * w."""
        c, b = self.c, self.b
        if self.part.n_nodes == 1:  # alone: the partial is the whole output, added exactly
            self.residual(layer, post_norm, partial)
            return
        if post := c.post_norms:
            memset = intrinsic(self.m, "llvm.memset.p0.i64", VOID, [PTR, ir.IntType(8), I64, ir.IntType(1)])
            b.call(memset, [self.h_t, ir.Constant(ir.IntType(8), 0), b.mul(self.n, i64(c.dim * 4)),
                            ir.Constant(ir.IntType(1), 0)])
        target = self.h_t if post else self.x_t
        if self.part.n_nodes >= RS_MIN_NODES:
            self.reduce_scatter(name, partial, target)
        else:
            self.allreduce_two(name, partial, target)
        if post:
            w = self.ptr(f"{layer}.{post_norm}")
            with for_range(b, i64(0), self.n, name="postq") as i:
                hrow = self.row(self.h_t, i, c.dim * 4)
                self.call(Op.RMSNORM, hrow, w, hrow, c.dim, float(c.norm_eps))
            self.call(Op.ADD, self.x_t, self.h_t, b.mul(self.n, i64(c.dim)))

    def allreduce_two(self, name: str, partial: ir.Value, target: ir.Value) -> None:
        """allreduce below RS_MIN_NODES nodes: every node's whole quantized partial to every peer."""
        c, row = self.c, q8_0_bytes(self.c.dim)
        section = self.spec.max_chunk * row

        def body(src: ir.Value) -> None:
            b = self.b
            sums = self.ptr("sums_q")
            mine = gep(b, sums, i64(self.me * section))
            self.call(Op.QUANTIZE_Q8_0, src, mine, c.dim, self.n)
            t0 = self.now_ns()
            nbytes = b.mul(self.n, i64(row))
            self.swap(lambda j: (mine, nbytes), lambda j: (gep(b, sums, i64(j * section)), nbytes))
            self.count_exchange(t0)

        self.on_thread0(name, partial, body)
        sums = self.ptr("sums_q")
        for node in range(self.part.n_nodes):
            self.call(Op.ADD_Q8_0, target, gep(self.b, sums, i64(node * section)), c.dim, self.n)

    def reduce_scatter(self, name: str, partial: ir.Value, target: ir.Value) -> None:
        """allreduce over RS_MIN_NODES or more nodes: see ReduceScatter."""
        c, me, nodes = self.c, self.me, range(self.part.n_nodes)
        rs = ReduceScatter(self.spec, self.part)
        memset = intrinsic(self.m, "llvm.memset.p0.i64", VOID, [PTR, ir.IntType(8), I64, ir.IntType(1)])

        def body(src: ir.Value) -> None:
            b, n = self.b, self.n
            sums = self.ptr("sums_q")
            at = lambda off: gep(b, sums, i64(off))  # noqa: E731
            for j in nodes:  # each owner's columns of this node's partial, row after row
                with for_range(b, i64(0), n, name="rsq") as i:
                    x = gep(b, src, b.add(b.mul(i, i64(c.dim)), i64(rs.cols[j][0])), ir.FloatType())
                    self.call(Op.QUANTIZE_Q8_0, x, gep(b, at(rs.send[j]), b.mul(i, i64(rs.q[j]))), rs.k[j], 1)
            t0 = self.now_ns()
            self.swap(lambda j: (at(rs.send[j]), b.mul(n, i64(rs.q[j]))),
                      lambda j: (at(rs.recv[j]), b.mul(n, i64(rs.q[me]))))
            red = at(rs.red)
            b.call(memset, [red, ir.Constant(ir.IntType(8), 0), b.mul(n, i64(rs.k[me] * 4)), ir.Constant(ir.IntType(1), 0)])
            for j in nodes:
                self.call(Op.ADD_Q8_0, red, at(rs.send[me] if j == me else rs.recv[j]), rs.k[me], n)
            self.call(Op.QUANTIZE_Q8_0, red, at(rs.ag[me]), rs.k[me], n)
            self.swap(lambda j: (at(rs.ag[me]), b.mul(n, i64(rs.q[me]))),
                      lambda j: (at(rs.ag[j]), b.mul(n, i64(rs.q[j]))))
            self.count_exchange(t0)

        self.on_thread0(name, partial, body)
        b = self.b
        sums = self.ptr("sums_q")
        for j in nodes:
            with for_range(b, i64(0), self.n, name="rsa") as i:
                x = gep(b, target, b.add(b.mul(i, i64(c.dim)), i64(rs.cols[j][0])), ir.FloatType())
                q = gep(b, sums, b.add(i64(rs.ag[j]), b.mul(i, i64(rs.q[j]))))
                self.call(Op.ADD_Q8_0, x, q, rs.k[j], 1)

    def count_exchange(self, t0: ir.Value) -> None:
        b = self.b
        slot = gep(b, self.table, i64(self.slots["sync_ns"]), I64)
        b.store(b.add(b.load(slot, typ=I64), b.sub(self.now_ns(), t0)), slot)
        ex = gep(b, self.table, i64(self.slots["exchanges"]), I64)
        b.store(b.add(b.load(ex, typ=I64), i64(1)), ex)

    def place_q8s(self, full: ir.Value, k_full: int, cols: list[tuple[int, int]]):
        """Copy n local Q8S rows (columns [c0, c1) of a k_full-wide row) into the full Q8S rows: the q bytes,
        the block scales and the block sums each land in their section (layout.py)."""
        b = self.b
        nb_full = k_full // 32

        def place(node: int, src: ir.Value) -> None:
            c0, c1 = cols[node]
            kl = c1 - c0
            with for_range(b, i64(0), self.n, name="pq") as i:
                s = self.row(src, i, act_bytes(kl))
                d = self.row(full, i, act_bytes(k_full))
                self.copy(gep(b, d, i64(c0)), s, i64(kl))
                self.copy(gep(b, d, i64(k_full + 4 * (c0 // 32))), gep(b, s, i64(kl)), i64(4 * (kl // 32)))
                self.copy(gep(b, d, i64(k_full + 4 * nb_full + 4 * (c0 // 32))), gep(b, s, i64(kl + 4 * (kl // 32))),
                          i64(4 * (kl // 32)))

        return place

    def place_f32(self, full: ir.Value, width: int, cols: list[tuple[int, int]]):
        b = self.b

        def place(node: int, src: ir.Value) -> None:
            c0, c1 = cols[node]
            with for_range(b, i64(0), self.n, name="pf") as i:
                self.copy(gep(b, self.row(full, i, width * 4), i64(c0 * 4)), self.row(src, i, (c1 - c0) * 4), i64((c1 - c0) * 4))

        return place

    # --- the step --------------------------------------------------------------------------------------

    def enter_function(self) -> None:
        with self.b.goto_entry_block():
            self._slot_done, self._slot_spins = self.b.alloca(I64), self.b.alloca(I64)
        super().enter_function()

    def embed(self) -> None:
        """The node holds only its vocabulary rows of the embedding (the tied output's own slice). Thread 0
        writes the rows of the chunk's tokens it owns into its section of `emb_all` (zeros elsewhere) and
        swaps sections with every peer; then every thread copies each row from its owner's section into its
        x_t: the bytes one node's lookup gives, for n * dim * 4 bytes to each peer (one exchange a step)."""
        b, c, part = self.b, self.c, self.part
        if part.n_nodes == 1:  # alone: the whole embedding, looked up as one node does
            super().embed()
            return
        section = self.spec.max_chunk * c.dim * 4
        row = c.dim * 4
        memset = intrinsic(self.m, "llvm.memset.p0.i64", VOID, [PTR, ir.IntType(8), I64, ir.IntType(1)])

        def body(mine: ir.Value) -> None:
            b = self.b
            b.call(memset, [mine, ir.Constant(ir.IntType(8), 0), b.mul(self.n, i64(row)), ir.Constant(ir.IntType(1), 0)])
            tokens = self.ptr("tokens")
            with for_range(b, i64(0), self.n, name="eo") as i:
                tok = b.load(gep(b, tokens, i, I64), typ=I64)
                own = b.and_(b.icmp_signed(">=", tok, i64(self.v0)), b.icmp_signed("<", tok, i64(self.v1)))
                with b.if_then(own):
                    self.call((Op.EMBED, self.spec.embed_type), self.ptr("embed"), b.sub(tok, i64(self.v0)),
                              self.row(mine, i, row), c.dim)
            t0 = self.now_ns()
            emb = self.ptr("emb_all")
            nbytes = b.mul(self.n, i64(row))
            self.swap(lambda j: (mine, nbytes), lambda j: (gep(b, emb, i64(j * section)), nbytes))
            self.count_exchange(t0)

        self.on_thread0("emb", gep(b, self.ptr("emb_all"), i64(self.me * section)), body)
        tokens, emb = self.ptr("tokens"), self.ptr("emb_all")
        with for_range(b, i64(0), self.n, name="ec") as i:
            tok = b.load(gep(b, tokens, i, I64), typ=I64)
            owner = i64(0)
            for j in range(1, part.n_nodes):
                owner = b.add(owner, b.zext(b.icmp_signed(">=", tok, i64(part.vocab_rows[j][0])), I64))
            src = gep(b, emb, b.add(b.mul(owner, i64(section)), b.mul(i, i64(row))))
            self.copy(self.row(self.x_t, i, row), src, i64(row))

    def layer(self, layer: int) -> None:
        if self.part.exchange == "q8":
            self.layer_q8(layer)
        else:
            self.layer_exact(layer)

    def layer_q8(self, layer: int) -> None:
        """Megatron: attention on this node's heads, o = its columns of Wo times its heads' outputs (a
        partial sum over all dim rows), all-reduce; the FFN on its rows, d = its columns of Wd, all-reduce."""
        c, n = self.c, self.n
        t = dict(zip(LAYER_MATRICES, self.spec.layer_types[layer]))
        W = lambda name: self.thread_ptr(f"{layer}.{name}")  # noqa: E731
        ql, fl = self.nq * c.head_dim, self.f1 - self.f0

        self.norm_quantize(self.ptr(f"{layer}.attn_norm"), i64(0), n)
        att = self.attention(layer, t, self.nq, self.nkv)
        self.call(Op.QUANTIZE, att, self.xq_t, ql, n)
        o = self.ptr("o")
        self.product(t["attn_output"], W("attn_output"), att, self.xq_t, o, c.dim, ql, n, c.dim)
        self.barrier()
        self.allreduce("o", o, layer, "post_attn_norm")

        s = self.gated_ffn(layer, t, fl)
        self.call(Op.QUANTIZE, s, self.xq_t, fl, n)
        d = self.ptr("d")
        self.product(t["ffn_down"], W("ffn_down"), s, self.xq_t, d, c.dim, fl, n, c.dim)
        self.barrier()
        self.allreduce("d", d, layer, "post_ffn_norm")

    def layer_exact(self, layer: int) -> None:
        b, c, spec, part = self.b, self.c, self.spec, self.part
        t = dict(zip(LAYER_MATRICES, spec.layer_types[layer]))
        L = lambda name: self.ptr(f"{layer}.{name}")  # noqa: E731
        W = lambda name: self.thread_ptr(f"{layer}.{name}")  # noqa: E731
        zero, n = i64(0), self.n
        hd, g = c.head_dim, c.group_size
        ql = self.nq * hd
        dl, fl = self.d1 - self.d0, self.f1 - self.f0
        qcols = [(a * hd, b_ * hd) for a, b_ in (part.q_of(j, g) for j in range(part.n_nodes))]

        # attention on this node's heads
        self.norm_quantize(L("attn_norm"), zero, n)
        att = self.attention(layer, t, self.nq, self.nkv)

        # A: the quantized attention output of every head, on every node
        att_q, local = self.ptr("att_q"), self.xq_t  # thread 0's private buffer is free until the next norm
        with b.if_then(b.icmp_signed("==", self.tid, i64(0))):
            self.call(Op.QUANTIZE, att, local, ql, n)
        self.allgather("att", local, [act_bytes(b_ - a) for a, b_ in qcols],
                       lambda: self.place_q8s(self.ptr("att_q"), c.q_dim, qcols))

        # B: o rows of this node, then all of o
        o, o_full = self.ptr("o"), self.ptr("o_full")
        self.product(t["attn_output"], W("attn_output"), att, att_q, o, dl, c.q_dim, n, dl)
        self.barrier()
        self.allgather("o", o, [(b_ - a) * 4 for a, b_ in part.dim_rows],
                       lambda: self.place_f32(self.ptr("o_full"), c.dim, list(part.dim_rows)))

        # feed-forward on this node's rows
        self.residual(layer, "post_attn_norm", o_full)
        s = self.gated_ffn(layer, t, fl)

        # C: the quantized s of every FFN row, on every node
        s_q = self.ptr("s_q")
        with b.if_then(b.icmp_signed("==", self.tid, i64(0))):
            self.call(Op.QUANTIZE, s, local, fl, n)
        self.allgather("s", local, [act_bytes(b_ - a) for a, b_ in part.ffn_rows],
                       lambda: self.place_q8s(self.ptr("s_q"), c.ffn_dim, list(part.ffn_rows)))

        # D: d rows of this node, then all of d
        d, d_full = self.ptr("d"), self.ptr("d_full")
        self.product(t["ffn_down"], W("ffn_down"), s, s_q, d, dl, c.ffn_dim, n, dl)
        self.barrier()
        self.allgather("d", d, [(b_ - a) * 4 for a, b_ in part.dim_rows],
                       lambda: self.place_f32(self.ptr("d_full"), c.dim, list(part.dim_rows)))
        self.residual(layer, "post_ffn_norm", d_full)

    def logits(self) -> None:
        """Rows out_rows[k], k < n_out: this node's vocabulary rows of their logits, then to node 0 (row by
        row: whole, or the `top` best); a step without wanted rows (a prompt chunk before the last) sends none."""
        b, c, part = self.b, self.c, self.part
        n_out = self.out_rows()
        vl = self.v1 - self.v0
        self.product(self.spec.output_type, self.thread_ptr("output"), self.h_t, self.xq_t, self.ptr("logits"), vl,
                     c.dim, n_out, vl)
        self.barrier()
        with b.if_then(b.icmp_signed("==", self.tid, i64(0))):
            t0 = self.now_ns()
            top = self.scalar("top")
            everything = b.icmp_signed("==", top, i64(0))
            vl_of = lambda node: part.vocab_rows[node][1] - part.vocab_rows[node][0]  # noqa: E731
            count = lambda node: b.select(b.icmp_signed("<", top, i64(vl_of(node))), top, i64(vl_of(node)))  # noqa: E731
            with for_range(b, i64(0), n_out, name="lx") as k:
                local = self.row(self.ptr("logits"), k, vl * 4)
                cands = self.row(self.ptr("cands"), k, part.n_nodes * MAX_TOP * 8)
                if self.me == 0:  # node 0's own slice is always whole; the others' whole or their best
                    full = self.row(self.ptr("logits_full"), k, c.vocab_size * 4)
                    self.copy(full, local, i64(vl * 4))
                    for peer in range(1, part.n_nodes):
                        with b.if_else(everything) as (whole, best):
                            with whole:
                                v0 = part.vocab_rows[peer][0]
                                self.transfer(self.recv, peer, gep(b, full, i64(v0 * 4)), i64(vl_of(peer) * 4),
                                              MSG_WAITALL)
                            with best:
                                self.transfer(self.recv, peer, gep(b, cands, i64(peer * MAX_TOP * 8)),
                                              b.mul(count(peer), i64(8)), MSG_WAITALL)
                else:
                    with b.if_else(everything) as (whole, best):
                        with whole:
                            self.transfer(self.send, 0, local, i64(vl * 4), MSG_NOSIGNAL)
                        with best:
                            mine = gep(b, cands, i64(self.me * MAX_TOP * 8))
                            self.call(Op.TOP_K, local, vl, count(self.me), self.v0, mine)
                            self.transfer(self.send, 0, mine, b.mul(count(self.me), i64(8)), MSG_NOSIGNAL)
            slot = gep(b, self.table, i64(self.slots["sync_ns"]), I64)
            b.store(b.add(b.load(slot, typ=I64), b.sub(self.now_ns(), t0)), slot)
        self.barrier()
