"""The attention part of the compiled forward (program.py's _Forward inherits it; tp_program's too): each row
of a step against its own sequence's slot of the f16 KV cache, cut into spans of ATT_SPLIT positions.

The KV cache, per layer: K and V f16[max_seqs, n_kv, ctx, hd], a slot (sequence) at cache row row_kv[i] = slot
x ctx, head-major within it (`kv_head`): attention takes one KV head's positions at a time, so it reads them as
one run. With a position's heads side by side (f16[ctx, n_kv, hd], before) each call read 128 of every 384
bytes of SmolLM2's rows: ~100-110 ns per position, layer and row from memory against ~35 ns in cache (README,
continuous batching).

Work items: one row (a decode step) shares out (span, KV group) pairs, each span's partial into the shared
att_po / att_st, then merges them by head after a barrier; several rows share out (row, KV group) pairs, a
pair's spans one after the other into the thread's private attp_t, then its merge. Both paths make exactly
the same attention calls per span (`span_partial`), so a row's result depends neither on the path nor on the
thread count. As an item starts, the thread prefetches the first ATT_NEXT_PREFETCH positions of the next
item's K and V (ir_attention.prefetch_positions): the kernel's own prefetch, ATT_PREFETCH positions ahead of
what it reads, leaves a call's first lines to wait on memory; for the same reason a row's next span's first
positions are prefetched before each span (several rows).
"""

from __future__ import annotations

import llvmlite.ir as ir

from ..formats import ModelConfig
from .ir_attention import ATT_SPLIT, prefetch_positions
from .ir_share import chunk_units
from .irutil import for_range, gep, i64
from .layout import act_bytes
from .specs import Op


