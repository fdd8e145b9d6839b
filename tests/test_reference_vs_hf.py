"""The numpy reference engine against HF transformers' own Llama, both loading the same GGUF.

Tolerance: both run float32 on the same dequantized weights; only the order of float32 sums differs
(numpy/BLAS vs torch). Over 30 layers that moves logits of magnitude ~20-30 by ~5e-5 (measured), so
an absolute tolerance of 1e-3 leaves a 20x margin while still catching any real mistake (a wrong
RoPE pair, eps, or KV grouping moves logits by 0.1 or more).
"""

from __future__ import annotations

import numpy as np
import pytest

from dllp2p.reference import ReferenceEngine

torch = pytest.importorskip("torch")

LOGIT_ATOL = 1e-3

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, there was a little",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Les chats sont des animaux très",
    "1, 1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def engine(real_model):
    e = ReferenceEngine(real_model, 256, keep_weights=True)
    yield e
    e.close()


def _hf_ids(hf_tokenizer, text):
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_final_logits_match_hf(engine, hf_model, hf_tokenizer, prompt):
    ids = _hf_ids(hf_tokenizer, prompt)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    ours = engine.forward(ids, 0)
    assert ours.shape == theirs.shape == (49152,)
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_ATOL, rtol=0)


def test_prefill_equals_token_by_token(engine, hf_tokenizer):
    ids = _hf_ids(hf_tokenizer, "Token by token, the cache must give the same answer.")
    whole = engine.forward(ids, 0)
    for i, t in enumerate(ids):
        step = engine.forward([t], i)
    np.testing.assert_allclose(step, whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS[:3] + PROMPTS[3:4])
def test_greedy_32_tokens_identical_to_hf(engine, hf_model, hf_tokenizer, prompt):
    ids = _hf_ids(hf_tokenizer, prompt)
    theirs = []
    with torch.no_grad():  # plain greedy over the whole sequence: no generate() stopping rules
        for _ in range(32):
            logits = hf_model(torch.tensor([ids + theirs])).logits[0, -1]
            theirs.append(int(torch.argmax(logits)))
    ours = []
    logits = engine.forward(ids, 0)
    for i in range(32):
        token = int(np.argmax(logits))
        ours.append(token)
        logits = engine.forward([token], len(ids) + i)
    assert ours == theirs
