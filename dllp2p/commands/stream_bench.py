"""Weight streaming's acceptance run: a Llama-2-7B-shaped model on N daemons, each in its own memory cgroup.

    sudo python3 -m dllp2p.commands.stream_bench [--nodes 4] [--layers 32] [--steps 16] [--ram-mb 1536]
                                                 [--stream-mb MIB] [--dir DIR]

Writes a random-weight model of Llama 2 7B's shape (dim 4096, 32 heads, FFN 11008, vocabulary 32000, every
matrix Q4_0: ~3.8 GB at 32 layers; `--layers` fewer to fit the time; not a trained model) into a temporary
directory (or --dir, kept for a rerun), and greedy-decodes a prompt three ways:

- one node in this process's namespace, no limit (`dllp2p run --local --mem-limit off`): the reference text;
- `nodes` daemons in network namespaces on one bridge (plan_bench.Lan), a pow2 plan, each daemon in its
  own memory cgroup (memlimit.MemoryCgroup) of `--ram-mb` (default 1536): its share fits, it runs from RAM;
- the same daemons (their slice and packed caches kept) in cgroups of `--stream-mb` (default: 90 % of a
  node's share, at least STREAM_FLOOR_MB): `--mem-limit` is what `auto` makes of the cgroup's limit (the
  limit less memlimit.PROCESS_RESERVE; given explicitly, as `ip netns exec` hides /sys/fs/cgroup); the
  share does not fit, it streams (jit/ir_stream.py).

Before each configuration the model's and the caches' pages are dropped from the page cache (fadvise), so
each daemon's cgroup is charged for what it reads itself.

Per configuration it prints ms/token (the run's decode figure), every daemon's resident memory (VmRSS
peak sampled during the measured run, and VmHWM since start), the bytes it read from disk per generated
token (/proc/PID/io read_bytes over the measured run), its cgroup's peak charge, and whether the text equals
the single node's. Each daemon gets 1 thread; timings need a quiet machine with a core per daemon.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..formats.synthetic import SyntheticSpec, write_random_q4_0
from ..memlimit import PROCESS_RESERVE, MemoryCgroup, cgroup_unavailable
from .plan_bench import CLI, PORT, Lan, address
from .replan_bench import stop_daemons

PROMPT = "The weights stream from the disk"
# the least cgroup a streaming daemon gets by default: the process itself peaks at ~130 MiB of anonymous
# memory while it packs and compiles a 7B-shaped share (16 layers, measured), beside the page cache it reads
STREAM_FLOOR_MB = 400


def sh(*cmd: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def llama2_7b(layers: int) -> SyntheticSpec:
    return SyntheticSpec(dim=4096, n_layers=layers, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
                         context_length=4096, seed=7)


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) << 10 for line in f if line.startswith(field + ":")), 0)


def _read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def evict(paths) -> None:  # noqa: ANN001
    """Drop these files' clean pages from the page cache (POSIX_FADV_DONTNEED), so the next configuration's
    daemons read (and their cgroups are charged for) what they use, not what an earlier one left cached."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _decode(stderr: str) -> float:
    found = re.search(r"decode ([0-9.]+) tok/s", stderr)
    if not found:
        raise RuntimeError(f"no decode figure in: {stderr[-2000:]}")
    return 1e3 / float(found.group(1))


