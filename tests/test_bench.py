"""`dllp2p bench` on a tiny random-weight model (reference engine), and the bandwidth kernel on a small buffer."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from dllp2p import bench
from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit.membw import STEP, measure_bandwidth

TINY = SyntheticSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300)
KEYS = {
    "threads", "decode_tok_s", "prefill_tok_s", "bytes_per_token", "bandwidth_gb_s", "roofline_pct", "roofline_tok_s",
    "startup_s", "decode_tok_s_runs", "prefill_tok_s_runs", "bandwidth_gb_s_runs", "llama_cpp",
}
FAST = ["--engine", "reference", "--prompt-tokens", "12", "--tokens", "5", "--repeats", "3", "--threads", "2",
        "--bandwidth-mib", "8", "--llama-cpp", "off"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("bench") / "tiny.gguf", TINY)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = bench.main(parse(argv), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_json_report_has_the_keys(tiny_path):
    rc, out, err = run_main(["--model", str(tiny_path), *FAST, "--json"])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    r = json.loads(out)
    assert KEYS <= r.keys()
    assert r["threads"] == 2 and r["llama_cpp"] is None
    assert len(r["decode_tok_s_runs"]) == len(r["prefill_tok_s_runs"]) == 3
    assert r["decode_tok_s"] == pytest.approx(float(np.median(r["decode_tok_s_runs"])))
    assert r["prefill_tok_s"] == pytest.approx(float(np.median(r["prefill_tok_s_runs"])))
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["bandwidth_gb_s"] > 0
    assert r["bytes_per_token"] == bench.weight_bytes_per_token(load_model(tiny_path))
    assert r["bytes_per_token_source"] == "model"  # the reference engine has no weight_bytes_per_token
    assert r["roofline_tok_s"] == pytest.approx(r["bandwidth_gb_s"] * 1e9 / r["bytes_per_token"])
    assert r["roofline_pct"] == pytest.approx(100 * r["decode_tok_s"] / r["roofline_tok_s"])
    assert 0 < r["startup_s"] < 60


def test_text_report(tiny_path):
    rc, out, err = run_main(["--model", str(tiny_path), *FAST])
    assert rc == 0, err
    for word in ("prefill", "decode", "MB per token", "GB/s", "roofline", "llama.cpp  not run"):
        assert word in out, out


def test_bandwidth_can_be_skipped(tiny_path):
    rc, out, err = run_main(["--model", str(tiny_path), *FAST, "--bandwidth-mib", "0", "--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["bandwidth_gb_s"] is None and r["roofline_pct"] is None


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--prompt-tokens", "5000"], "exceeds the model's context"),
        (["--model", "/nonexistent/model.gguf"], "cannot open"),
    ],
)
def test_bad_input_is_one_line(tiny_path, args, fragment):
    rc, out, err = run_main(["--model", str(tiny_path), *FAST, *args])
    assert rc == 1 and out == ""
    assert err.startswith("dllp2p: error:") and fragment in err and err.count("\n") == 1, err


def test_weight_bytes_per_token_counts_layers_and_output(tmp_path):
    for tied in (False, True):
        spec = SyntheticSpec(**{**TINY.__dict__, "tied_output": tied})
        model = load_model(write_random_llama(tmp_path / f"m{tied}.gguf", spec))
        layers = sum(t.nbytes for n, t in model.tensors.items() if n.startswith("blk."))
        out = model.tensors["token_embd.weight" if tied else "output.weight"].nbytes
        assert bench.weight_bytes_per_token(model) == layers + out


def test_prompt_ids_are_fixed_and_in_vocab(tiny_path):
    model = load_model(tiny_path)
    a, b = bench.prompt_ids(model, 300), bench.prompt_ids(model, 300)
    assert a == b and len(a) == 300
    assert all(0 <= t < model.config.vocab_size for t in a)


class FakeLlama:
    """Stands in for llama.cpp: records when it runs, answers with a fixed argmax."""

    def __init__(self, log: list[str]):
        self.log = log

    def forward(self, tokens, start_pos):
        if start_pos == 0:
            self.log.append("llama")
        logits = np.zeros(TINY.vocab_size, np.float32)
        logits[7] = 1
        return logits


def test_llama_cpp_alternates_and_gives_ratios(tiny_path, monkeypatch):
    log: list[str] = []
    real_timed_run = bench.timed_run

    def spy(engine, prompt, steps, *a):
        if not isinstance(engine, FakeLlama):
            log.append("ours")
        return real_timed_run(engine, prompt, steps, *a)

    monkeypatch.setattr(bench, "timed_run", spy)
    monkeypatch.setattr(bench, "PAUSE_S", 0.0)
    cfg = bench.bench_config(parse(["--model", str(tiny_path), *FAST[:-2], "--bandwidth-mib", "0"]))
    r = bench.run_bench(cfg, lambda path, ctx, threads: bench.Contender("llama.cpp", FakeLlama(log), 0.5, "fake"))
    assert log == ["ours", "llama"] * 4  # the warm-up pair, then 3 repeats alternating
    lc = r["llama_cpp"]
    assert lc["version"] == "fake" and lc["startup_s"] == 0.5 and len(lc["decode_tok_s_runs"]) == 3
    assert r["decode_ratio"] == pytest.approx(r["decode_tok_s"] / lc["decode_tok_s"])
    assert r["prefill_ratio"] == pytest.approx(r["prefill_tok_s"] / lc["prefill_tok_s"])
    assert 0 <= r["greedy_agree_tokens"] <= 6
    assert "ours / llama.cpp" in bench.format_report(r)


def test_llama_cpp_on_the_same_gguf(tiny_path):
    """The real llama.cpp, when llama-cpp-python is installed (the optional 'bench' extra)."""
    pytest.importorskip("llama_cpp")
    rc, out, err = run_main(["--model", str(tiny_path), *FAST[:-2], "--llama-cpp", "on", "--bandwidth-mib", "0", "--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["llama_cpp"]["decode_tok_s"] > 0 and r["decode_ratio"] > 0 and r["prefill_ratio"] > 0


def test_membw_small_buffer():
    bw = measure_bandwidth(threads=2, nbytes=4 << 20, runs=3)
    assert bw.gb_s > 0 and len(bw.runs_gb_s) == 3 and bw.threads == 2
    assert bw.nbytes % STEP == 0 and bw.checksum == bw.nbytes // 8  # every word was read


def test_bandwidth_is_timed_on_the_reading_threads_clocks(monkeypatch):
    """A pass lasts from the first reader's start to the last one's finish, whenever the calling thread gets a core
    back: here it wakes 25 ms after each pass has begun (as when the readers hold every core), and each pass's
    readers take 30 ms; timed from the caller's side, as it was, a pass looked 6x faster than it is."""
    import ctypes
    import threading
    import time

    from dllp2p.jit import membw

    def kernel(src, n, out):  # the stub reader: the checksum the real one would make over words of 1, in 30 ms
        ctypes.c_int64.from_address(out).value = n // 8
        time.sleep(0.03)

    made: list[threading.Barrier] = []

    class LateCaller(threading.Barrier):  # the first barrier made is the one that starts a pass
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

        def wait(self, timeout=None):
            index = super().wait(timeout)
            if self is made[0] and threading.current_thread() is threading.main_thread():
                time.sleep(0.025)
            return index

    monkeypatch.setattr(membw, "stream_kernel", lambda cache_dir=None: kernel)
    monkeypatch.setattr(membw.threading, "Barrier", LateCaller)
    bw = measure_bandwidth(threads=2, nbytes=1 << 20, runs=3)
    for rate in bw.runs_gb_s:
        assert 0.5 < rate / (bw.nbytes / 0.03 / 1e9) < 1.1, bw.runs_gb_s


def test_jit_engine_reports_its_own_bytes(tiny_path):
    pytest.importorskip("dllp2p.jit.engine")
    rc, out, err = run_main(["--model", str(tiny_path), *FAST, "--engine", "jit", "--bandwidth-mib", "0", "--json"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["engine"] == "jit" and r["bytes_per_token_source"] == "engine" and r["decode_tok_s"] > 0


def test_llama_cpp_failure_is_reported_not_fatal_in_auto_mode(tiny_path):
    def broken(path, ctx, threads):
        raise ValueError("Failed to load model from file")

    cfg = bench.bench_config(parse(["--model", str(tiny_path), *FAST[:-2], "--bandwidth-mib", "0"]))
    r = bench.run_bench(cfg, broken)
    assert r["llama_cpp"] is None and "Failed to load model" in r["llama_cpp_error"] and r["decode_tok_s"] > 0
    assert "llama.cpp  failed to start" in bench.format_report(r)
