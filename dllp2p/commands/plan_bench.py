"""The planner's acceptance check on shaped links: is `--plan auto`'s choice as fast as the best plan?

    sudo python3 -m dllp2p.commands.plan_bench [--nodes 3] [--steps 32] [--profiles fast slow]

Makes `nodes` network namespaces joined by a bridge (as tests/test_lan.py does), writes a random-weight
Llama-shaped model (Q4_0, not a real model: its tokens mean nothing), and for each link profile shapes
every node's link with tc (tbf at the profile's rate; the profile's added one-way delay with netem
under it where the kernel has netem). Then it measures each candidate with k = 1..nodes daemons (the
weighted plan over all k: what auto's "tp k" is; `--plan pipeline` over k >= 2 and `--plan hybrid` over
k >= 4: auto's pipelines and hybrids), and `--plan auto` with all of them (its plan_figures from
--plan-figures), each as a greedy `dllp2p run` of `steps` tokens through the root; decode ms/token from
the run's own figure, the median of --repeats runs (3) of each plan.

It prints per profile the measured ms/token of every candidate, auto's choice (why: `dllp2p plan`) and
its ms/token, and
whether the choice is within 10 % of the best candidate and not slower than the best with fewer nodes.
Timings need a quiet machine with a core per daemon; on a shared one they say little.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import DEFAULT_PORT
from ..formats.synthetic import SyntheticSpec, write_random_llama
from .replan_bench import stop_daemons

PROFILES = {  # name: (tbf rate, added one-way delay or "")
    "fast": ("10gbit", ""),
    "slow": ("100mbit", "1ms"),
}
SPEC = SyntheticSpec(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=2816, vocab_size=2048, seed=20)
PORT = DEFAULT_PORT
CLI = [sys.executable, "-m", "dllp2p.cli"]


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=60)


def address(i: int) -> str:
    return f"10.213.10.{i + 1}"


class Lan:
    """nodes namespaces on one bridge (a hub namespace); node i's veth is e{i}{tag} in namespace names[i]."""

    def __init__(self, nodes: int):
        self.tag = f"{os.getpid() % 100000}"
        self.hub, self.names = f"plh{self.tag}", [f"pln{i}{self.tag}" for i in range(nodes)]
        for ns in (self.hub, *self.names):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            sh("ip", "link", "add", self.dev(i), "netns", ns, "type", "veth", "peer", "name", f"p{i}{self.tag}",
               "netns", self.hub)
            sh("ip", "-n", self.hub, "link", "set", f"p{i}{self.tag}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", self.dev(i))
            sh("ip", "-n", ns, "link", "set", self.dev(i), "up")

    def dev(self, i: int) -> str:
        return f"e{i}{self.tag}"

    def shape(self, rate: str, delay: str) -> str:
        """Every node's egress: tbf at rate (under netem's delay when given and available). -> what was set."""
        what = f"tbf {rate}"
        for i, ns in enumerate(self.names):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", self.dev(i), "root", check=False)
            tbf = ["tbf", "rate", rate, "burst", "1mb" if "gbit" in rate else "64kb", "latency", "50ms"]
            if delay and sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.dev(i), "root", "handle",
                            "1:", "netem", "delay", delay, check=False).returncode == 0:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.dev(i), "parent", "1:", "handle", "2:",
                   *tbf)
                what = f"tbf {rate} + netem {delay}"
            else:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.dev(i), "root", *tbf)
        return what

    def close(self) -> None:
        for ns in (*self.names, self.hub):
            sh("ip", "netns", "del", ns, check=False)


