"""Tensor-parallel benchmark on loopback: N nodes, each in its own process (forked: no shared GIL),
meshed by real TCP connections on 127.0.0.1 (the sockets a daemon would hand its node). Like a daemon's
worker, every node but the root blocks on a small frame from the root per step, then runs its forward.

    python -m dllp2p.tpbench [--model PATH] [--layout N:T[:POLICY] ...] [--exchange exact q8] [--tokens N]
                             [--rounds R] [--all-logits] [--encrypt off|on|both] [--json]

Without --model it writes (once, under /tmp) a random-weight model shaped like distributed-llama's
benchmark: dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 5632, vocab 32000, Q4_0 — noise, for speed
only. Every layout runs once per exchange (scheduler.EXCHANGES: "exact" row-split, bit-identical to one
node; "q8" Megatron partial sums in Q8_0); each such run is a cluster, and all clusters are started
first and stay up. Each gets the same prompt, then they take turns: in each of R rounds every cluster
decodes `tokens` greedy tokens, in the order given (each step asking the workers for their best logit
only, as `dllp2p run --temperature 0` does; --all-logits: for all of them, as sampling without top-k). A shared machine's speed drifts by tens of percent
over minutes, so the clusters are compared round by round: `vs_first` is the median, over rounds, of a
cluster's median ms/token divided by the first cluster's in the same round. The root's first logits are
compared with the first cluster's (max |difference|: 0 for exact). Also reported per cluster: ms/token
and sync ms/token (time thread 0 of the root spends in exchanges), medians over all decoded tokens, and
the bytes the root sends and receives per token.

A layout's POLICY is the plan's (config.POLICIES): by default pow2 for 2^k nodes, else weighted (tensor
parallel); `pipeline` (a layer range per node) or `hybrid` (stages of 2-node groups) make pipeline plans
(dllp2p/pipeline.py), e.g. `--layout 1:2 2:1 2:1:pipeline 4:1:hybrid` compares them in the same rounds.

--encrypt on seals every exchange message (ChaCha20-Poly1305, as with a cluster key: tp_program's sealed
exchange, under random per-link keys); `both` runs every multi-node cluster plain and sealed, in turn, so
the cost of the encryption is the ratio of the two in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from .config import cache_dir as configured_cache_dir
from .formats import QType, load_model
from .formats.synthetic import SyntheticSpec, write_random_llama
from .pipeline import build_plan
from .pipeline_node import plan_node, plan_tensors
from .scheduler import EXCHANGES, Peer
from .jit.tp_program import RECV_SPINS

DLLAMA_SHAPE = SyntheticSpec(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, vocab_size=32000,
                             context_length=4096, qtype=QType.Q4_0, embed_qtype=QType.Q4_0, tied_output=False)
# Before a cluster's turn: the cluster that ran before has native threads spinning ~10 ms after their
# last step (ir_barrier.IDLE_SPINS) before they sleep; let them, so they do not share the cores.
SETTLE_S = 0.05


def random_model_path() -> Path:
    path = Path("/tmp/dllp2p-bench/random-dllama-shape-q4_0.gguf")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_random_llama(tmp, DLLAMA_SHAPE)
        tmp.rename(path)
    return path


def tcp_mesh(n: int) -> list[list[socket.socket | None]]:
    socks: list[list[socket.socket | None]] = [[None] * n for _ in range(n)]
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for i in range(n):
            for j in range(i + 1, n):
                a = socket.create_connection(("127.0.0.1", port))
                b, _ = server.accept()
                socks[i][j], socks[j][i] = a, b
    return socks


class Cluster:
    """One layout with one exchange: the root's TPNode in this process, every other node forked.

    step(tokens, pos) sends each worker the step's small frame, runs the root's forward and returns
    its logits; decode(n) runs n greedy steps and records ms and sync ms per token."""

    def __init__(self, model, n_nodes: int, threads: int, exchange: str, ctx: int, recv_spins: int | None = None,
                 sealed: bool = False, cache_dir: Path | None = None, policy: str | None = None):
        self.n_nodes, self.threads, self.exchange, self.sealed = n_nodes, threads, exchange, sealed
        keys = random_exchange_keys(n_nodes) if sealed else [None] * n_nodes
        peers = [Peer(f"bench{i}", f"127.0.0.1:{i}", threads, 1.0) for i in range(n_nodes)]
        self.policy = policy or ("weighted" if n_nodes & (n_nodes - 1) else "pow2")
        p = build_plan(model.config, peers, 1, self.policy, exchange=exchange)
        if p.n_nodes != n_nodes:
            raise ValueError(f"a {self.policy} plan of this model takes {p.n_nodes} nodes, not {n_nodes}")
        self._socks = tcp_mesh(n_nodes)
        self._ctl = [socket.socketpair() if i else (None, None) for i in range(n_nodes)]
        # nodes sharing too few cores must not spin on receives (it takes the core from the node awaited)
        spins = recv_spins if recv_spins is not None else 0 if n_nodes * threads > (os.cpu_count() or 1) else RECV_SPINS
        self._children = [_fork_node(model, p, i, self._socks[i], self._ctl[i][1], ctx, threads, spins, keys[i],
                                     cache_dir)
                          for i in range(1, n_nodes)]
        self.root = None
        try:
            self.root = plan_node(model.config, p, 0, plan_tensors(model, p, 0), self._socks[0], ctx, threads,
                                  recv_spins=spins, exchange_keys=keys[0], cache_dir=cache_dir)
            for i in range(1, n_nodes):
                self._ctl[i][0].settimeout(600)  # a child builds (and may compile) its node first
                if _recv_exact(self._ctl[i][0], 1) != b"R":
                    raise RuntimeError(f"node {i} failed to start")
        except BaseException:
            self.close()
            raise
        self.pos, self.logits = 0, None
        self.ms: list[float] = []
        self.sync: list[float] = []
        self.round_ms: list[float] = []  # median ms/token of each round

    def step(self, toks: list[int], top: int = 0) -> np.ndarray:
        frame = struct.pack(f"<qqq{len(toks)}q", self.pos, len(toks), top, *toks)
        for i in range(1, self.n_nodes):
            self._ctl[i][0].sendall(frame)
        self.logits = self.root.forward(toks, self.pos, top)
        self.pos += len(toks)
        return self.logits

    def decode(self, tokens: int, top: int = 1) -> None:
        ms = []
        for _ in range(tokens):
            t0 = time.perf_counter()
            self.step([int(np.argmax(self.logits))], top=top)  # greedy: 1 = the workers send their best logit
            ms.append((time.perf_counter() - t0) * 1e3)
            self.sync.append(self.root.stats["sync_ms"])
        self.ms += ms
        self.round_ms.append(statistics.median(ms))

    def close(self) -> None:
        for i in range(1, self.n_nodes):
            with contextlib.suppress(OSError):
                self._ctl[i][0].sendall(struct.pack("<qqq", -1, 0, 0))
        for pid in self._children:
            os.waitpid(pid, 0)
        self._children = []
        for a, b in self._ctl[1:]:
            a.close()
            b.close()
        if self.root is not None:
            self.root.close()
            self.root = None
        for row in self._socks:
            for sock in row:
                if sock is not None:
                    sock.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def random_exchange_keys(n: int) -> list[list[tuple[bytes, bytes] | None]]:
    """Per node, per peer, the sealed exchange's (send, receive) keys: random, one per direction of each link
    (in a cluster both ends derive them from the link's secure channel: wire.secure.mesh_keys)."""
    key = {(i, j): os.urandom(32) for i in range(n) for j in range(n) if i != j}  # i -> j
    return [[None if i == j else (key[i, j], key[j, i]) for j in range(n)] for i in range(n)]


def _fork_node(model, p, index: int, peers, ctl: socket.socket, ctx: int, threads: int, spins: int,
               keys=None, cache_dir: Path | None = None) -> int:
    """Node `index` in a child process, as on a device of its own: it builds its TPNode, says b"R" on
    its control socket, then, like a daemon's worker, blocks for each step's small frame from the root
    (position, token count, logits asked for, tokens) and runs its forward; a negative position ends it. -> the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        node = plan_node(model.config, p, index, plan_tensors(model, p, index), peers, ctx, threads, recv_spins=spins,
                         exchange_keys=keys, cache_dir=cache_dir)
        ctl.sendall(b"R")
        while True:
            pos, n, top = struct.unpack("<qqq", _recv_exact(ctl, 24))
            if pos < 0:
                break
            node.forward(list(struct.unpack(f"<{n}q", _recv_exact(ctl, 8 * n))), pos, top)
        node.close()
        code = 0
    except BaseException as e:  # noqa: BLE001 - the child reports and exits; the root sees the lost peer
        print(f"tpbench: node {index}: {e}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control socket closed")
        buf += chunk
    return bytes(buf)


def run(model, layouts: list[tuple[int, int] | tuple[int, int, str]], exchanges: list[str], prompt: list[int], tokens: int, rounds: int,
        recv_spins: int | None = None, top: int = 1, encrypt: str = "off",
        cache_dir: Path | None = None) -> list[dict]:
    """Start every (layout, exchange, sealed or not) cluster, prefill each, then `rounds` rounds of
    `tokens` decoded tokens per cluster in turn. -> one result dict per cluster, in order."""
    ctx = len(prompt) + tokens * rounds + 1
    seals = {"off": [False], "on": [True], "both": [False, True]}[encrypt]
    with contextlib.ExitStack() as stack:
        clusters = [stack.enter_context(Cluster(model, n, t, ex, ctx, recv_spins, sealed, cache_dir, *policy))
                    for n, t, *policy in layouts for ex in (exchanges if n > 1 else ["exact"])
                    for sealed in (seals if n > 1 else [False])]
        first = [c.step(prompt).copy() for c in clusters]
        for _ in range(rounds):
            for c in clusters:
                time.sleep(SETTLE_S)
                c.decode(tokens, top)
        base = clusters[0].round_ms
        results = []
        for c, logits in zip(clusters, first):
            s = c.root.stats
            results.append({
                "nodes": c.n_nodes, "threads_per_node": c.threads, "policy": c.policy, "exchange": c.exchange,
                "sealed": c.sealed,
                "ms_per_token": statistics.median(c.ms), "sync_ms_per_token": statistics.median(c.sync),
                "round_ms_per_token": c.round_ms,
                "vs_first": statistics.median(m / b for m, b in zip(c.round_ms, base)),
                "root_bytes_sent": s["bytes_sent"], "root_bytes_received": s["bytes_received"],
                "identical_to_first_layout": bool(np.array_equal(logits, first[0])),
                "max_abs_logit_diff": float(np.abs(logits - first[0]).max()),
            })
        return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dllp2p.tpbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: a random model of distributed-llama's benchmark shape)")
    ap.add_argument("--layout", nargs="+", default=["1:2", "2:1", "4:1"],
                    help="NODES:THREADS_PER_NODE[:POLICY] ... (POLICY: pow2, weighted, pipeline, hybrid)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16, help="tokens each cluster decodes per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of turns (clusters are compared round by round)")
    ap.add_argument("--exchange", nargs="+", choices=EXCHANGES, default=list(EXCHANGES),
                    help="exchanges to measure multi-node layouts with (default: all)")
    ap.add_argument("--recv-spins", type=int, help=f"non-blocking receive tries before blocking (default "
                    f"{RECV_SPINS}, 0 when the nodes' threads outnumber the cores)")
    ap.add_argument("--all-logits", action="store_true",
                    help="the workers send all their logits each step (as sampling without top-k needs), not "
                         "just their best (greedy)")
    ap.add_argument("--encrypt", choices=("off", "on", "both"), default="off",
                    help="seal the exchange (ChaCha20-Poly1305, as with a cluster key); both: each multi-node "
                         "cluster plain and sealed, in turn (default: off)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        ap.error("--tokens and --rounds must be at least 1")
    model = load_model(args.model or random_model_path())
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt_tokens)]
    layouts = [(int(n), int(t), *policy) for n, t, *policy in (spec.split(":") for spec in args.layout)]
    results = run(model, layouts, args.exchange, prompt, args.tokens, args.rounds, args.recv_spins,
                  0 if args.all_logits else 1, args.encrypt, configured_cache_dir(os.environ))
    if args.json:
        print(json.dumps({"model": str(args.model or "random dllama-shape Q4_0"), "tokens_per_round": args.tokens,
                          "rounds": args.rounds, "results": results}))
        return 0
    print(f"{args.rounds} round(s) x {args.tokens} token(s) per cluster; vs first = median over rounds of "
          f"(ms/token / the first cluster's in that round)")
    for r in results:
        sent, received = r["root_bytes_sent"], r["root_bytes_received"]
        rounds = " ".join(f"{m:.1f}" for m in r["round_ms_per_token"])
        print(f"{r['nodes']} node(s) x {r['threads_per_node']} thread(s), {r['policy']} plan, {r['exchange']} exchange{', sealed' if r['sealed'] else ''}: "
              f"{r['ms_per_token']:.1f} ms/token (rounds {rounds}), vs first x{r['vs_first']:.3f}, "
              f"sync {r['sync_ms_per_token']:.2f} ms/token, root sends {sent / 1e3:.1f} kB ({sent / 1024:.1f} KiB), "
              f"receives {received / 1e3:.1f} kB ({received / 1024:.1f} KiB) per token, "
              f"first logits vs the first cluster: max |diff| {r['max_abs_logit_diff']:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
