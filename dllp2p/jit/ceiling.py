"""The ceiling on the N-stream speed-up that this CPU's arithmetic sets (issue 18): what an N-row decode step's
multiply-adds cost at the peak rates measured on this machine, now, against the one-stream step measured in the
same run. `python -m dllp2p.jit.batchbench --ceiling` prints it beside the measured speed-up.

An N-row step (one decode token for each of N sequences) does at least:
  - every weight matrix's products with the N rows: rows x k x N multiply-adds per matrix, at the rate of the
    tiles' arithmetic alone for its type (bench_tiles.tile_ops: the dots with the block scales' multiplies and
    multiply-adds, which share the dot pipes), measured on `threads` threads at once;
  - attention in f32 against the f16 KV cache: per row, layer and query head, 2 x head_dim multiply-adds per
    attended position (q . k_t, then e_t v_t), at the rate of a loop of independent 16-lane f32 multiply-adds.
That is all it counts: no memory traffic, norms, quantizing, RoPE, exponentials or barriers. Every term is
linear in N, so with row_floor the cost of one row's,
    N x row_floor  <=  any engine's N-row step on this machine, and
    ceiling = (one-stream step) / row_floor  >=  any N-stream speed-up over that one stream, whatever N.
A target above the ceiling is out of physical reach in that run. The one-stream step is the run's own (paired
round by round in batchbench), so the ceiling moves with the machine: a VM whose memory is fast in a quiet minute
makes the one-stream step short while the arithmetic stays what it is.

Types: Q4_1 takes its own mix; Q4_0 and Q8_0 (one multiply and one multiply-add a block and row, like Q8_0's tile)
take Q8_0's; any other quantized type the pure dot peak (fewer operations than its real mix: the floor only gets
lower, the ceiling stays a true upper bound); F32 / F16 matrices count as f32 multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..formats import ModelConfig
from ..formats.gguf_model import expected_shapes
from ..formats.quant import QType
from .bench_tiles import CHAINS, DEPTH, MACS_PER_DOT, peak_function, peak_macs, tile_ops
from .program import LAYER_MATRICES, ProgramSpec

FLOAT_TYPES = (QType.F32, QType.F16)
Q8_0_LIKE = (QType.Q4_0, QType.Q8_0)  # the tiles' arithmetic per block and row: one multiply, one multiply-add
FMA_OPS = 48  # 16-lane f32 multiply-adds per iteration of the float peak loop


@dataclass(frozen=True)
class StepWork:
    """The multiply-adds of one decode step of `rows` rows: by weight type (matrix products), and attention's f32."""

    rows: int
    macs: Mapping[QType, int]  # weight type -> multiply-adds of all matrices of that type
    attention_fmas: float  # f32 multiply-adds of q . k and e v over the attended positions (a mean)


@dataclass(frozen=True)
class Rates:
    """Multiply-adds per second on `threads` threads at once: per weight type's tile arithmetic, and f32."""

    threads: int
    macs_per_s: Mapping[QType, float]
    fma_per_s: float


def attended(c: ModelConfig, layer: int, position: int) -> int:
    """Positions a row at `position` attends to in `layer`: position + 1, or at most the sliding window."""
    return min(position + 1, c.sliding_window) if c.is_sliding(layer) else position + 1


def step_work(spec: ProgramSpec, rows: int, positions: Sequence[int]) -> StepWork:
    """The multiply-adds of a decode step of `rows` rows over all layers and the output projection, attention's
    averaged over steps at each of `positions` (every row at that position)."""
    c = spec.config
    shapes = expected_shapes(c)  # the model file's tensors, (rows, k) for y = W x
    macs: dict[QType, int] = {}
    for layer in spec.run_layers:
        for name, qtype in zip(LAYER_MATRICES, spec.layer_types[layer]):
            r, k = shapes[f"blk.{layer}.{name}.weight"]
            macs[qtype] = macs.get(qtype, 0) + r * k * rows
    if spec.emits_logits:
        r, k = shapes["token_embd.weight"]  # the output projection's shape, tied or not
        macs[spec.output_type] = macs.get(spec.output_type, 0) + r * k * rows
    seen = sum(attended(c, layer, p) for p in positions for layer in spec.run_layers) / len(positions)
    return StepWork(rows, macs, rows * c.n_heads * 2 * c.head_dim * seen)


def _loop(qtype: QType) -> tuple[str, dict[str, int] | None, int, float]:
    """The peak loop that stands for a weight type's products: (its name, peak_function's ops, the ops an
    iteration that peak_macs counts, multiply-adds per counted op over MACS_PER_DOT)."""
    if qtype in FLOAT_TYPES:
        return "fma", {"fma": FMA_OPS}, FMA_OPS, 16 / MACS_PER_DOT
    if qtype in (QType.Q4_1, *Q8_0_LIKE):
        ops = tile_ops(qtype if qtype == QType.Q4_1 else QType.Q8_0)
        return ("Q4_1" if qtype == QType.Q4_1 else "Q8_0"), ops, ops["dot"], 1.0
    return "dot", None, CHAINS * DEPTH, 1.0


def measure_rates(types: Iterable[QType], threads: int, iterations: int = 1_000_000) -> Rates:
    """The peak rates, measured now with `threads` threads running each loop at once (the sum of their rates,
    bench_tiles.peak_macs): per weight type its loop (_loop), and the f32 multiply-adds' for attention."""
    loops = {q: _loop(q) for q in set(types) | {QType.F32}}
    measured: dict[str, float] = {}
    for name, ops, counted, scale in loops.values():
        if name not in measured:
            fn, _compiled = peak_function(ops)
            measured[name] = sum(peak_macs(fn, threads, iterations, counted)) * scale
    return Rates(threads, {q: measured[loop[0]] for q, loop in loops.items()}, measured["fma"])


def floor_seconds(work: StepWork, rates: Rates) -> float:
    """Seconds of the step's multiply-adds at the peak rates: a lower bound on any engine's step on this machine."""
    return sum(n / rates.macs_per_s[q] for q, n in work.macs.items()) + work.attention_fmas / rates.fma_per_s


def ceiling(one_stream_step_s: float, row_floor_s: float) -> float:
    """The most N streams can give over one stream whose step takes one_stream_step_s, for any N: N rows cost at
    least N x row_floor_s (floor_seconds of a 1-row StepWork), so N x one_stream_step_s / (N x row_floor_s)."""
    return one_stream_step_s / row_floor_s


def row_floor(spec: ProgramSpec, threads: int, positions: Sequence[int]) -> tuple[Rates, float]:
    """This CPU's peak rates for spec's weight types, measured now on `threads` threads, and what one row's
    multiply-adds cost at them per decode step over `positions` (seconds, the mean over those positions)."""
    rates = measure_rates({q for types in spec.layer_types for q in types} | {spec.output_type}, threads)
    return rates, floor_seconds(step_work(spec, 1, positions), rates)