class Cluster:
    """k daemons, node 0 (started first: the root) with `plan`; the others poll it and each other."""

    def __init__(self, lan: Lan, k: int, plan: str, model: Path, key: Path, tmp: Path, cache: Path,
                 plan_figures: str = ""):
        self.lan, self.procs = lan, []
        peers = [f"{address(i)}:{PORT}" for i in range(k)]
        for i in range(k):
            cmd = [*CLI, "daemon", "--host", address(i), "--port", str(PORT), "--threads", "1", "--no-discovery",
                   "--api", "off", "--cluster", f"plan-bench-{lan.tag}", "--state-dir", str(tmp / f"{plan}{k}-{i}"),
                   "--key-file", str(key), "--model", str(model), "--plan", plan,
                   *(["--peer", *[p for j, p in enumerate(peers) if j != i]] if k > 1 else [])]
            env = {**os.environ, "DLLP2P_CACHE_DIR": str(cache), "DLLP2P_PLAN_FIGURES": plan_figures}
            p = subprocess.Popen(["ip", "netns", "exec", lan.names[i], *cmd], stderr=subprocess.PIPE, text=True,
                                 env=env)
            if "listening on" not in p.stderr.readline():
                raise RuntimeError(f"daemon {i} did not start")
            self.procs.append(p)
            time.sleep(0.3 if i == 0 else 0.05)  # the first started is the root
        time.sleep(2.0 + (4.0 if plan == "auto" else 0.0))  # membership polls; auto: every node measures itself

    def median_run(self, steps: int, key: Path, repeats: int) -> tuple[float, int]:
        """run() `repeats` times: -> (the median decode ms/token, nodes of its plan). One 32-token run of a
        plan spread 2.0-4.6 ms/token from run to run here (3 daemons on 2 vCPUs): more than the 10 % judged."""
        runs = [self.run(steps, key) for _ in range(repeats)]
        return statistics.median(ms for ms, _ in runs), runs[-1][1]

    def run(self, steps: int, key: Path) -> tuple[float, int]:
        """A greedy prompt through the root: -> (decode ms/token, nodes of its plan)."""
        p = sh("ip", "netns", "exec", self.lan.names[0], *CLI, "run", "--daemon", f"{address(0)}:{PORT}",
               "--prompt", "hello there", "--steps", str(steps), "--temperature", "0", "--key-file", str(key))
        found = re.search(r"decode ([0-9.]+) tok/s", p.stderr)
        nodes = re.search(r"(\d+) nodes?\)", p.stderr)
        if not found:
            raise RuntimeError(f"no decode figure in: {p.stderr}")
        return 1e3 / float(found.group(1)), int(nodes.group(1)) if nodes else 1

    def why(self, key: Path) -> str:
        """How the root chose its plan (`dllp2p plan --json`: planner.why)."""
        p = sh("ip", "netns", "exec", self.lan.names[0], *CLI, "plan", "--host", address(0), "--port", str(PORT),
               "--json", "--key-file", str(key), check=False)
        try:
            return json.loads(p.stdout).get("why", "")
        except ValueError:
            return ""

    def close(self) -> None:
        stop_daemons(self.procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--plan-figures", default="", help="the auto root's plan_figures (config.py), e.g. 'ram_mb=30'")
    ap.add_argument("--repeats", type=int, default=3, help="runs per plan; the median is compared (default 3)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dllp2p-plan-bench-"))
    model = write_random_llama(tmp / "model.gguf", SPEC)
    key = tmp / "cluster.key"
    sh(*CLI, "key", "new", "--out", str(key))
    cache = tmp / "cache"
    lan = Lan(args.nodes)
    ok = True
    try:
        for name in args.profiles:
            what = lan.shape(*PROFILES[name])
            measured: dict[tuple[str, int], float] = {}  # (plan, nodes) -> ms/token
            runs = [("weighted", k) for k in range(1, args.nodes + 1)]
            runs += [("pipeline", k) for k in range(2, min(args.nodes, SPEC.n_layers) + 1)]
            runs += [("hybrid", k) for k in range(4, args.nodes + 1)]  # stages of 2-node groups
            for plan, k in runs:
                c = Cluster(lan, k, plan, model, key, tmp, cache)
                try:
                    c.run(4, key)  # warm: weights pushed, programs compiled
                    measured[plan, k] = c.median_run(args.steps, key, args.repeats)[0]
                finally:
                    c.close()
            c = Cluster(lan, args.nodes, "auto", model, key, tmp, cache, args.plan_figures)
            try:
                c.run(4, key)
                auto_ms, auto_k = c.median_run(args.steps, key, args.repeats)
                why = c.why(key)
            finally:
                c.close()
            best = min(measured.values())
            fewer = min([v for (_, k), v in measured.items() if k < auto_k], default=float("inf"))
            within = auto_ms <= 1.1 * best
            not_slower = auto_ms <= 1.1 * fewer
            ok &= within and not_slower
            row = ", ".join(f"{'tp' if p == 'weighted' else p} {k} {v:.1f}" for (p, k), v in measured.items())
            print(f"{name} ({what}): measured ms/token {row}; auto {why or f'chose {auto_k} node(s)'}; measured "
                  f"{auto_ms:.1f} ms/token ({auto_ms / best:.2f}x the best; within 10 %: {within}; not slower than "
                  f"fewer nodes: {not_slower})")
    finally:
        lan.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the model, key and caches it wrote
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
