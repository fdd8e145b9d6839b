"""Tensor-parallel benchmark on loopback: N nodes, each in its own process (forked: no shared GIL),
meshed by real TCP connections on 127.0.0.1 (the sockets a daemon would hand its node). Like a daemon's
worker, every node but the root blocks on a small frame from the root per step, then runs its forward.

    python -m dllp2p.tpbench [--model PATH] [--layout N:T ...] [--exchange exact q8] [--tokens N] [--json]

Without --model it writes (once, under /tmp) a random-weight model shaped like distributed-llama's
benchmark: dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 5632, vocab 32000, Q4_0 — noise, for speed
only. Every layout gets the same prompt and greedy steps, once per exchange (scheduler.EXCHANGES: "exact"
row-split, bit-identical to one node; "q8" Megatron partial sums in Q8_0); the root's first logits are
compared with the first layout's (max |difference|: 0 for exact). Reported per layout: ms/token (median),
sync ms/token (time thread 0 of the root spends in exchanges), bytes sent and received by the root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from .formats import QType, load_model
from .formats.synthetic import SyntheticSpec, write_random_llama
from .scheduler import EXCHANGES, Peer, plan
from .jit.tp_program import RECV_SPINS
from .tp import TPNode, node_tensors

DLLAMA_SHAPE = SyntheticSpec(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, vocab_size=32000,
                             context_length=4096, qtype=QType.Q4_0, embed_qtype=QType.Q4_0, tied_output=False)


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


def run_layout(model, n_nodes: int, threads: int, prompt: list[int], tokens: int, exchange: str,
               recv_spins: int | None = None) -> dict:
    peers = [Peer(f"bench{i}", f"127.0.0.1:{i}", threads, 1.0) for i in range(n_nodes)]
    p = plan(model.config, peers, epoch=1, policy="weighted" if n_nodes & (n_nodes - 1) else "pow2", exchange=exchange)
    socks = tcp_mesh(n_nodes)
    ctl = [socket.socketpair() if i else (None, None) for i in range(n_nodes)]
    # nodes sharing too few cores must not spin on receives (it takes the core from the node awaited)
    spins = recv_spins if recv_spins is not None else 0 if n_nodes * threads > (os.cpu_count() or 1) else RECV_SPINS
    ctx = len(prompt) + tokens + 1
    children = [_fork_node(model, p, i, socks[i], ctl[i][1], ctx, threads, spins) for i in range(1, n_nodes)]
    root = None
    try:
        root = TPNode(model.config, p, 0, node_tensors(model, p, 0), socks[0], ctx, threads, recv_spins=spins)
        for i in range(1, n_nodes):
            ctl[i][0].settimeout(600)  # a child builds (and may compile) its node first
            if _recv_exact(ctl[i][0], 1) != b"R":
                raise RuntimeError(f"node {i} failed to start")

        def step(toks, pos):
            frame = struct.pack(f"<qq{len(toks)}q", pos, len(toks), *toks)
            for i in range(1, n_nodes):
                ctl[i][0].sendall(frame)
            return root.forward(toks, pos)

        logits = step(prompt, 0)
        first = logits.copy()
        ms, sync = [], []
        for i in range(tokens):
            t0 = time.perf_counter()
            logits = step([int(np.argmax(logits))], len(prompt) + i)
            ms.append((time.perf_counter() - t0) * 1e3)
            sync.append(root.stats["sync_ms"])
        s = root.stats
        return {"nodes": n_nodes, "threads_per_node": threads, "exchange": exchange, "ms_per_token": statistics.median(ms),
                "sync_ms_per_token": statistics.median(sync), "root_bytes_sent": s["bytes_sent"],
                "root_bytes_received": s["bytes_received"], "first_logits": first}
    finally:
        for i in range(1, n_nodes):
            try:
                ctl[i][0].sendall(struct.pack("<qq", -1, 0))
            except OSError:
                pass
        for pid in children:
            os.waitpid(pid, 0)
        for a, b in ctl[1:]:
            a.close()
            b.close()
        if root is not None:
            root.close()
        for row in socks:
            for sock in row:
                if sock is not None:
                    sock.close()


def _fork_node(model, p, index: int, peers, ctl: socket.socket, ctx: int, threads: int, spins: int) -> int:
    """Node `index` in a child process, as on a device of its own: it builds its TPNode, says b"R" on
    its control socket, then, like a daemon's worker, blocks for each step's small frame from the root
    (position, token count, tokens) and runs its forward; a negative position ends it. -> the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        node = TPNode(model.config, p, index, node_tensors(model, p, index), peers, ctx, threads, recv_spins=spins)
        ctl.sendall(b"R")
        while True:
            pos, n = struct.unpack("<qq", _recv_exact(ctl, 16))
            if pos < 0:
                break
            node.forward(list(struct.unpack(f"<{n}q", _recv_exact(ctl, 8 * n))), pos)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dllp2p.tpbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: a random model of distributed-llama's benchmark shape)")
    ap.add_argument("--layout", nargs="+", default=["1:2", "2:1", "4:1"], help="NODES:THREADS_PER_NODE ...")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--exchange", nargs="+", choices=EXCHANGES, default=list(EXCHANGES),
                    help="exchanges to measure multi-node layouts with (default: all)")
    ap.add_argument("--recv-spins", type=int, help=f"non-blocking receive tries before blocking (default "
                    f"{RECV_SPINS}, 0 when the nodes' threads outnumber the cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = load_model(args.model or random_model_path())
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt_tokens)]
    results, reference = [], None
    for spec in args.layout:
        n, t = (int(v) for v in spec.split(":"))
        for exchange in args.exchange if n > 1 else ["exact"]:
            r = run_layout(model, n, t, prompt, args.tokens, exchange, args.recv_spins)
            first = r.pop("first_logits")
            reference = first if reference is None else reference
            r["identical_to_first_layout"] = bool(np.array_equal(first, reference))
            r["max_abs_logit_diff"] = float(np.abs(first - reference).max())
            results.append(r)
            if not args.json:
                sent, received = r["root_bytes_sent"], r["root_bytes_received"]
                print(f"{n} node(s) x {t} thread(s), {exchange} exchange: {r['ms_per_token']:.1f} ms/token, "
                      f"sync {r['sync_ms_per_token']:.2f} ms/token, root sends {sent / 1e3:.1f} kB "
                      f"({sent / 1024:.1f} KiB), receives {received / 1e3:.1f} kB ({received / 1024:.1f} KiB) per token, "
                      f"first logits vs the first layout: max |diff| {r['max_abs_logit_diff']:.3g}", flush=True)
    if args.json:
        print(json.dumps({"model": str(args.model or "random dllama-shape Q4_0"), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
