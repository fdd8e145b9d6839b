"""Every family of formats/arch.py in the numpy reference engine against HF transformers' own models,
both loading the same GGUF (transformers dequantizes the K-quants and Q5_0 itself).

- Random-weight files written here (formats/synthetic.py) with a Q4_K_M-like mix of tensor types:
  qwen2 (QKV biases), qwen3 (q/k norms, head_dim 128 so q_dim > dim), a Llama 3.2-style file (tied
  output, rope_freqs.weight for the 'llama3' scaling), a Mistral-style llama file (head_dim from
  attention.key_length, q_dim = 2 dim) and a small gemma3 (6 layers, a 16-token window
  so a 40-token prompt crosses it), also with the bigger Gemma 3s' linear RoPE scaling (factor 8, global
  layers only). Final-position logits of a 40-token prompt.
- Gemma 3 270M Instruct, the real file from its PyPI package: final-position logits on 6 prompts, two of
  them (~690 and ~780 tokens) longer than the 512-token sliding window, and 32 greedy tokens on the chat prompt
  (one prompt only: on the shared 2-core machine each greedy run took 1.5-2 min, mostly HF's side).

Tolerance: both sides run float32 on the same dequantized weights, so only the order of float32 sums
differs (and HF's float32 RoPE angles vs our float64 ones). Measured max |diff|: random files 2e-6
(logit scale ~3) to 5e-5 (scale ~200, tied embeddings); Gemma 3 270M 2e-5 on 6 tokens, 9e-5 on 405
(scale ~25), 1.0e-3 on 923 tokens (HF asked for float64 there: 4.9e-4; its kernels still sum in
float32). LOGIT_ATOL = 1e-3 keeps a >10x margin on short prompts; past the window LONG_ATOL = 5e-3,
still far below a wrong window (511 or 513 instead of 512 moved the 923-token logits by 0.41 / 0.25).
Every feature moves logits far more when it is wrong: each test's negative control (biases, NEOX pairs, RoPE scaling or window ignored) is checked to land > 100x
outside the tolerance, so the comparison is known to see the feature.

HF's GGUF loader ignores rope_freqs.weight and rope.scaling.* (its config mappings have no RoPE
scaling but for gpt-oss), so HF run on a Llama 3.1/3.2 or a Gemma 3 4B+ GGUF as loaded is itself
wrong; the tests give HF the rope_parameters the file describes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_model
from dllp2p.reference import ReferenceEngine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 1e-3
LONG_ATOL = 5e-3  # prompts past Gemma 3's 512-token window: float32 sums over ~700 positions

# the tensor types of a Q4_K_M file (the K-quants need row lengths that are multiples of 256)
Q4_K_M_MIX = (
    ("attn_q", QType.Q5_0), ("attn_k", QType.Q5_0), ("attn_v", QType.Q8_0), ("attn_output", QType.Q4_K),
    ("ffn_gate", QType.Q4_K), ("ffn_up", QType.Q5_K), ("ffn_down", QType.Q6_K),
)
LLAMA3_SCALING = (8.0, 1.0, 4.0, 64)  # factor, low/high freq factors, original context: short, so it bites
SPECS = {
    "qwen2": SyntheticSpec(arch="qwen2", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, qtypes=Q4_K_M_MIX,
                           rope_base=1e6, norm_eps=1e-6, seed=1),
    "qwen3": SyntheticSpec(arch="qwen3", dim=256, n_heads=4, n_kv_heads=2, key_length=128, ffn_dim=768,
                           qtypes=Q4_K_M_MIX, rope_base=1e6, norm_eps=1e-6, seed=2),
    "llama3.2": SyntheticSpec(arch="llama", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, qtypes=Q4_K_M_MIX,
                              rope_base=5e5, tied_output=True, llama3_scaling=LLAMA3_SCALING, seed=3),
    # Mistral-style: head_dim from attention.key_length, not dim / n_heads (Mistral Nemo: 5120 / 32 vs 128)
    "mistral": SyntheticSpec(arch="llama", dim=256, n_heads=8, n_kv_heads=2, key_length=64, ffn_dim=512,
                             qtypes=Q4_K_M_MIX, rope_base=1e6, seed=5),
    "gemma3": SyntheticSpec(arch="gemma3", dim=256, n_layers=6, n_heads=2, n_kv_heads=1, key_length=256,
                            ffn_dim=512, sliding_window=16, tied_output=True, rope_base=1e6, norm_eps=1e-6,
                            qtype=QType.Q4_K, qtypes=(("attn_q", QType.Q5_0), ("ffn_down", QType.Q6_K)), seed=4),
}
# Gemma 3 4B-27B style: rope.scaling.type = linear, factor 8, on the global layers only
SPECS["gemma3-linear"] = dataclasses.replace(SPECS["gemma3"], rope_scaling_type="linear", rope_scaling_factor=8.0)
RANDOM_IDS = [int(t) for t in np.random.default_rng(7).integers(0, 259, 40)]


def _hf_model(path, config=None):
    kwargs = {"config": config} if config is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
    ).eval()


def _hf_logits(model, ids) -> np.ndarray:
    """HF's final-position logits (only that position's output projection: 262k rows for Gemma)."""
    with torch.no_grad():
        return model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].numpy()


def _without(model, **changes):
    """The same file with config fields changed: a negative control."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **changes))


