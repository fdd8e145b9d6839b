"""jit/ceiling.py (issue 18): an N-row decode step's multiply-adds counted by hand on small configurations (a
sliding-window layer, mixed weight types), the floor and ceiling arithmetic on given rates, the measured rates'
shape, and `batchbench --ceiling` end to end on a small random model (speed itself is not tested)."""

from __future__ import annotations

import json
import math

import pytest

from dllp2p.formats import ModelConfig, QType
from dllp2p.jit.ceiling import Rates, StepWork, ceiling, floor_seconds, measure_rates, step_work
from dllp2p.jit.program import ProgramSpec


def _config(**extra) -> ModelConfig:
    return ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                       vocab_size=100, context_length=256, rope_base=10000.0, rope_dim=16, norm_eps=1e-5,
                       tied_output=True, **extra)


Q41, Q80 = QType.Q4_1, QType.Q8_0


def _spec(config: ModelConfig, **extra) -> ProgramSpec:
    # layer 0 all Q4_1; layer 1 Q4_1 but ffn_down Q8_0 (LAYER_MATRICES order: q, k, v, output, gate, up, down)
    return ProgramSpec(config, ((Q41,) * 7, (Q41,) * 6 + (Q80,)), Q80, Q80, **extra)


def test_step_work_counts_each_matrix_and_attended_position():
    # per row and layer: q 64x64, k 32x64, v 32x64, output 64x64, gate 128x64, up 128x64, down 64x128
    q, k, v, o, gate, up, down = 4096, 2048, 2048, 4096, 8192, 8192, 8192
    per_layer = q + k + v + o + gate + up + down
    work = step_work(_spec(_config()), 3, [5, 6])
    assert work.rows == 3
    assert work.macs == {Q41: 3 * (2 * per_layer - down), Q80: 3 * (down + 100 * 64)}  # + the output projection
    # attention: rows x heads x 2 x head_dim per attended position; rows at 5 and 6 see 6 and 7 positions a layer
    assert work.attention_fmas == 3 * 4 * 2 * 16 * (2 * 6 + 2 * 7) / 2


def test_step_work_caps_sliding_layers_and_skips_logits_of_a_stage():
    c = _config(sliding_window=4, sliding_layers=(True, False))
    work = step_work(_spec(c), 1, [5, 6])
    assert work.attention_fmas == 4 * 2 * 16 * ((4 + 6) + (4 + 7)) / 2  # layer 0 sees at most 4 positions
    stage = step_work(_spec(c, layers=(1, 2), emits_logits=False), 2, [0])
    assert stage.macs == {Q41: 2 * (4096 + 2048 + 2048 + 4096 + 8192 + 8192), Q80: 2 * 8192}
    assert stage.attention_fmas == 2 * 4 * 2 * 16 * 1


def test_floor_and_ceiling_arithmetic():
    work = StepWork(2, {Q41: 3_000, Q80: 1_000}, 500.0)
    rates = Rates(2, {Q41: 1_000.0, Q80: 500.0}, 250.0)
    assert floor_seconds(work, rates) == pytest.approx(3 + 2 + 2)
    assert ceiling(3.5, 0.5) == 7.0


def test_measured_rates_cover_every_type():
    """Q4_1 its own loop, Q4_0 Q8_0's, other quantized types the dot loop, floats the f32 loop (positive, finite)."""
    rates = measure_rates([QType.Q4_1, QType.Q4_0, QType.Q8_0, QType.Q6_K, QType.F16], threads=1, iterations=20_000)
    assert rates.threads == 1 and set(rates.macs_per_s) == {QType.Q4_1, QType.Q4_0, QType.Q8_0, QType.Q6_K,
                                                            QType.F16, QType.F32}
    assert rates.macs_per_s[QType.Q4_0] == rates.macs_per_s[QType.Q8_0]  # one measurement stands for both
    assert rates.macs_per_s[QType.F16] == rates.macs_per_s[QType.F32] == rates.fma_per_s
    assert all(0 < r < math.inf for r in rates.macs_per_s.values())


def test_batchbench_prints_the_ceiling(tmp_path, capsys, monkeypatch):
    from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
    from dllp2p.jit import batchbench

    monkeypatch.setenv("HOME", str(tmp_path))  # its JIT code cache (~/.cache/dllp2p/jit) is the test's own

    path = write_random_llama(tmp_path / "random.gguf", SyntheticSpec(qtype=QType.Q4_1, n_kv_heads=2, n_layers=2,
                                                                      dim=128, n_heads=4, ffn_dim=256, vocab_size=320))
    args = ["--model", str(path), "--threads", "1", "--concurrency", "1", "2", "--tokens", "2", "--prompt-tokens", "4",
            "--rounds", "2", "--ctx", "16", "--ceiling"]
    assert batchbench.main(args + ["--json"]) == 0
    c = json.loads(capsys.readouterr().out)["ceiling"]
    assert c["row_floor_ms"] > 0 and c["ceiling"] > 0 and set(c["by_streams"]) == {"2"}
    assert c["by_streams"]["2"]["share_of_peak"] > 0 and {"Q4_1"} <= set(c["macs_per_s"])
    assert batchbench.main(args) == 0
    assert "for any number of streams" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the one-stream steps it compares with must be measured
        batchbench.main(args[:5] + ["2", "--ceiling"])
