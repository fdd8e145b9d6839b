"""The pause a lost worker costs: time from a worker's kill -9 to the next token the client receives.

SmolLM2-135M on three `dllp2p daemon` processes on loopback (tests/test_serve.py's Daemons, --plan weighted:
3 nodes, then 2), greedy, the worker killed at the 10th token of a request whose prompt makes the
context about 100 and about 1000 tokens. Each context is measured twice: the first recovery to a 2-node
plan also compiles its programs and packs its slices (cold caches), the second finds them cached. The
pause is also printed as a multiple of the median time between tokens before the kill (the baseline,
measured in the same request), so figures from a loaded machine can be compared.

    python tests/bench_recover.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))

import fake_tp  # noqa: E402
from dllp2p import wire as P  # noqa: E402
from dllp2p.models import default_model_path  # noqa: E402
from dllp2p.wire.client import GenerateCall  # noqa: E402
from test_serve import Daemons, wait_members  # noqa: E402

KILL_AT = 10  # the token after which the worker is killed


def request(address: str, ids: list[int], steps: int, kill=None) -> tuple[list[float], P.Done | P.Error]:  # noqa: ANN001
    """-> (time.monotonic() of every TokenChunk's arrival, the last answer). With kill: kill() runs after the
    KILL_AT-th chunk, and the time it returned is inserted at index KILL_AT."""
    g = P.Generate("", tuple(ids), False, None, steps, 2048, 0.0, 40, 0.95, 0.05, 1.0, None)

    async def go() -> tuple[list[float], P.Done | P.Error]:
        times: list[float] = []
        call = await GenerateCall.open(address, g, 10, fake_tp.TEST_KEY)
        try:
            while True:
                msg = await call.receive(300)
                if not isinstance(msg, P.TokenChunk):
                    return times, msg
                times.append(time.monotonic())
                if kill is not None and len(times) == KILL_AT:
                    kill()
                    times.append(time.monotonic())  # the kill: times[KILL_AT]
        finally:
            await call.aclose()

    return trio.run(go)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads of each daemon")
    ap.add_argument("--rounds", type=int, default=2, help="recoveries measured per context size")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dllp2p-bench-recover-"))
    d = Daemons(tmp, 3, model=default_model_path())
    rng = random.Random(17)
    try:
        root = d.start(0, "--plan", "weighted", "--threads", str(args.threads))
        time.sleep(0.05)
        for i in (1, 2):
            d.start(i, "--threads", str(args.threads))
        wait_members(root, 3)
        for context in (100, 1000):
            ids = [rng.randrange(200, 40000) for _ in range(context - KILL_AT)]
            for r in range(args.rounds):
                request(root, ids, 2)  # the 3-node session, prompt cached
                times, done = request(root, ids, 40, kill=lambda: d.kill(2))
                if not isinstance(done, P.Done) or len(times) <= KILL_AT + 1:
                    print(f"context {context}, round {r + 1}: no recovery measured ({done})")
                    continue
                before = statistics.median(b - a for a, b in zip(times[1:KILL_AT], times[2:KILL_AT]))
                pause = times[KILL_AT + 1] - times[KILL_AT]
                line = next((s for s in done.stats if s.startswith("recovered:")), "(no recovery line)")
                setup = next((s for s in done.stats if s.startswith("cluster of")), "")
                print(f"context ~{context} tokens, round {r + 1} ({'cold' if r == 0 else 'warm'} caches): pause "
                      f"{pause:.2f} s after the kill = {pause / before:.0f} x the median {before * 1e3:.1f} ms between "
                      f"tokens before it; {done.nodes} nodes after; root: {line}; {setup}", flush=True)
                d.start(2, "--threads", str(args.threads))
                wait_members(root, 3)
    finally:
        d.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