@pytest.mark.parametrize("family", list(SPECS))
def test_random_family_logits_match_hf(tmp_path, family):
    spec = SPECS[family]
    path = write_random_model(tmp_path / f"{family}.gguf", spec)
    model = load_model(path)
    config = None
    if spec.llama3_scaling is not None or spec.rope_scaling_type:  # HF's GGUF loader reads no RoPE scaling
        config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    if spec.llama3_scaling is not None:
        assert model.config.rope_freq_factors is not None
        factor, low, high, original = spec.llama3_scaling
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": spec.rope_base, "factor": factor,
                                  "low_freq_factor": low, "high_freq_factor": high,
                                  "original_max_position_embeddings": original}
    if spec.rope_scaling_type == "linear":  # gemma3: the global layers' RoPE only
        assert model.config.rope_scaling_factor == spec.rope_scaling_factor
        config.rope_parameters = {**config.rope_parameters, "full_attention": {
            "rope_type": "linear", "rope_theta": spec.rope_base, "factor": spec.rope_scaling_factor}}
    theirs = _hf_logits(_hf_model(path, config), RANDOM_IDS)
    ours = ReferenceEngine(model, 64).forward(RANDOM_IDS, 0)
    assert ours.shape == theirs.shape == (spec.vocab_size,)
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_ATOL, rtol=0)

    control = {"llama3.2": {"rope_freq_factors": None}, "gemma3": {"sliding_window": 0, "sliding_layers": ()},
               "qwen2": {"qkv_bias": False}, "qwen3": {"rope_neox": False}, "mistral": {"rope_neox": True},
               "gemma3-linear": {"rope_scaling_factor": 1.0}}[family]
    wrong = ReferenceEngine(_without(model, **control), 64)
    assert np.abs(wrong.forward(RANDOM_IDS, 0) - theirs).max() > 100 * LOGIT_ATOL, control


def test_sliding_window_through_the_cache(tmp_path):
    """Prefill in chunks and token by token (the window then spans cached positions) = one prefill."""
    model = load_model(write_random_model(tmp_path / "g.gguf", SPECS["gemma3"]))
    whole = ReferenceEngine(model, 64).forward(RANDOM_IDS, 0)
    e = ReferenceEngine(model, 64)
    e.forward(RANDOM_IDS[:25], 0)
    for i in range(25, len(RANDOM_IDS)):
        step = e.forward([RANDOM_IDS[i]], i)
    np.testing.assert_allclose(step, whole, atol=1e-4, rtol=0)


