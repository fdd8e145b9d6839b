"""llama.cpp (llama-cpp-python) behind the engines' forward(tokens, start_pos) protocol, for `dllp2p bench`'s
comparison in the same process (`pip install -e '.[bench]'`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class LlamaCpp:
    """llama.cpp through llama-cpp-python, behind the same forward(tokens, start_pos) protocol.

    Only llama_decode runs inside forward (via Llama.eval, in batches of n_batch); the ids come from
    our prompt, so llama.cpp's tokenizer is never called. Rewinding to position 0 clears its cache.
    """

    name = "llama.cpp"

    def __init__(self, path: str, ctx: int, threads: int):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.version = getattr(llama_cpp, "__version__", "")
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=-(-max(ctx, 256) // 256) * 256,
            n_batch=512,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        llm = self.llm
        if start_pos == 0:
            llm.reset()
        elif start_pos != llm.n_tokens:
            llm.n_tokens = start_pos  # eval() drops cache entries from n_tokens on
        llm.eval(list(tokens))
        # eval() keeps no logits unless logits_all; read the last token's row from llama.cpp itself
        row = self._llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))  # valid until the next forward

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
        self.llm = None


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
