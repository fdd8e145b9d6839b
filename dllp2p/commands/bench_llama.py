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


class LlamaCppBatch:
    """llama.cpp behind the BatchEngine protocol (dllp2p/engine.py), for `dllp2p bench --concurrency`: several
    sequences stepped together, each its own llama.cpp sequence id, in one llama_decode per step (as llama-server's
    parallel slots do), so its batched throughput is measured by the same runs, prompts and greedy picks as ours.

    forward_batch drops a row's cached positions from start_pos on (llama_memory_seq_rm), queues every row's tokens
    in one llama_batch with the logits of each row's last token, decodes, and copies those rows of logits out."""

    name = "llama.cpp"
    inline_rows = 0

    def __init__(self, path: str, ctx: int, threads: int, max_seqs: int, kv_bytes_per_position: int):
        import logging

        import llama_cpp as lc

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints below that level
        self._lc, self.ctx, self.max_seqs = lc, ctx, max_seqs
        self.kv_bytes_per_position = kv_bytes_per_position
        self.version = getattr(lc, "__version__", "")
        lc.llama_backend_init()
        self._model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self._model:
            raise ValueError(f"llama.cpp could not load {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        params = lc.llama_context_default_params()
        params.n_ctx = max_seqs * -(-ctx // 256) * 256  # each sequence its own KV cache of ctx positions or more
        params.n_seq_max = max_seqs
        params.n_batch = max_seqs * ctx  # a step's rows go in one llama_decode
        params.n_ubatch = min(512, params.n_batch)
        params.n_threads = params.n_threads_batch = threads
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ValueError(f"llama.cpp could not make a context of {max_seqs} x {ctx} positions")
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(params.n_batch, 0, 1)

    def forward_batch(self, rows) -> np.ndarray:  # noqa: ANN001 (Sequence[BatchRow])
        """f32[len(rows), vocab]: each row's last token's logits."""
        lc, batch = self._lc, self._batch
        lasts, n = [], 0
        for row in rows:
            lc.llama_memory_seq_rm(self._memory, row.seq, row.start_pos, -1)
            for j, token in enumerate(row.tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, row.start_pos + j, 1
                batch.seq_id[n][0] = row.seq
                batch.logits[n] = j == len(row.tokens) - 1
                n += 1
            lasts.append(n - 1)
        batch.n_tokens = n
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for i, at in enumerate(lasts):
            out[i] = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, at), shape=(self.n_vocab,))
        return out

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Not here: llama.cpp copies a prefix only within one KV cache for all sequences (kv_unified), whose
        attention masks every sequence's cells; the bench's prompts share no prefix, so it never asks."""
        raise NotImplementedError("llama.cpp's per-sequence KV caches cannot share a prefix")

    def close(self) -> None:
        lc = self._lc
        if self._ctx:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = None
