"""Resident memory of a root and a worker daemon, during and after a session.

    python -m dllp2p.commands.mem_bench [--model PATH ...] [--steps N] [--wait S] [--code DIR] [--json]

Two `dllp2p daemon` processes on 127.0.0.1 (one thread each, the pow2 plan: both nodes take part, each
other's --peer, a fresh cluster key, fresh state dirs: the worker's slice cache is empty, so the root
pushes its slices; a fresh cache dir: kernels compiled and weights packed afresh, as on a first run).
The first, started first, is the root and has the model; the worker has none. One
greedy prompt of `--steps` tokens goes to the root; /proc/PID/status of both is read:

    idle      after both started and found each other
    during    the highest VmRSS seen while the prompt ran (read every 20 ms: set-up, push, build, decode)
    kept      right after the prompt: the root keeps the session warm (service.WARM_S) for the next one
    released  `--wait` seconds later (default WARM_S + 10): the kept session is closed, the worker idle
    peak      VmHWM at the end: the most either ever held

Default models: the random distributed-llama-shaped one (8 KV heads, tpbench.random_model_path: written
once to /tmp) and the installed SmolLM2. Figures in MiB; `MiB` is the GGUF's size. `--code DIR` runs the
daemons from another checkout (PYTHONPATH), e.g. the code before a change: compare the two tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..memory import resident
from ..models import default_model_path
from ..tpbench import random_model_path
from ..session.service import WARM_S
from .replan_bench import CLI, PROMPT, _free_port, stop_daemons, wait_joined

MIB = 1 << 20


def _start(tmp: Path, model: str, env: dict[str, str]) -> tuple[list[subprocess.Popen], list[str], Path]:
    key = tmp / "cluster.key"
    subprocess.run([*CLI, "key", "new", "--out", str(key)], check=True, capture_output=True, env=env, cwd=tmp)
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for i, address in enumerate(addresses):
        cmd = [*CLI, "daemon", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--threads", "1",
               "--no-discovery", "--cluster", f"mem-{os.getpid()}", "--state-dir", str(tmp / f"d{i}"),
               "--key-file", str(key), "--plan", "pow2", "--api", "off", "--peer", addresses[1 - i]]
        if i == 0:
            cmd += ["--model", model]
        log = open(tmp / f"d{i}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=tmp))
        time.sleep(1.0)  # the first started is the root
    return procs, addresses, key


def measure(model: str, steps: int, wait: float, code: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dllp2p-mem-") as tmp:
        # cold: compiled and packed afresh; the daemons run from `code` (else this checkout), started in tmp:
        # `python -m` puts its working directory before PYTHONPATH
        env = {**os.environ, "DLLP2P_CACHE_DIR": str(Path(tmp) / "cache"),
               "PYTHONPATH": str(Path(code or Path(__file__).parent.parent.parent).resolve())}
        procs, addresses, key = _start(Path(tmp), model, env)
        pids = {"root": procs[0].pid, "worker": procs[1].pid}
        try:
            wait_joined(addresses, key)
            rows: dict[str, dict[str, float]] = {r: {} for r in pids}
            for role, pid in pids.items():
                rows[role]["idle"] = resident(pid)[0] / MIB
            during = {role: 0 for role in pids}
            running = threading.Event()
            running.set()

            def sample() -> None:
                while running.is_set():
                    for role, pid in pids.items():
                        during[role] = max(during[role], resident(pid)[0])
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            r = subprocess.run([*CLI, "run", "--prompt", PROMPT, "--temperature", "0", "--steps", str(steps),
                                "--daemon", addresses[0], "--key-file", str(key)],
                               capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
            running.clear()
            sampler.join()
            if r.returncode != 0:
                raise RuntimeError(f"the prompt failed: {r.stderr.strip()[-400:]}")
            for role, pid in pids.items():
                rows[role]["during"] = during[role] / MIB
                rows[role]["kept"] = resident(pid)[0] / MIB
            time.sleep(wait)
            for role, pid in pids.items():
                rss, hwm = resident(pid)
                rows[role]["released"], rows[role]["peak"] = rss / MIB, hwm / MIB
        finally:
            stop_daemons(procs)
    return {"model": Path(model).name, "model_mib": os.path.getsize(model) / MIB, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dllp2p.commands.mem_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", help="GGUF models (default: the random 8-KV model and SmolLM2)")
    parser.add_argument("--steps", type=int, default=32, help="tokens of the prompt's answer (default 32)")
    parser.add_argument("--wait", type=float, default=WARM_S + 10, help="seconds after the prompt until 'released'")
    parser.add_argument("--code", metavar="DIR", help="run the daemons from this checkout (their PYTHONPATH), e.g. "
                                                      "one of the code before a change, to compare with this one")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    models = ns.model
    if not models:
        models = [str(random_model_path()), str(default_model_path())]
    results = [measure(m, ns.steps, ns.wait, ns.code) for m in models]
    if ns.json:
        print(json.dumps(results))
        return 0
    cols = ("idle", "during", "kept", "released", "peak")
    print(f"{'model':<40} {'MiB':>6} {'daemon':<7}" + "".join(f"{c:>10}" for c in cols))
    for res in results:
        for role, row in res["rows"].items():
            print(f"{res['model']:<40} {res['model_mib']:>6.0f} {role:<7}" + "".join(f"{row[c]:>10.0f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
