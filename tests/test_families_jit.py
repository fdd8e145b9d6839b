"""Every model family (formats/arch.py) through the compiled single-node program and the tensor-parallel
program, on random-weight models (tests/family_models.py) and on Gemma 3 270M.

Tolerances, as tests/test_jit_engine.py states them: against ReferenceEngine(numerics="jit") the logits
stay within 3% of their scale (block-quantized weights: an 8-bit rounding can flip after a last-bit
difference). Exactness is checked where it must hold: the JIT engine is bit-identical across thread
counts and prompt chunkings, and the tensor-parallel nodes with the exact exchange are bit-identical to
one node; with the q8 exchange the logits stay within test_tp's stated q8 tolerance.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dllp2p import reference
from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_model
from dllp2p.tp import split_block
from dllp2p.jit.engine import JITEngine
from dllp2p.reference import ReferenceEngine

from family_models import FAMILIES, random_model
from test_tp import Cluster, greedy_identical, q8_within_tolerance

TOL = 3e-2  # of the logits' scale: test_jit_engine's bound for block-quantized weights
# until branch arch's reference engine (the family switches) is merged
needs_family_reference = pytest.mark.skipif(not hasattr(reference, "ACTIVATION_FUNCTIONS"),
                                            reason="this reference engine does not run the model families yet")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fam-cache")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fam-models")
    return {name: random_model(d, name, c, seed=i) for i, (name, c) in enumerate(FAMILIES.items())}


def _scale(logits: np.ndarray) -> float:
    return float(np.abs(logits).max())


@needs_family_reference
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_reference(models, cache_dir, family):
    model = models[family]
    long = family == "gemma3-window"  # past one attention span and past the window
    n_prompt = 200 if long else 37  # > the small models' window of 16, chunks of 8 cross it
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, model.config.vocab_size, n_prompt)]
    ref = ReferenceEngine(model, 256, keep_weights=True, numerics="jit")
    jit = JITEngine(model, 256, threads=2, cache_dir=cache_dir, max_chunk=64 if long else 8)
    try:
        want, got = ref.forward(prompt, 0), jit.forward(prompt, 0)
        assert np.abs(got - want).max() <= TOL * _scale(want)
        for i, tok in enumerate([5, 77, 300, 11]):  # decode steps after the prompt
            want, got = ref.forward([tok], n_prompt + i), jit.forward([tok], n_prompt + i)
            assert np.abs(got - want).max() <= TOL * _scale(want), f"decode step {i}"
    finally:
        jit.close()


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_bit_identical_across_threads_and_chunkings(models, cache_dir, family):
    model = models[family]
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, model.config.vocab_size, 41)]
    results = []
    for threads, chunk in ((1, 64), (3, 8), (2, 5)):
        jit = JITEngine(model, 128, threads=threads, cache_dir=cache_dir, max_chunk=chunk)
        try:
            logits = [jit.forward(prompt, 0)] + [jit.forward([t], len(prompt) + i) for i, t in enumerate([3, 9, 27])]
        finally:
            jit.close()
        results.append(np.stack(logits))
    for other in results[1:]:
        assert np.array_equal(results[0], other)


# --- tensor parallelism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,n_nodes", [("gemma3", 2), ("gemma3", 4), ("qwen2", 2), ("qwen3", 2), ("llama3", 2),
                                            ("gemma3-window", 2)])
def test_tp_exact_bit_identical_to_one_node(models, cache_dir, family, n_nodes):
    """Gemma's single KV head on 2 and 4 nodes (replicated K/V, query heads shared out), the other
    families' biases, q/k norms and RoPE factors cut with their matrices: the logits of every step equal
    one node's, bit for bit."""
    model = models[family]
    single = JITEngine(model, 256, threads=1, cache_dir=cache_dir, max_chunk=16)
    cluster = Cluster(model, n_nodes, "pow2", cache_dir, ctx=256)
    try:
        if model.config.n_kv_heads < n_nodes:
            assert all(n.kv_heads == (0, 1) for n in cluster.plan.nodes)
        n_prompt = 140 if family == "gemma3-window" else 21
        prompt = [int(t) for t in np.random.default_rng(3).integers(0, model.config.vocab_size, n_prompt)]
        greedy_identical(cluster, single, prompt, 24)
    finally:
        cluster.close()
        single.close()


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_tp_q8_gemma_shape_within_tolerance(models, cache_dir, n_nodes):
    model = models["gemma3"]
    single = JITEngine(model, 128, threads=1, cache_dir=cache_dir, max_chunk=16)
    cluster = Cluster(model, n_nodes, "pow2", cache_dir, exchange="q8")
    try:
        prompt = [int(t) for t in np.random.default_rng(4).integers(0, model.config.vocab_size, 21)]
        worst, _ = q8_within_tolerance(cluster, single, prompt, 24)
        assert worst > 0  # 8-bit partial sums: bit-identity would mean the exchange was skipped
    finally:
        cluster.close()
        single.close()


