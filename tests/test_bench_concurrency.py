"""`dllp2p bench --concurrency N`'s run with llama.cpp beside ours (bench_concurrency.run): the order the runs
alternate in, the figures the report derives from them, when llama.cpp runs at all; and, where llama-cpp-python
is installed, its batch adapter (commands/bench_llama.LlamaCppBatch) on a random-weight GGUF."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

from dllp2p import bench, bench_concurrency
from dllp2p.bench_concurrency import ConcurrencyConfig
from dllp2p.engine import BatchRow, SoloBatch
from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.reference import ReferenceEngine

SPEC = SyntheticSpec(n_layers=1, dim=64, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=320)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("bench-concurrency") / "random.gguf", SPEC)


def solo_batch(model, ctx: int, n: int) -> SoloBatch:
    """The slow, obvious batch engine over the numpy reference, standing in for ours or for llama.cpp."""
    return SoloBatch(lambda: ReferenceEngine(model, ctx), n)


def test_llama_cpp_runs_alternate_with_ours_and_give_ratios(model_path, monkeypatch):
    model = load_model(model_path)
    ours, theirs = solo_batch(model, 64, 3), solo_batch(model, 64, 3)
    theirs.version = "fake"
    monkeypatch.setattr(bench_concurrency, "jit_batch_engine", lambda m, ctx, threads, n, cache: ours)
    log: list[tuple[str, int, int]] = []
    real = bench_concurrency.decode_run

    def spy(engine, prompts, tokens, ctx, groups=1):
        log.append(("ours" if engine is ours else "llama", len(prompts), tokens))
        return real(engine, prompts, tokens, ctx, groups)

    monkeypatch.setattr(bench_concurrency, "decode_run", spy)
    made = []

    def factory(path, ctx, threads, max_seqs, kv_bytes):
        made.append((ctx, threads, max_seqs, kv_bytes))
        return theirs

    cfg = ConcurrencyConfig(str(model_path), 3, 1, 6, 5, 2, 0, False, llama_cpp="auto")
    r = bench_concurrency.run(cfg, factory)
    assert made == [(11, 1, 3, ours.kv_bytes_per_position)]
    # warm-ups: ours alone and all N (full length, so the RSS before llama.cpp loads holds the N streams' KV),
    # then llama.cpp's; then each repeat: ours 1, ours N, llama.cpp 1, llama.cpp N
    assert log == [("ours", 1, 4), ("ours", 3, 5), ("llama", 1, 4), ("llama", 3, 4),
                   *[("ours", 1, 5), ("ours", 3, 5), ("llama", 1, 5), ("llama", 3, 5)] * 2]
    lc = r["llama_cpp"]
    assert lc["version"] == "fake" and len(lc["aggregate_tok_s_runs"]) == len(lc["one_stream_tok_s_runs"]) == 2
    assert lc["per_stream_tok_s"] == pytest.approx(lc["aggregate_tok_s"] / 3)
    assert lc["greedy_agree_tokens"] == 5  # the same numerics on both sides: every token agrees
    assert r["aggregate_vs_llama_cpp"] > 0 and r["one_stream_vs_llama_cpp"] > 0
    text = bench_concurrency.format_report(r)
    assert "llama.cpp    fake: 1 stream" in text and "ours / llama.cpp: aggregate x" in text


@pytest.mark.parametrize("setting,workers,expect", [
    ("off", (), False), ("on", (), True), ("auto", ("127.0.0.1:1",), False), ("off", ("127.0.0.1:1",), False),
])
def test_when_llama_cpp_runs(setting, workers, expect):
    cfg = ConcurrencyConfig(None, 2, 1, 4, 4, 1, 0, False, workers=workers, llama_cpp=setting)
    assert bench_concurrency._wants_llama_cpp(cfg) is expect


def test_llama_cpp_on_with_workers_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot run with --workers"):  # before any worker is connected
        ConcurrencyConfig(None, 2, 1, 4, 4, 1, 0, False, workers=("127.0.0.1:1",), llama_cpp="on")


def test_llama_cpp_that_fails_to_start_is_reported_or_an_error(model_path):
    def broken(*args):
        raise OSError("no such library")

    for setting in ("auto", "on"):
        cfg = ConcurrencyConfig(str(model_path), 2, 1, 4, 4, 1, 0, False, llama_cpp=setting)
        if setting == "auto":
            assert bench_concurrency._start_llama_cpp(cfg, model_path, 8, 2, 64, broken) == (
                None, "OSError: no such library")
        else:
            with pytest.raises(ValueError, match="llama.cpp could not run"):
                bench_concurrency._start_llama_cpp(cfg, model_path, 8, 2, 64, broken)


def test_the_cli_flag_reaches_the_config(monkeypatch):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    bench_concurrency.add_arguments(p)
    seen = []

    def run(cfg):
        seen.append((cfg.llama_cpp, cfg.threads))
        raise ValueError("stop here")

    monkeypatch.setattr(bench_concurrency, "run", run)
    for setting in ("off", "on"):
        ns = p.parse_args(["--concurrency", "2", "--llama-cpp", setting, "--threads", "1"])
        assert bench_concurrency.main(ns, out=io.StringIO(), err=io.StringIO()) == 1
    assert seen == [("off", 1), ("on", 1)]
    # no --threads: chosen as the daemon chooses (it was None, and the config's check raised a TypeError)
    assert bench_concurrency.main(p.parse_args(["--concurrency", "2"]), out=io.StringIO(), err=io.StringIO()) == 1
    assert isinstance(seen[-1][1], int) and seen[-1][1] >= 1
    err = io.StringIO()
    assert bench_concurrency.main(p.parse_args(["--concurrency", "2", "--threads", "0"]), out=io.StringIO(), err=err) == 1
    assert "--threads must be at least 1" in err.getvalue() and len(seen) == 3


def test_llama_cpp_batch_steps_sequences_as_alone(model_path):
    """llama.cpp's batch adapter: two sequences stepped together give each the logits it gets alone, and rewinding
    drops later positions (a rewound sequence continues as the one never rewound)."""
    pytest.importorskip("llama_cpp")
    from dllp2p.commands.bench_llama import LlamaCppBatch

    eng = LlamaCppBatch(str(model_path), 32, 1, 2, 64)
    try:
        a, b = (5, 17, 42, 9), (3, 8)
        together = eng.forward_batch([BatchRow(0, a, 0), BatchRow(1, b, 0)])
        alone_a = eng.forward_batch([BatchRow(0, a, 0)])[0]  # rewound to 0: recomputed alone
        alone_b = eng.forward_batch([BatchRow(1, b, 0)])[0]
        assert together.shape == (2, SPEC.vocab_size) and together.dtype == np.float32
        np.testing.assert_allclose(together[0], alone_a, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(together[1], alone_b, rtol=1e-3, atol=1e-3)
        step = eng.forward_batch([BatchRow(0, (11,), 4), BatchRow(1, (11,), 2)])
        eng.forward_batch([BatchRow(0, (7, 7), 4)])  # positions 4, 5 written, then dropped by the rewind
        again = eng.forward_batch([BatchRow(0, (11,), 4)])[0]
        np.testing.assert_allclose(again, step[0], rtol=1e-3, atol=1e-3)
        with pytest.raises(NotImplementedError):
            eng.copy_prefix(0, 1, 2)
    finally:
        eng.close()


def test_one_node_reports_the_ceiling_that_bounds_the_speedup(model_path, tmp_path):
    """On one node the JIT engine's run adds jit/ceiling.py's bound: one stream's step over what one row's
    multiply-adds cost at the peak rates measured in the run. No measured speed-up may pass it, no step may run
    above the peak, and it is the one-stream step of the run over that floor."""
    cfg = ConcurrencyConfig(str(model_path), 2, 1, 6, 5, 3, 0, False, cache_dir=tmp_path, llama_cpp="off")
    r = bench_concurrency.run(cfg)
    c = r["ceiling"]
    assert r["engine"] == "JITEngine" and c["row_floor_ms"] > 0
    assert r["speedup"] < c["ceiling"] and 0 < c["share_of_peak"] < 1
    assert c["ceiling"] == pytest.approx(1e3 / r["one_stream_tok_s"] / c["row_floor_ms"])
    assert c["share_of_peak"] == pytest.approx(2 * c["row_floor_ms"] / r["per_stream_ms_per_token"])
    assert f"ceiling      x{c['ceiling']:.2f} for any number of streams" in bench_concurrency.format_report(r)
