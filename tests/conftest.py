"""Shared fixtures: the real model (SmolLM2-135M-Instruct from its wheel) and small synthetic ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dllp2p.models import NoModel, default_model_path


def _real_model_path() -> Path:
    try:
        return default_model_path()
    except NoModel as e:  # the README's set-up installs it; say so instead of failing obscurely
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def model_path() -> Path:
    return _real_model_path()


@pytest.fixture(scope="session")
def real_model(model_path):
    from dllp2p.formats import load_model

    return load_model(model_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    """HF transformers' own implementation, loading the same GGUF: the independent oracle."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
