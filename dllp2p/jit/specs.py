"""What a kernel is: a frozen KernelSpec, its name (spelling its types) and its argument signature.

Buffer shapes per kernel (k % 32 == 0 for quantized kernels; rows as in layout.PackedMatrix; r0 % 16 == 0;
a row range [r0, r1) lets threads split the rows; all ints are i64, scalars f32):

    quantize_f32_q8s(x f32[n, k], out u8[n, act_bytes(k)], k, n)
    quantize_f32_q8_0(x f32[n, k], out u8[n, q8_0_bytes(k)], k, n)        ggml Q8_0 blocks (f16 d, 32 i8)
    add_q8_0_f32(x f32[n, k] in place, q u8[n, q8_0_bytes(k)], k, n)       x += dequantized q
    matvec_{w}_q8s(w packed, x u8[act_bytes(k)], y f32[rows], k, r0, r1)    w: q4_0 q4_1 q8_0 q5_0 q5_1
                                                          q4_k q5_k q6_k iq4_nl iq4_xs (k % 256 == 0 for the
                                                          K-quants and iq4_xs)
    matvec_{f32,f16}_f32(w f32/f16[rows, k], x f32[k], y f32[rows], k, r0, r1)        k % 16 == 0
    matmul_{w}_q8s_x{T}(w packed, x u8[n, act_bytes(k)], y f32[n, ldy], k, r0, r1, n, ldy)
    embed_{w}(w packed or f32/f16[rows, k], token, out f32[k], k)                  one row, dequantized
    rmsnorm_f32(x f32[n], w f32[n], out f32[n], n, eps)             out = x * w / sqrt(mean(x^2) + eps)
    rope_f32(x f32[n_heads, head_dim] in place, table f32[ctx, rope_dim/2, 2], pos, n_heads, head_dim, rope_dim)
    attention_f16kv(q f32[n_heads, hd], kc f16[ctx, n_kv, hd], vc f16[ctx, n_kv, hd], out f32[n_heads, hd],
                    stats f32[n_heads, 2], scratch f32[n_heads, ctx], t0, t1, n_heads, n_kv, hd, ctx, h0, h1)
                    hd % 16 == 0, heads [h0, h1), positions [t0, t1): one span's softmax partial,
                    s_t = q[h] . kc[t, h // (n_heads / n_kv)] / sqrt(hd), m = max s_t, e_t = exp(s_t - m),
                    out[h] = sum e_t vc[t, same], stats[h] = (m, sum e_t); the KV cache is f16 (half the
                    memory), widened to f32 as it is read
    attention_merge(po f32[n_spans, n_heads, hd], st f32[n_spans, n_heads, 2], out f32[n_heads, hd],
                    n_spans, n_heads, hd, h0, h1)  out[h] = softmax attention from the spans' partials
    silu_mul_f32(gate f32[n], up f32[n], out f32[n], n)               out = gate * sigmoid(gate) * up
    gelu_tanh_mul_f32(gate f32[n], up f32[n], out f32[n], n)  out = gelu_tanh(gate) * up (Gemma's FFN)
    add_f32(x f32[n] in place, y f32[n], n)                           x += y (also: a bias row)
    scale_f32(x f32[n] in place, n, s)                                x *= s
    to_f16(x f32[n], out f16[n], n)                                   round to nearest even (numpy astype)
    top_k_f32(x f32[n], n, k, base, out u8[k, 8])       the k largest x (1 <= k <= n), largest first, equal
                    values by lower index first (numpy's stable argsort of -x): (f32 value, i32 index + base)
    barrier_wait(state i64[8] (ir_barrier.py: count, generation, sleepers, spins, ...), n_threads)
    barrier_demo(state i64[8], buf i64[n_phases, n_threads], n_threads, tid, n_phases)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..formats.quant import QType
from .irutil import Signature

QUANT_WEIGHTS = (QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K,
                 QType.IQ4_NL, QType.IQ4_XS)
FLOAT_WEIGHTS = (QType.F32, QType.F16)


class Op(enum.Enum):
    QUANTIZE = "quantize"
    QUANTIZE_PART = "quantize_part"
    QUANTIZE_Q8_0 = "quantize_q8_0"
    ADD_Q8_0 = "add_q8_0"
    MATVEC = "matvec"
    MATMUL = "matmul"
    EMBED = "embed"
    RMSNORM = "rmsnorm"
    ROPE = "rope"
    ATTENTION = "attention"
    ATTENTION_MERGE = "attention_merge"
    SILU_MUL = "silu_mul"
    GELU_TANH_MUL = "gelu_tanh_mul"
    SCALE = "scale"
    ADD = "add"
    TO_F16 = "to_f16"
    TOP_K = "top_k"
    BARRIER = "barrier"
    BARRIER_DEMO = "barrier_demo"


def _sig(spec: str) -> Signature:
    """'w:p x:p k:i' -> Signature."""
    return Signature(tuple(tuple(a.split(":")) for a in spec.split()))  # type: ignore[misc]


_SIGNATURES = {
    Op.QUANTIZE: _sig("x:p out:p k:i n:i"),
    Op.QUANTIZE_PART: _sig("x:p out:p k:i b0:i b1:i"),
    Op.QUANTIZE_Q8_0: _sig("x:p out:p k:i n:i"),
    Op.ADD_Q8_0: _sig("x:p q:p k:i n:i"),
    Op.MATVEC: _sig("w:p x:p y:p k:i r0:i r1:i"),
    Op.MATMUL: _sig("w:p x:p y:p k:i r0:i r1:i n:i ldy:i"),
    Op.EMBED: _sig("w:p token:i out:p k:i"),
    Op.RMSNORM: _sig("x:p w:p out:p n:i eps:f"),
    Op.ROPE: _sig("x:p table:p pos:i n_heads:i head_dim:i rope_dim:i"),
    Op.ATTENTION: _sig("q:p kc:p vc:p out:p stats:p scratch:p t0:i t1:i n_heads:i n_kv:i hd:i ctx:i h0:i h1:i"),
    Op.ATTENTION_MERGE: _sig("po:p st:p out:p n_spans:i n_heads:i hd:i h0:i h1:i"),
    Op.SILU_MUL: _sig("gate:p up:p out:p n:i"),
    Op.GELU_TANH_MUL: _sig("gate:p up:p out:p n:i"),
    Op.SCALE: _sig("x:p n:i s:f"),
    Op.ADD: _sig("x:p y:p n:i"),
    Op.TO_F16: _sig("x:p out:p n:i"),
    Op.TOP_K: _sig("x:p n:i k:i base:i out:p"),
    Op.BARRIER: _sig("state:p n_threads:i"),
    Op.BARRIER_DEMO: _sig("state:p buf:p n_threads:i tid:i n_phases:i"),
}


@dataclass(frozen=True)
class KernelSpec:
    op: Op
    qtype: QType | None = None  # weight type: MATVEC, MATMUL, EMBED
    tile: int = 1  # activation rows per pass over the weights: MATMUL

    def __post_init__(self) -> None:
        needs_w = self.op in (Op.MATVEC, Op.MATMUL, Op.EMBED)
        if needs_w != (self.qtype is not None):
            raise ValueError(f"{self.op.name} {'needs' if needs_w else 'takes no'} weight type")
        allowed = {Op.MATVEC: QUANT_WEIGHTS + FLOAT_WEIGHTS, Op.MATMUL: QUANT_WEIGHTS, Op.EMBED: QUANT_WEIGHTS + FLOAT_WEIGHTS}
        if needs_w and self.qtype not in allowed[self.op]:
            raise ValueError(f"no {self.op.name} kernel for {self.qtype.name} weights")
        if self.op == Op.MATMUL and not 1 <= self.tile <= 8:
            raise ValueError(f"matmul tile {self.tile} outside 1..8")

    @property
    def name(self) -> str:
        w = self.qtype.name.lower() if self.qtype is not None else ""
        if self.op == Op.QUANTIZE:
            return "quantize_f32_q8s"
        if self.op == Op.QUANTIZE_PART:
            return "quantize_part_f32_q8s"
        if self.op == Op.QUANTIZE_Q8_0:
            return "quantize_f32_q8_0"
        if self.op == Op.MATVEC:
            return f"matvec_{w}_{'q8s' if self.qtype in QUANT_WEIGHTS else 'f32'}"
        if self.op == Op.MATMUL:
            return f"matmul_{w}_q8s_x{self.tile}"
        if self.op == Op.EMBED:
            return f"embed_{w}"
        if self.op in (Op.BARRIER, Op.BARRIER_DEMO):
            return {Op.BARRIER: "barrier_wait", Op.BARRIER_DEMO: "barrier_demo"}[self.op]
        if self.op == Op.ATTENTION:
            return "attention_f16kv"
        if self.op == Op.ATTENTION_MERGE:
            return "attention_merge"
        if self.op == Op.TO_F16:
            return "to_f16"
        return f"{self.op.value}_f32"

    @property
    def signature(self) -> Signature:
        return _SIGNATURES[self.op]


def all_specs(matmul_tile: int = 4) -> tuple[KernelSpec, ...]:
    """Every kernel this package offers, for compiling as one module."""
    specs = [KernelSpec(Op.QUANTIZE), KernelSpec(Op.QUANTIZE_PART), KernelSpec(Op.QUANTIZE_Q8_0), KernelSpec(Op.ADD_Q8_0)]
    specs += [KernelSpec(Op.MATVEC, q) for q in QUANT_WEIGHTS + FLOAT_WEIGHTS]
    specs += [KernelSpec(Op.MATMUL, q, matmul_tile) for q in QUANT_WEIGHTS]
    specs += [KernelSpec(Op.EMBED, q) for q in QUANT_WEIGHTS + FLOAT_WEIGHTS]
    specs += [KernelSpec(op) for op in (Op.RMSNORM, Op.ROPE, Op.ATTENTION, Op.ATTENTION_MERGE, Op.SILU_MUL,
                                        Op.GELU_TANH_MUL, Op.SCALE, Op.ADD, Op.TO_F16, Op.TOP_K, Op.BARRIER, Op.BARRIER_DEMO)]
    return tuple(specs)