class Daemons:
    """`nodes` daemons, node 0 the root (started first), each in namespace lan.names[i] and cgroup i."""

    def __init__(self, lan: Lan, model: Path, key: Path, tmp: Path, limit: int, tag: str):
        self.lan, self.procs, self.groups = lan, [], []
        nodes = len(lan.names)
        peers = [f"{address(i)}:{PORT}" for i in range(nodes)]
        try:
            for i in range(nodes):
                cg = MemoryCgroup(f"dllp2p-stream-{tag}-{i}-{os.getpid()}", limit).__enter__()
                self.groups.append(cg)
                cmd = [*CLI, "daemon", "--host", address(i), "--port", str(PORT), "--threads", "1", "--no-discovery",
                       "--api", "off", "--cluster", f"stream-bench-{lan.tag}", "--state-dir", str(tmp / f"state{i}"),
                       "--key-file", str(key), "--model", str(model), "--plan", "pow2",
                       # what --mem-limit auto makes of the cgroup's limit (`ip netns exec` mounts a /sys without it)
                       "--mem-limit", f"{max(64 << 20, limit - PROCESS_RESERVE) >> 20}M",
                       *(["--peer", *[p for j, p in enumerate(peers) if j != i]] if nodes > 1 else [])]
                env = {**os.environ, "DLLP2P_CACHE_DIR": str(tmp / f"cache{i}")}
                p = subprocess.Popen(["ip", "netns", "exec", lan.names[i], *cmd], stderr=subprocess.PIPE, text=True,
                                     env=env, preexec_fn=cg.enter)
                if "listening on" not in p.stderr.readline():
                    raise RuntimeError(f"daemon {i} did not start")
                threading.Thread(target=self._drain, args=(p, i), daemon=True).start()
                self.procs.append(p)
                time.sleep(0.3 if i == 0 else 0.05)  # the first started is the root
            time.sleep(3.0)  # membership polls
        except BaseException:
            self.close()
            raise

    def _drain(self, p: subprocess.Popen, i: int) -> None:
        for line in p.stderr:  # the daemon's log: kept flowing; its streaming lines shown
            if "streaming" in line or "memory budget" in line or "Error" in line:
                print(f"  [node {i}] {line.rstrip()}", file=sys.stderr)

    def run(self, steps: int, key: Path) -> tuple[str, float, list[dict]]:
        """A greedy prompt through the root, each daemon's memory sampled: -> (text, ms/token, per node)."""
        pids = [p.pid for p in self.procs]
        before = [_read_bytes(pid) for pid in pids]
        peak = [0] * len(pids)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for i, pid in enumerate(pids):
                    peak[i] = max(peak[i], _status(pid, "VmRSS"))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            p = sh("ip", "netns", "exec", self.lan.names[0], *CLI, "run", "--daemon", f"{address(0)}:{PORT}",
                   "--prompt", PROMPT, "--steps", str(steps), "--temperature", "0", "--key-file", str(key), timeout=3600)
        finally:
            done.set()
            sampler.join()
        nodes = [{"rss": peak[i], "hwm": _status(pid, "VmHWM"), "read": (_read_bytes(pid) - before[i]) / steps,
                  "cgroup_peak": self.groups[i].peak() or 0} for i, pid in enumerate(pids)]
        return p.stdout, _decode(p.stderr), nodes

    def close(self) -> None:
        stop_daemons(self.procs)
        for cg in self.groups:
            cg.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32, help="Llama 2 7B has 32 (default); fewer to fit the time")
    ap.add_argument("--steps", type=int, default=16, help="greedy tokens per measured run (default 16)")
    ap.add_argument("--ram-mb", type=int, default=1536, help="each daemon's cgroup limit, running from RAM")
    ap.add_argument("--stream-mb", type=int, help="each daemon's cgroup limit when streaming (default: 90 %% of "
                                                  f"a node's share, at least {STREAM_FLOOR_MB})")
    ap.add_argument("--configs", nargs="+", choices=("ram", "stream"), default=["ram", "stream"],
                    help="which configurations to run (default both)")
    ap.add_argument("--dir", type=Path, help="where the model and caches go (kept); default: a temporary dir")
    args = ap.parse_args(argv)
    why = cgroup_unavailable()
    if why:
        print(f"stream_bench: {why}", file=sys.stderr)
        return 2
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="dllp2p-stream-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = tmp / f"llama2-7b-shape-{args.layers}L-q4_0.gguf"
    if not model.exists():
        t0 = time.perf_counter()
        write_random_q4_0(model, llama2_7b(args.layers))
        print(f"model: {model} ({model.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s to write)")
    size = model.stat().st_size
    share = size // args.nodes
    stream_mb = args.stream_mb or max(int(0.9 * share / 2**20), STREAM_FLOOR_MB)
    key = tmp / "cluster.key"
    if not key.exists():
        sh(*CLI, "key", "new", "--out", str(key))
    ref = sh(*CLI, "run", "--local", "--model", str(model), "--prompt", PROMPT, "--steps", str(args.steps),
             "--temperature", "0", "--mem-limit", "off", "--threads", "1", timeout=3600,
             env={**os.environ, "DLLP2P_CACHE_DIR": str(tmp / "cache-single")})
    print(f"single node, no limit: {_decode(ref.stderr):.1f} ms/token")
    lan = Lan(args.nodes)
    ok = True
    try:
        for name, mb in [c for c in (("from RAM", args.ram_mb), ("streaming", stream_mb))
                         if ("ram" if c[0] == "from RAM" else "stream") in args.configs]:
            evict([model, *(p for p in tmp.glob("*/**/*") if p.is_file())])
            d = Daemons(lan, model, key, tmp, mb << 20, name[:4])
            try:
                d.run(2, key)  # warm: slices pushed and cached, packed, compiled
                text, ms, nodes = d.run(args.steps, key)
            finally:
                d.close()
            same = text == ref.stdout
            ok &= same
            print(f"{name}: {args.nodes} daemons in {mb} MiB cgroups, share ~{share / 2**20:.0f} MiB each: "
                  f"{ms:.1f} ms/token; greedy text equals the single node's: {same}")
            for i, n in enumerate(nodes):
                print(f"  node {i}: VmRSS peak {n['rss'] / 2**20:.0f} MiB during the run (VmHWM {n['hwm'] / 2**20:.0f}), "
                      f"cgroup peak {n['cgroup_peak'] / 2**20:.0f} MiB, read from disk {n['read'] / 2**20:.1f} MiB/token")
    finally:
        lan.close()
        if args.dir is None:  # its own temp dir (a 3.8 GB model at 32 layers); a --dir is kept for the next run
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
