"""Weight streaming's cost on one node: the same model with no budget and with budgets below its size.

    python -m dllp2p.jit.bench_stream [--layers 8] [--dim 2048] [--ffn 5632] [--tokens 32] [--rounds 5]
                                      [--threads T] [--fractions 0.5 0.25]

Writes a random Llama-shaped Q4_0 model (formats/synthetic.write_random_q4_0; not a trained model) and
builds one engine without a budget and one per fraction f with a budget of f x its layers' packed
weights (+ its buffers, norms, embedding and output projection), then decodes `tokens` greedy tokens with each, alternating round by round (A B C A B C ...), and
prints each one's median ms/token and its ratio to the unlimited engine measured in the same rounds, the
read-ahead depth, and whether every engine's tokens equal the unlimited one's. The file stays in the page
cache here (no cgroup): the figures are the cost of the madvise calls and the page faults of mapping each
layer again every step, not of a disk (commands/stream_bench.py measures that, in memory cgroups).
A node whose weights fit its budget runs the unlimited engine's code path (its stream slot is 0): the
"no budget" row is what such a node does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..formats import load_model
from ..formats.synthetic import SyntheticSpec, write_random_q4_0
from .engine import JITEngine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dllp2p-bench-stream-"))
    spec = SyntheticSpec(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, n_kv_heads=args.dim // 128,
                         ffn_dim=args.ffn, vocab_size=32000, context_length=4096, seed=3)
    model = load_model(write_random_q4_0(tmp / "model.gguf", spec))
    ctx = 1 + args.tokens + 8
    free = JITEngine(model, ctx, args.threads, cache_dir=tmp / "cache")
    weights = free.packed.path.stat().st_size
    other = sum(a.nbytes for a in free._bufs.values())
    layers = sum(m.nbytes for n, m in free.packed.matrices.items() if n.startswith("blk."))
    engines = {"no budget": free}
    for f in args.fractions:  # the budget holds the buffers, the resident part and f of the layers
        engines[f"{f:g} x layers"] = JITEngine(model, ctx, args.threads, cache_dir=tmp / "cache",
                                               mem_limit=other + weights - layers + int(f * layers))
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, e in engines.items():
            logits = e.forward(list(range(1, 9)), 0)
            ids = []
            t0 = time.perf_counter()
            for i in range(args.tokens):
                ids.append(int(logits.argmax()))
                logits = e.forward([ids[-1]], 8 + i)
            times[name].append((time.perf_counter() - t0) * 1e3 / args.tokens)
            tokens.setdefault(name, ids)
    base = statistics.median(times["no budget"])
    print(f"model: {args.layers} layers, dim {args.dim}, FFN {args.ffn}, Q4_0: {weights / 2**20:.0f} MiB packed; "
          f"{free.threads} threads, {args.tokens} tokens x {args.rounds} rounds, alternating")
    for name, e in engines.items():
        ms = statistics.median(times[name])
        ahead = f"{e.stream.ahead} layers read ahead" if e.stream else "not streaming"
        print(f"  {name:>14}: {ms:.2f} ms/token ({ms / base:.2f}x the unlimited engine), {ahead}, "
              f"tokens equal the unlimited engine's: {tokens[name] == tokens['no budget']}")
    for e in engines.values():
        e.close()
    shutil.rmtree(tmp, ignore_errors=True)  # the model and its packed files
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
