"""Re-planning by measured speed, measured: two daemons on loopback, one sharing its core with a hog.

    python -m dllp2p.commands.replan_bench [--model PATH] [--steps N] [--hogs N] [--busy 0|1] [--json]

Two `dllp2p daemon` processes on 127.0.0.1 (each pinned to one CPU with os.sched_setaffinity, one
thread each, the weighted plan, each other's --peer, a fresh cluster key; the first started a second
before the other, so it is the root), then prompts through the first, greedy, `--steps` tokens each:

    quiet     2 prompts: the first plans by capacity (nothing measured yet), the second by the rates the
              first measured (a re-plan when they differ beyond scheduler.RATE_TOLERANCE)
    hog       a process spinning on the second daemon's CPU (--busy 0: the first's; bench_load.cpu_hog), then
    before    1 prompt on the kept session: the plan made before the hog
    weighted  (once the daemons' Status polls carry the slower rate) 2 prompts: the root re-plans by the
              rates (these daemons run with --keep-busy: the worker stays in the plan)
    then the two daemons are stopped and started again (the same state and caches, the hog still running)
    without --keep-busy, as a daemon runs by default:
    measure   1 prompt: nothing measured yet, a plan of both by capacity (the worker measures its CPU wait)
    left out  1 prompt: the root leaves the busy worker out (session/busy.py): its first alone (engine built)
    dropped   3 more prompts alone, the worker still left out
    then the hog is stopped, and once the worker's time out (busy.BASE_S) is over:
    tried     1 prompt: the worker planned in again, not judged (busy.TRIAL_S)
    back      2 prompts: judged with the waits of its quiet steps, it stays in (a try judged busy still,
              on a slow machine where it measured the hog: "out again", and tried again, 3 times at most)

Printed per prompt: decode tok/s and the nodes that computed it (as `dllp2p run` reports them), the FFN
rows per node of the root's latest plan (a root alone may show its last cluster plan), the rates
and CPU waits the daemons report and the workers the root left out; then the ratios, each of medians of
one run: weighted / before, dropped / before, dropped / weighted, and back / quiet with the node counts.
The hog and the daemons are stopped however it ends. On a machine that other programs use the figures are
noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..session.busy import TRIAL_S
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


def start_daemons(tmp: Path, model: str | None, cpus: list[int], keep_busy: bool = True,
                  ports: list[int] | None = None) -> tuple[list[subprocess.Popen], list[str], Path]:
    key = tmp / "cluster.key"
    if not key.exists():
        subprocess.run([*CLI, "key", "new", "--out", str(key)], check=True, capture_output=True)
    ports = ports or [_free_port() for _ in cpus]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i, (cpu, port) in enumerate(zip(cpus, ports)):
        cmd = [*CLI, "daemon", "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--no-discovery",
               "--cluster", f"replan-{os.getpid()}", "--state-dir", str(tmp / f"d{i}"), "--key-file", str(key),
               "--plan", "weighted", "--api", "off", "--peer", *[a for a in addresses if a != addresses[i]]]
        if model:
            cmd += ["--model", model]
        if keep_busy:
            cmd += ["--keep-busy"]
        log = open(tmp / f"d{i}.log", "a")
        env = {**os.environ, "DLLP2P_DROP_BUSY": "on"}  # the default, whatever this process was started with
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=_pinned(cpu), env=env))
        if i == 0:
            time.sleep(1.0)  # the first started is the root (the earliest start wins the election)
    return procs, addresses, key


def stop_daemons(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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


def prompt(address: str, key: Path, steps: int) -> tuple[float, int]:
    """(decode tok/s, the nodes that computed it) as `dllp2p run` reports them."""
    r = subprocess.run([*CLI, "run", "--prompt", PROMPT, "--temperature", "0", "--steps", str(steps), "--daemon",
                        address, "--key-file", str(key)], capture_output=True, text=True, timeout=300)
    found = re.search(r"decode ([0-9.]+) tok/s", r.stderr)
    nodes = re.search(r", ([0-9]+) nodes?\)", r.stderr)
    if r.returncode != 0 or not found or not nodes:
        raise RuntimeError(f"the prompt failed: {r.stderr.strip()[-400:]}")
    return float(found.group(1)), int(nodes.group(1))


def plan_rows(address: str, key: Path) -> dict[str, Any]:
    """The latest plan's epoch, FFN rows per node and each node's rate, as `dllp2p status --json` tells them."""
    s = status(address, key)
    nodes = s.get("nodes", [])
    return {"epoch": (s.get("plan") or {}).get("epoch"),
            "ffn_rows": {n["id"]: n["slice"]["ffn_rows"][1] - n["slice"]["ffn_rows"][0] for n in nodes if n["slice"]},
            "rates": {n["id"]: round(n["rate"] or 0.0, 1) for n in nodes},
            "waits_us": {n["id"]: round((n.get("wait_ms") or 0.0) * 1e3, 1) for n in nodes},
            "left_out": {k: v["reason"] for k, v in (s.get("left_out") or {}).items()},
            "root": next((n["id"] for n in nodes if n["role"] == "root"), None)}


def run(model: str | None, steps: int, n_hogs: int = 1, busy: int = 1) -> dict[str, Any]:
    """busy: the daemon (0: the one prompts go to, 1: the other) whose CPU the hogs share."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dllp2p-replan-") as tmp, contextlib.ExitStack() as hogs:
        procs, addresses, key = start_daemons(Path(tmp), model, cpus[:2])
        ports = [int(a.rsplit(":", 1)[1]) for a in addresses]

        def one(phase: str) -> None:
            tok_s, nodes = prompt(addresses[0], key, steps)
            rows.append({"phase": phase, "decode_tok_s": tok_s, "nodes": nodes, **plan_rows(addresses[0], key)})
            print(json.dumps(rows[-1]), file=sys.stderr)

        try:
            wait_joined(addresses, key)
            one("quiet")
            time.sleep(POLL_S * 1.5)
            one("quiet")
            for _ in range(n_hogs):
                hogs.enter_context(cpu_hog(cpus[busy]))
            time.sleep(0.3)
            one("before")  # the kept session: the plan made before the hog
            for _ in range(2):
                time.sleep(POLL_S * 1.5)  # the daemons' polls carry the slower rate
                one("weighted")
        finally:
            stop_daemons(procs)
        procs, addresses, key = start_daemons(Path(tmp), model, cpus[:2], keep_busy=False, ports=ports)
        try:
            wait_joined(addresses, key)
            one("measure")
            time.sleep(POLL_S * 1.5)  # the worker's CPU wait reaches the root by its Status poll
            for phase in ("left out", "dropped", "dropped", "dropped"):  # back to back: within busy.BASE_S
                one(phase)
            hogs.close()  # the hog ends; the worker is tried again when its time out is over
            for _ in range(3):  # a try that measured the hog still (a slow machine): out 60 s, 120 s more
                left = (status(addresses[0], key).get("left_out") or {}).values()
                time.sleep(max([0.0, *(x["until"] - time.time() for x in left)]) + 0.5)
                one("tried")  # planned in again; nothing judged for busy.TRIAL_S
                time.sleep(TRIAL_S + POLL_S * 1.5)
                one("back")  # judged with the waits of its steps without the hog: taken back
                if rows[-1]["nodes"] > 1:
                    one("back")
                    break
                rows[-1]["phase"] = "out again"
        finally:
            stop_daemons(procs)
    med = {p: statistics.median(r["decode_tok_s"] for r in rows if r["phase"] == p)
           for p in ("quiet", "before", "weighted", "dropped", "back") if any(r["phase"] == p for r in rows)}
    med.setdefault("back", 0.0)
    return {"rows": rows, "hog_cpu": cpus[busy], "hogs": n_hogs, "tok_s": med,
            "weighted_vs_before": med["weighted"] / med["before"], "dropped_vs_before": med["dropped"] / med["before"],
            "dropped_vs_weighted": med["dropped"] / med["weighted"], "back_vs_quiet": med["back"] / med["quiet"],
            "nodes": {p: [r["nodes"] for r in rows if r["phase"] == p] for p in ("dropped", "back")}}


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
            left = f", left out {row['left_out']}" if row["left_out"] else ""
            print(f"{row['phase']:<8} epoch {row['epoch']}: decode {row['decode_tok_s']:.1f} tok/s on {row['nodes']} "
                  f"node(s), latest cluster plan's FFN rows {row['ffn_rows']}, rates {row['rates']}, CPU waits (us per exchange) {row['waits_us']}{left} "
                  f"(root {row['root']})")
        m = r["tok_s"]
        print(f"{r['hogs']} hog(s) on CPU {r['hog_cpu']}; decode tok/s (medians): quiet {m['quiet']:.1f}, before "
              f"re-planning {m['before']:.1f}, weighted re-plan {m['weighted']:.1f}, busy worker dropped "
              f"{m['dropped']:.1f}")
        print(f"weighted / before {r['weighted_vs_before']:.2f}x, dropped / before {r['dropped_vs_before']:.2f}x, "
              f"dropped / weighted {r['dropped_vs_weighted']:.2f}x")
        print(f"nodes per prompt: dropped {r['nodes']['dropped']}, back {r['nodes']['back']}; hog stopped: back "
              f"{m['back']:.1f} tok/s, back / quiet {r['back_vs_quiet']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
