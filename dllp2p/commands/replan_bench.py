"""Re-planning by measured speed, measured: two daemons on loopback, one sharing its core with a hog.

    python -m dllp2p.commands.replan_bench [--model PATH] [--steps N] [--hogs N] [--busy 0|1] [--json]

Two `dllp2p daemon` processes on 127.0.0.1 (each pinned to one CPU with os.sched_setaffinity, one
thread each, the weighted plan, each other's --peer, a fresh cluster key), then prompts through the
first, greedy, `--steps` tokens each:

    quiet     2 prompts: the first plans by capacity (nothing measured yet), the second by the rates the
              first measured (a re-plan when they differ beyond scheduler.RATE_TOLERANCE)
    hog       a process spinning on the second daemon's CPU (--busy 0: the first's; bench_load.cpu_hog), then
    before    1 prompt on the kept session: the plan made before the hog
    after     (once the daemons' Status polls carry the slower rate) 2 prompts: the root re-plans

Printed per prompt: decode tok/s (as `dllp2p run` reports it), the plan's FFN rows per node and the
rates the daemons report. The hog and the daemons are stopped however it ends. On a machine that other
programs use the figures are noisy: compare before and after within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_load import cpu_hog

CLI = [sys.executable, "-m", "dllp2p.cli"]
POLL_S = 2.0  # the daemons' Status poll interval (discovery.StaticOptions.interval)
PROMPT = "Write a short story about a robot who learns to paint."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned(cpu: int) -> Any:
    return lambda: os.sched_setaffinity(0, {cpu})


def start_daemons(tmp: Path, model: str | None, cpus: list[int]) -> tuple[list[subprocess.Popen], list[str], Path]:
    key = tmp / "cluster.key"
    subprocess.run([*CLI, "key", "new", "--out", str(key)], check=True, capture_output=True)
    ports = [_free_port() for _ in cpus]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i, (cpu, port) in enumerate(zip(cpus, ports)):
        cmd = [*CLI, "daemon", "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--no-discovery",
               "--cluster", f"replan-{os.getpid()}", "--state-dir", str(tmp / f"d{i}"), "--key-file", str(key),
               "--plan", "weighted", "--api", "off", "--peer", *[a for a in addresses if a != addresses[i]]]
        if model:
            cmd += ["--model", model]
        log = open(tmp / f"d{i}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=_pinned(cpu)))
    return procs, addresses, key


def status(address: str, key: Path) -> dict:
    host, port = address.rsplit(":", 1)
    r = subprocess.run([*CLI, "status", "--json", "--host", host, "--port", port, "--key-file", str(key)],
                       capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_joined(addresses: list[str], key: Path, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(len(status(a, key).get("nodes", [])) == len(addresses) for a in addresses):
            return
        time.sleep(0.5)
    raise RuntimeError("the daemons did not find each other")


def prompt(address: str, key: Path, steps: int) -> float:
    r = subprocess.run([*CLI, "run", "--prompt", PROMPT, "--temperature", "0", "--steps", str(steps), "--daemon",
                        address, "--key-file", str(key)], capture_output=True, text=True, timeout=300)
    found = re.search(r"decode ([0-9.]+) tok/s", r.stderr)
    if r.returncode != 0 or not found:
        raise RuntimeError(f"the prompt failed: {r.stderr.strip()[-400:]}")
    return float(found.group(1))


def plan_rows(address: str, key: Path) -> dict[str, Any]:
    """The latest plan's epoch, FFN rows per node and each node's rate, as `dllp2p status --json` tells them."""
    s = status(address, key)
    nodes = s.get("nodes", [])
    return {"epoch": (s.get("plan") or {}).get("epoch"),
            "ffn_rows": {n["id"]: n["slice"]["ffn_rows"][1] - n["slice"]["ffn_rows"][0] for n in nodes if n["slice"]},
            "rates": {n["id"]: round(n["rate"] or 0.0, 1) for n in nodes},
            "root": next((n["id"] for n in nodes if n["role"] == "root"), None)}


def run(model: str | None, steps: int, n_hogs: int = 1, busy: int = 1) -> dict[str, Any]:
    """busy: the daemon (0: the one prompts go to, 1: the other) whose CPU the hogs share."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dllp2p-replan-") as tmp:
        procs, addresses, key = start_daemons(Path(tmp), model, cpus[:2])
        try:
            wait_joined(addresses, key)

            def one(phase: str) -> None:
                tok_s = prompt(addresses[0], key, steps)
                rows.append({"phase": phase, "decode_tok_s": tok_s, **plan_rows(addresses[0], key)})
                print(json.dumps(rows[-1]), file=sys.stderr)

            one("quiet")
            time.sleep(POLL_S * 1.5)
            one("quiet")
            with contextlib.ExitStack() as hogs:
                for _ in range(n_hogs):
                    hogs.enter_context(cpu_hog(cpus[busy]))
                time.sleep(0.3)
                one("before")  # the kept session: the plan made before the hog
                time.sleep(POLL_S * 1.5)  # the daemons' polls carry the slower rate
                one("after")
                time.sleep(POLL_S * 1.5)
                one("after")
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    before = [r["decode_tok_s"] for r in rows if r["phase"] == "before"]
    after = [r["decode_tok_s"] for r in rows if r["phase"] == "after"]
    return {"rows": rows, "hog_cpu": cpus[busy], "hogs": n_hogs, "after_vs_before": after[-1] / before[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dllp2p.commands.replan_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF model (default: the installed SmolLM2)")
    parser.add_argument("--steps", type=int, default=48, help="tokens per prompt (default 48)")
    parser.add_argument("--hogs", type=int, default=1,
                        help="hog processes on the second daemon's CPU (default 1; more where other programs "
                             "already keep both CPUs busy)")
    parser.add_argument("--busy", type=int, choices=(0, 1), default=1,
                        help="the daemon whose CPU the hogs share: 0 the first (prompts go to it), 1 the second (default)")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    r = run(ns.model, ns.steps, ns.hogs, ns.busy)
    if ns.json:
        print(json.dumps(r))
    else:
        for row in r["rows"]:
            print(f"{row['phase']:<7} epoch {row['epoch']}: decode {row['decode_tok_s']:.1f} tok/s, FFN rows "
                  f"{row['ffn_rows']}, rates {row['rates']} (root {row['root']})")
        print(f"after / before re-planning ({r['hogs']} hog(s) on CPU {r['hog_cpu']}): {r['after_vs_before']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
