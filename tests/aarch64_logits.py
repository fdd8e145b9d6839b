"""Logits of a greedy SmolLM2 continuation on this machine's JIT engine, saved for comparison across
architectures: run by tests/test_aarch64.py on x86 and under qemu-aarch64. Not collected by pytest.

    python tests/aarch64_logits.py MODEL.gguf OUT.npy
OUT.npy: f32[9, vocab], the logits after the 6-token prompt, then after each of 8 greedy tokens.
"""

from __future__ import annotations

import sys

import numpy as np

from dllp2p.formats.gguf_model import load_model
from dllp2p.jit.engine import JITEngine

PROMPT = [1, 504, 3458, 282, 4649, 314]  # as test_cluster.py's


def main(model_path: str, out: str) -> None:
    engine = JITEngine(load_model(model_path), 64, 1)
    try:
        rows, logits, pos = [], engine.forward(PROMPT, 0), len(PROMPT)
        for _ in range(8):
            rows.append(np.array(logits, np.float32))
            logits = engine.forward([int(np.argmax(logits))], pos)
            pos += 1
        rows.append(np.array(logits, np.float32))
    finally:
        engine.close()
    np.save(out, np.stack(rows))


if __name__ == "__main__":
    main(*sys.argv[1:3])
