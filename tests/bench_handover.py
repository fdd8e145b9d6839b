"""The pause a root's death costs a client that talks to another daemon (issue 17): 3 daemons on loopback,
`dllp2p run --daemon <daemon 1>`, the root (daemon 0) killed with -9 (or sent SIGTERM) once the context
holds about N tokens; the pause is the longest wait for text after it. Printed with the median wait
between two pieces of text before the kill, measured in the same run (the ratio is the figure to compare
between machines). Not a test (pytest does not collect it): a benchmark command, seconds to minutes.

    PYTHONPATH=. python tests/bench_handover.py                      # SmolLM2, context ~100 and ~1000
    PYTHONPATH=. python tests/bench_handover.py --model m.gguf --context 100 --how sigterm
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_handover import Client  # noqa: E402
from test_serve import Daemons, wait_members  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while seven cats watch from a red barn ".split()


def one(model: Path | None, context: int, how: str, steps: int, verbose: bool = False) -> None:
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(max(1, context - 60)))  # ~1 token a word
    with tempfile.TemporaryDirectory(prefix="dllp2p-bench-handover-") as tmp:
        d = Daemons(Path(tmp), 3, model=model)
        try:
            d.start(0, "--drain-s", "0")
            time.sleep(0.05)
            d.start(1)
            d.start(2)
            for i in range(3):
                wait_members(d.address(i), 3)
            client = Client(d.address(1), prompt=prompt, steps=steps)
            client.wait_output(200, limit=600)  # ~60 tokens into the reply
            t = time.monotonic()
            before = [b - a for (a, _), (b, _) in zip(client.reads, client.reads[1:])]
            if how == "kill":
                d.kill(0)
            else:
                d.procs[0].send_signal(signal.SIGTERM)
            rc, out, err = client.finish()
            pause, gap = client.pause_after(t), statistics.median(before)
            print(f"context ~{context} tokens, root {how}: pause {pause:.3f} s; median wait between pieces "
                  f"before it {gap * 1e3:.1f} ms (x{pause / gap:.0f}); exit {rc}; "
                  f"{'resumed' if 'resumed after' in err else 'NOT resumed'}")
            if verbose:
                print(err, "".join(d.logs[0][-12:]), "".join(d.logs[1][-25:]), sep="\n")
        finally:
            d.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="GGUF served by the root (default: the installed SmolLM2)")
    ap.add_argument("--context", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--how", choices=["kill", "sigterm"], default="kill")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--verbose", action="store_true", help="the client's stats and the new root's log lines")
    a = ap.parse_args()
    for context in a.context:
        one(a.model, context, a.how, a.steps, a.verbose)


if __name__ == "__main__":
    main()
