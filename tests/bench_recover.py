"""The pause a lost worker costs: time from a worker's kill -9 to the next token the client receives.

SmolLM2-135M on three `dllp2p daemon` processes on loopback (tests/test_serve.py's Daemons, --plan weighted:
3 nodes, then 2), greedy, the worker killed at the 10th token of a request whose prompt makes the
context about 100 and about 1000 tokens. Each context is measured twice: the first recovery to a 2-node
plan also compiles its programs and packs its slices (cold caches), the second finds them cached. The
pause is also printed as a multiple of the median time between tokens before the kill (the baseline,
measured in the same request), so figures from a loaded machine can be compared.

With --concurrency N (N > 1) the root batches (--cluster-batch): N requests of different prompts run together,
the worker is killed at the 10th token of the one that joined last, and each request's pause is printed (from
its last token before the kill to its first after it): every running request computes its context again on the
new plan, oldest first (prompt chunks of BatchConfig.chunk tokens a step).

    python tests/bench_recover.py [--threads N] [--rounds R] [--concurrency N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
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
    ap.add_argument("--concurrency", type=int, default=1, help="requests batched together (--cluster-batch) when > 1")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dllp2p-bench-recover-"))
    d = Daemons(tmp, 3, model=default_model_path())
    rng = random.Random(17)
    try:
        root = d.start(0, "--plan", "weighted", "--threads", str(args.threads),
                       *(["--cluster-batch"] if args.concurrency > 1 else []))
        time.sleep(0.05)
        for i in (1, 2):
            d.start(i, "--threads", str(args.threads))
        wait_members(root, 3)
        for context in (100, 1000):
            ids = [rng.randrange(200, 40000) for _ in range(context - KILL_AT)]
            for r in range(args.rounds):
                if args.concurrency > 1:
                    batched(d, root, rng, context, args.concurrency, r)
                    d.start(2, "--threads", str(args.threads))
                    wait_members(root, 3)
                    continue
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


def batched(d: Daemons, root: str, rng: random.Random, context: int, n: int, r: int) -> None:
    """n requests of ~context tokens together; the worker killed at the first one's KILL_AT-th token."""
    prompts = [[rng.randrange(200, 40000) for _ in range(context - KILL_AT)] for _ in range(n)]
    request(root, prompts[0], 2)  # the 3-node engine made (its slices pushed, its programs compiled)
    killed: list[float] = []
    out: list[tuple[list[float], P.Done | P.Error] | None] = [None] * n

    def kill() -> None:
        d.kill(2)
        killed.append(time.monotonic())

    def one(i: int) -> None:
        out[i] = request(root, prompts[i], 40, kill=kill if i == 0 else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in reversed(threads):  # the one that kills last: the others decode by its 10th token
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    pauses = []
    for i, (times, done) in enumerate(out):
        if i == 0 and killed:
            del times[KILL_AT]  # the kill's time, not a token's
        before, after = [t for t in times if killed and t <= killed[0]], [t for t in times if killed and t > killed[0]]
        line = next((s for s in getattr(done, "stats", ()) if s.startswith("recovered:")), f"no recovery ({done})")
        if before and after:
            pauses.append(after[0] - before[-1])
            print(f"  request {i}: pause {pauses[-1]:.2f} s; root: {line}", flush=True)
        else:  # its Done's pause runs from its start: its prompt's time is in it
            print(f"  request {i}: no token before the kill (still in its prompt); root: {line}", flush=True)
    print(f"context ~{context} tokens, {n} requests batched, round {r + 1}: pauses of those that had begun "
          f"{min(pauses, default=0):.2f}-{max(pauses, default=0):.2f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