def max_spans(ctx: int) -> int:
    """Attention spans (ATT_SPLIT positions each) a row at the last position of a ctx-long cache has."""
    return -(-ctx // ATT_SPLIT)


def span_partial_bytes(c: ModelConfig) -> int:
    """Bytes of one span's attention partials for all heads: out f32[n_heads, hd] then stats f32[n_heads, 2]
    (att_po and att_st hold max_spans of each, shared; attp_t one such pair of arrays per thread)."""
    return (c.q_dim + 2 * c.n_heads) * 4


class AttentionSteps:
    """Emits the attention of a step's rows; mixed into program._Forward, whose b, c, n, ctx, tid, scratch,
    ptr, at, row, call, barrier, share and items it uses."""

    att_exchanged = False  # (tp_program) a node exchanges attention's output: it quantizes it itself

    def att_quantized_by_groups(self, nq: int, nkv: int) -> bool:
        """Whether attention_rows quantizes each (row, KV group) pair's output into the shared `aq` as it ends
        (a group's heads a whole number of 32-value blocks): then no thread re-reads and re-quantizes all of att."""
        return (nq // nkv) * self.c.head_dim % 32 == 0 and not self.att_exchanged

    def seq_cache(self, cache: ir.Value, i: ir.Value, kvd: int) -> ir.Value:
        """Chunk row i's sequence's slot of a layer's f16 KV cache, f16[n_kv, ctx, hd] (kvd = n_kv * hd)."""
        return self.row(cache, self.at("row_kv", i), kvd * 2)

    def kv_head(self, slot: ir.Value, g: ir.Value | int) -> ir.Value:
        """KV head g's f16[ctx, hd] in a slot (head-major: see the module docstring)."""
        b = self.b
        return gep(b, slot, b.mul(b.mul(i64(g) if isinstance(g, int) else g, self.ctx), i64(self.c.head_dim * 2)))

    def first_position(self, p: ir.Value, window: int) -> ir.Value:
        """The first position a row at p attends to: 0, or max(0, p - window + 1) in a sliding layer."""
        if not window:
            return i64(0)
        lo = self.b.sub(p, i64(window - 1))
        return self.b.select(self.b.icmp_signed(">", lo, i64(0)), lo, i64(0))

    def n_spans(self, p: ir.Value, lo: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(first span, number of spans) of a row at p attending to [lo, p]: spans lo // ATT_SPLIT .. p // ATT_SPLIT."""
        b = self.b
        j0 = b.sdiv(lo, i64(ATT_SPLIT))
        return j0, b.sub(b.add(b.sdiv(p, i64(ATT_SPLIT)), i64(1)), j0)

    def span_range(self, j: ir.Value, p: ir.Value, lo: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Positions [t0, t1) of span j of a row at p attending to [lo, p]."""
        b = self.b
        start = b.mul(j, i64(ATT_SPLIT))
        end, last = b.add(start, i64(ATT_SPLIT)), b.add(p, i64(1))
        return b.select(b.icmp_signed(">", lo, start), lo, start), b.select(b.icmp_signed("<", end, last), end, last)

    def span_partial(self, qrow: ir.Value, kc: ir.Value, vc: ir.Value, po: ir.Value, st: ir.Value, j: ir.Value,
                     p: ir.Value, grp: ir.Value, nq: int, nkv: int, lo: ir.Value, j0: ir.Value) -> None:
        """Span j's partials, for the heads of (local) KV group grp, of the row at position p attending to [lo, p]
        -> slots j - j0 of po, st. Both attention paths make exactly these calls, so a row's result does not depend
        on the path. kc, vc: the row's slots; the kernel sees the group alone (its heads, one KV head: kv_head)."""
        b, hd = self.b, self.c.head_dim
        gs = nq // nkv  # local query heads per local KV head (a share of a group when KV is replicated)
        t0, t1 = self.span_range(j, p, lo)
        h0 = b.mul(grp, i64(gs))
        slot = b.sub(j, j0)
        out = gep(b, self.row(po, slot, nq * hd * 4), b.mul(h0, i64(hd * 4)))
        stats = gep(b, self.row(st, slot, nq * 8), b.mul(h0, i64(8)))
        self.call(Op.ATTENTION, gep(b, qrow, b.mul(h0, i64(hd * 4))), self.kv_head(kc, grp), self.kv_head(vc, grp),
                  out, stats, self.scratch, t0, t1, gs, 1, hd, self.ctx, 0, gs)

    def prefetch_next(self, item: ir.Value, total: ir.Value, where) -> None:
        """If item + 1 < total: prefetch the start of that item's K and V; where(item + 1) -> (K slot, V slot,
        KV group, t0, t1) of it."""
        b = self.b
        nx = b.add(item, i64(1))
        with b.if_then(b.icmp_signed("<", nx, total)):
            kc, vc, g, t0, t1 = where(nx)
            prefetch_positions(b, self.kv_head(kc, g), self.kv_head(vc, g), t0, t1, self.c.head_dim)

    def attention_spans(self, kc: ir.Value, vc: ir.Value, nq: int, nkv: int, window: int) -> None:
        """One row (a decode step): the threads share out (span, KV group) pairs into att_po / att_st, then merge by head."""
        b, kvd = self.b, nkv * self.c.head_dim
        po, st = self.ptr("att_po"), self.ptr("att_st")
        pos = self.at("row_pos", i64(0))
        kc, vc = self.seq_cache(kc, i64(0), kvd), self.seq_cache(vc, i64(0), kvd)
        lo = self.first_position(pos, window)
        j0, n_spans = self.n_spans(pos, lo)
        pair = lambda item: (b.add(j0, b.sdiv(item, i64(nkv))), b.srem(item, i64(nkv)))  # noqa: E731
        total = b.mul(n_spans, i64(nkv))
        with self.items(total, "span") as item:
            self.prefetch_next(item, total, lambda nx: (kc, vc, pair(nx)[1], *self.span_range(pair(nx)[0], pos, lo)))
            j, grp = pair(item)
            self.span_partial(self.ptr("q"), kc, vc, po, st, j, pos, grp, nq, nkv, lo, j0)
        self.barrier()
        with self.share(nq, chunk_units(nq)) as (ha, hb):
            self.call(Op.ATTENTION_MERGE, po, st, self.ptr("att"), n_spans, nq, self.c.head_dim, ha, hb)

    def attention_rows(self, kc: ir.Value, vc: ir.Value, nq: int, nkv: int, window: int) -> None:
        """Several rows (a prompt chunk, or rows of several sequences, each against its own slot): the threads share
        out the (row, KV group) pairs; a pair's spans go one after the other into private attp_t, then merge."""
        b, c = self.b, self.c
        qd, gs, kvd = nq * c.head_dim, nq // nkv, nkv * c.head_dim
        spans = b.sdiv(b.add(self.ctx, i64(ATT_SPLIT - 1)), i64(ATT_SPLIT))  # max_spans(ctx)
        po = gep(b, self.ptr("attp_t"), b.mul(self.tid, b.mul(spans, i64(span_partial_bytes(c)))))
        st = gep(b, po, b.mul(spans, i64(c.q_dim * 4)))

        def where(item: ir.Value) -> tuple[ir.Value, ...]:  # (K slot, V slot, group, first position, end) of a pair
            i, p = b.sdiv(item, i64(nkv)), self.at("row_pos", b.sdiv(item, i64(nkv)))
            return (self.seq_cache(kc, i, kvd), self.seq_cache(vc, i, kvd), b.srem(item, i64(nkv)),
                    self.first_position(p, window), b.add(p, i64(1)))

        total = b.mul(self.n, i64(nkv))
        with self.items(total, "att") as item:
            self.prefetch_next(item, total, where)
            i, grp = b.sdiv(item, i64(nkv)), b.srem(item, i64(nkv))
            p = self.at("row_pos", i)
            lo = self.first_position(p, window)
            j0, n_spans = self.n_spans(p, lo)
            qrow = self.row(self.ptr("q"), i, qd * 4)
            kci, vci = self.seq_cache(kc, i, kvd), self.seq_cache(vc, i, kvd)
            with for_range(b, j0, b.add(j0, n_spans), name="sp") as j:
                jn = b.add(j, i64(1))
                with b.if_then(b.icmp_signed("<", jn, b.add(j0, n_spans))):  # the next span's first positions
                    prefetch_positions(b, self.kv_head(kci, grp), self.kv_head(vci, grp), *self.span_range(jn, p, lo),
                                       self.c.head_dim)
                self.span_partial(qrow, kci, vci, po, st, j, p, grp, nq, nkv, lo, j0)
            h0 = b.mul(grp, i64(gs))
            self.call(Op.ATTENTION_MERGE, po, st, self.row(self.ptr("att"), i, qd * 4), n_spans, nq, c.head_dim,
                      h0, b.add(h0, i64(gs)))
            if self.att_quantized_by_groups(nq, nkv):  # the group's blocks of row i's quantized att (shared aq)
                blocks = gs * c.head_dim // 32
                self.call(Op.QUANTIZE_PART, self.row(self.ptr("att"), i, qd * 4), self.row(self.ptr("aq"), i, act_bytes(qd)),
                          qd, b.mul(grp, i64(blocks)), b.mul(b.add(grp, i64(1)), i64(blocks)))