# --- GGUF files of every family, from formats/synthetic.py, in a Q4_K_M-style mix of tensor types ---------

KQ_MIX = (("attn_q", QType.Q5_0), ("attn_k", QType.Q5_0), ("attn_v", QType.Q8_0), ("attn_output", QType.Q4_K),
          ("ffn_gate", QType.Q5_0), ("ffn_up", QType.Q5_0), ("ffn_down", QType.Q6_K))
FILE_SPECS = {
    "llama3": SyntheticSpec(arch="llama", n_kv_heads=2, llama3_scaling=(32.0, 1.0, 4.0, 8192), rope_base=500000.0),
    "qwen2": SyntheticSpec(arch="qwen2", n_kv_heads=2, tied_output=True, rope_base=1e6),
    "qwen3": SyntheticSpec(arch="qwen3", n_kv_heads=2, key_length=64, rope_base=1e6),
    # 6 layers: the 6th is global; 4 heads of 128 so that 2 nodes' attn_output columns are whole Q4_K blocks
    "gemma3": SyntheticSpec(arch="gemma3", n_layers=6, n_heads=4, n_kv_heads=1, key_length=128, tied_output=True,
                            sliding_window=16, rope_base=1e6),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fam-files")
    return {name: load_model(write_random_model(d / f"{name}.gguf", replace(spec, qtypes=KQ_MIX)))
            for name, spec in FILE_SPECS.items()}


@needs_family_reference
@pytest.mark.parametrize("family", list(FILE_SPECS))
def test_family_file_matches_reference(files, cache_dir, family):
    model = files[family]
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, model.config.vocab_size, 29)]
    ref = ReferenceEngine(model, 128, keep_weights=True, numerics="jit")
    jit = JITEngine(model, 128, threads=2, cache_dir=cache_dir, max_chunk=8)
    try:
        want, got = ref.forward(prompt, 0), jit.forward(prompt, 0)
        assert np.abs(got - want).max() <= TOL * _scale(want)
        for i, tok in enumerate([5, 77]):
            want, got = ref.forward([tok], len(prompt) + i), jit.forward([tok], len(prompt) + i)
            assert np.abs(got - want).max() <= TOL * _scale(want), f"decode step {i}"
    finally:
        jit.close()


@pytest.mark.parametrize("exchange", ["exact", "q8"])
def test_gemma_file_k_quants_on_two_nodes(files, cache_dir, exchange):
    """K-quant attn_output and ffn_down cut by columns (q8) on 256-value super-block boundaries."""
    model = files["gemma3"]
    assert split_block(model) == 256
    single = JITEngine(model, 128, threads=1, cache_dir=cache_dir, max_chunk=16)
    cluster = Cluster(model, 2, "pow2", cache_dir, exchange=exchange, block=split_block(model))
    try:
        assert all(n.ffn_rows[0] % 256 == 0 for n in cluster.plan.nodes)
        prompt = [int(t) for t in np.random.default_rng(6).integers(0, model.config.vocab_size, 21)]
        if exchange == "exact":
            greedy_identical(cluster, single, prompt, 8)
        else:
            worst, _ = q8_within_tolerance(cluster, single, prompt, 8)
            assert worst > 0
    finally:
        cluster.close()
        single.close()