def test_llama3_scaling_type_key_reads_like_the_tensor_alone(tmp_path):
    """Files that also say rope.scaling.type = llama3 run exactly like the converter's (tensor only)."""
    spec = SPECS["llama3.2"]
    plain = load_model(write_random_model(tmp_path / "a.gguf", spec)).config
    typed = load_model(write_random_model(tmp_path / "b.gguf", dataclasses.replace(spec, rope_scaling_type="llama3")))
    assert typed.config == plain and plain.rope_freq_factors is not None


# --- Gemma 3 270M Instruct: the real file ------------------------------------------------------------

LONG_FILLER = (
    "In the archive of the old library, shelf {i} holds a ledger about rivers, harbours and the grain "
    "trade of the year {y}; its keeper notes the weather, the prices and the ships that came in. "
)


def _long_prompt(n_paragraphs: int, question: str) -> str:
    facts = "The keeper's secret number is 4821, and the ship that never returned was called Aurora. "
    body = "".join(LONG_FILLER.format(i=i, y=1700 + 3 * i) for i in range(n_paragraphs))
    return facts + body + question


GEMMA_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    _long_prompt(14, "Question: what was the secret number? Answer:"),
    _long_prompt(16, "Question: what was the ship that never returned called? Answer: it was called"),
    "Les chats sont des animaux très",
]


@pytest.fixture(scope="module")
def gemma_hf(gemma3_path):
    return _hf_model(gemma3_path)


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma3_path):
    """HF's tokenizer, only to make token ids: both engines are driven by ids."""
    return transformers.AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)


@pytest.fixture(scope="module")
def gemma_engine(gemma3_path):
    e = ReferenceEngine(load_model(gemma3_path), 1024, keep_weights=True)
    yield e
    e.close()


def test_gemma3_file_config(gemma_engine):
    c = gemma_engine.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
    assert (c.qk_norm, c.post_norms, c.activation, c.rope_neox, c.tied_output) == (True, True, "gelu_tanh", True, True)
    assert c.sliding_window == 512 and [i for i, s in enumerate(c.sliding_layers) if not s] == [5, 11, 17]
    assert (c.rope_base, c.rope_base_local, c.score_scale) == (1e6, 1e4, 256**-0.5)
    assert c.embed_scale == pytest.approx(640**0.5)


@pytest.mark.parametrize("index", range(len(GEMMA_PROMPTS)))
def test_gemma3_final_logits_match_hf(gemma_engine, gemma_hf, gemma_tokenizer, index):
    ids = gemma_tokenizer(GEMMA_PROMPTS[index])["input_ids"]  # with <bos>, as Gemma needs
    assert ids[0] == 2 and (len(ids) > 512) == (index in (3, 4)), len(ids)
    theirs = _hf_logits(gemma_hf, ids)
    ours = gemma_engine.forward(ids, 0)
    assert ours.shape == theirs.shape == (262144,)
    np.testing.assert_allclose(ours, theirs, atol=LONG_ATOL if len(ids) > 512 else LOGIT_ATOL, rtol=0)
    if index == 4:  # the window matters here: attending to everything on every layer lands far off
        wrong = ReferenceEngine(_without(gemma_engine.model, sliding_window=0, sliding_layers=()), 1024)
        wrong._kept = gemma_engine._kept  # same weights, already dequantized
        assert np.abs(wrong.forward(ids, 0) - theirs).max() > 20 * LONG_ATOL


def test_gemma3_greedy_32_tokens_identical_to_hf(gemma_engine, gemma_hf, gemma_tokenizer):
    """The chat prompt: an answer, then <end_of_turn> and whatever follows it (32 steps, no stopping)."""
    ids = gemma_tokenizer(GEMMA_PROMPTS[2])["input_ids"]
    theirs: list[int] = []
    for _ in range(32):  # plain greedy over the whole sequence: no generate() stopping rules
        theirs.append(int(np.argmax(_hf_logits(gemma_hf, ids + theirs))))
    ours: list[int] = []
    logits = gemma_engine.forward(ids, 0)
    for i in range(32):
        ours.append(int(np.argmax(logits)))
        logits = gemma_engine.forward([ours[-1]], len(ids) + i)
    assert ours == theirs, (gemma_tokenizer.decode(ours), gemma_tokenizer.decode(theirs))
