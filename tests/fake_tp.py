"""A stand-in for dllp2p.tp in the network tests: the same API, a toy computation, real exchanges.

Every node's forward sends (index, start_pos, sum of tokens, n_tokens, weight checksum) to every other
node over its mesh socket and reads theirs, so a step only succeeds over a complete, working mesh on
which every node got the same Step. The root's logits are one-hot at
    (sum(tokens) + start_pos + sum of every node's weight checksum) % vocab,
so a test can tell that every node held exactly its slices (expected_token).

Run as a script, it is a worker daemon using this module: python tests/fake_tp.py --port 0 --state-dir D
"""

from __future__ import annotations

import hashlib
import socket
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dllp2p import clusterkey
from dllp2p.clusterkey import ClusterKey
from dllp2p.formats import ModelConfig, QType
from dllp2p.formats.quant import TRAITS
from dllp2p.scheduler import BLOCK_ROWS, Plan
from dllp2p.tp import ExchangeAuthFailed, NodeTensor, PeerLost  # the real types: the fake stands in for the compute only

# 4 KV heads; dim, FFN and vocabulary of 4+ blocks of 32: plans of 1 to 4 nodes
CONFIG = ModelConfig("llama", 128, 2, 4, 4, 32, 256, 256, 64, 10000.0, 32, 1e-5, True)
PART = struct.Struct("<5q")
TEST_CLUSTER = "dllp2p-tests"  # the cluster name of test daemons: never the default one of an installed daemon
# the cluster key of the tests' daemons (a fixed one: tests are hermetic by their cluster names and ports)
TEST_KEY = ClusterKey(hashlib.sha256(b"dllp2p tests' cluster key").digest())


def write_key(directory: Path, key: ClusterKey = TEST_KEY) -> Path:
    """A key file (mode 0600) in directory, for `dllp2p daemon --key-file` and the commands."""
    path = Path(directory) / "cluster.key"
    if not path.exists():
        clusterkey.save(key, path)
    return path


def model(big: bool = False) -> SimpleNamespace:
    """What node_tensors needs of a model. big: one slice over a WeightChunk (4 MiB), to test chunking."""
    return SimpleNamespace(config=CONFIG, big=big)


def _tensor(name: str, qtype: QType, shape: tuple[int, ...], seed: tuple[int, ...]) -> NodeTensor:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_bytes = TRAITS[qtype].row_bytes(shape[-1])
    raw = np.random.default_rng(seed).integers(0, 256, rows * row_bytes, dtype=np.uint8)
    if qtype == QType.F32:
        data = raw.view(np.float32).reshape(shape)
    else:
        data = raw.reshape(*shape[:-1], row_bytes)
    return NodeTensor(name, qtype, shape, data, hashlib.sha256(raw).hexdigest())


def split_block(model: SimpleNamespace) -> int:
    """As tp.split_block: the fake's slices are whole rows of plain bytes, so no block beyond the scheduler's own."""
    return BLOCK_ROWS


def node_tensors(model: SimpleNamespace, plan: Plan, index: int) -> dict[str, NodeTensor]:
    c, node = model.config, plan.nodes[index]
    f0, f1 = node.ffn_rows
    v0, v1 = node.vocab_rows
    out = [
        _tensor("output_norm.weight", QType.F32, (c.dim,), (1,)),  # the same on every node
        _tensor("blk.0.ffn_up.weight", QType.Q8_0, (f1 - f0, c.dim), (2, f0, f1)),
        _tensor("output.weight", QType.Q4_0, (v1 - v0, c.dim), (3, v0, v1)),
    ]
    if model.big:
        out.append(_tensor("big.weight", QType.Q8_0, (4200, 1024), (4, f0, f1)))  # ~4.6 MB: two chunks
    return {t.name: t for t in out}


def checksum(tensors: dict[str, NodeTensor]) -> int:
    return sum(int(t.sha256[:8], 16) for t in tensors.values()) % 1_000_003


def expected_token(mdl: SimpleNamespace, plan: Plan, tokens, start_pos: int) -> int:
    total = sum(checksum(node_tensors(mdl, plan, i)) for i in range(plan.n_nodes))
    return (sum(tokens) + start_pos + total) % mdl.config.vocab_size


class TPNode:
    def __init__(self, config, plan, index, tensors, peers, ctx, threads=None, exchange_keys=None):
        for t in tensors.values():
            digest = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)).hexdigest()
            if digest != t.sha256:
                raise ValueError(f"{t.name}: data does not hash to its sha256")
        if len(peers) != plan.n_nodes or peers[index] is not None:
            raise ValueError("one socket per other node, None at this node's index")
        self.config, self.plan, self.index, self.ctx = config, plan, index, ctx
        self.peers = list(peers)
        # with a cluster key, each message carries sha256(send key), checked against sha256(receive key): the
        # daemons must hand both ends of every mesh link the mirror pair, as the sealed exchange needs
        self.keys = None if exchange_keys is None else list(exchange_keys)
        self.checksum = checksum(dict(tensors))
        self.stats: dict[str, float] = {}
        self.closed = False

    def forward(self, tokens, start_pos, top=0):
        t0 = time.perf_counter()
        mine = (self.index, start_pos, sum(tokens), len(tokens), self.checksum)
        payload = PART.pack(*mine)
        for j, sock in enumerate(self.peers):
            if sock is not None:
                if self.keys is not None:
                    payload = PART.pack(*mine) + hashlib.sha256(self.keys[j][0]).digest()
                try:
                    sock.sendall(payload)
                except OSError as e:
                    raise PeerLost(j, f"send failed: {e}") from None
        parts = [mine]
        t1 = time.perf_counter()
        for j, sock in enumerate(self.peers):
            if sock is not None:
                parts.append(PART.unpack(_recv_exactly(sock, PART.size, j)))
                if self.keys is not None and _recv_exactly(sock, 32, j) != hashlib.sha256(self.keys[j][1]).digest():
                    raise ExchangeAuthFailed(j, "activation exchange authentication failed (fake: keys differ)")
        sync = time.perf_counter() - t1
        for p in parts:
            if p[1:4] != mine[1:4]:
                raise RuntimeError(f"node {p[0]} ran another step: {p} vs {mine}")
        n_other = self.plan.n_nodes - 1
        total = time.perf_counter() - t0
        self.stats = {"step_ms": total * 1e3, "sync_ms": sync * 1e3, "compute_ms": (total - sync) * 1e3,
                      "bytes_sent": PART.size * n_other, "bytes_received": PART.size * n_other, "tokens": len(tokens)}
        if self.index != 0:
            return None
        logits = np.zeros(self.config.vocab_size, np.float32)
        logits[(sum(tokens) + start_pos + sum(p[4] for p in parts)) % self.config.vocab_size] = 1.0
        return logits

    def close(self):
        self.closed = True


def _recv_exactly(sock: socket.socket, n: int, j: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            data = sock.recv(n - len(buf))
        except OSError as e:
            raise PeerLost(j, f"receive failed: {e}") from None
        if not data:
            raise PeerLost(j, "connection closed")
        buf += data
    return buf


# the compute module's names for any plan (dllp2p/pipeline_node.py): the fake treats a pipeline plan's nodes
# as it treats a tensor-parallel plan's (every node exchanges with every other)
plan_tensors = node_tensors
plan_node = TPNode


if __name__ == "__main__":
    import argparse
    import logging
    from pathlib import Path

    import trio

    from dllp2p.daemon import Daemon, DaemonConfig, Timeouts

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--state-dir", required=True)
    ns = ap.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="dllp2p daemon: %(message)s")
    t = Timeouts(hello=5, idle=20, transfer=10, mesh=5, build=10, socket=5, slot=2)
    cfg = DaemonConfig(ns.host, ns.port, 1, Path(ns.state_dir), timeouts=t, cluster=TEST_CLUSTER, key=TEST_KEY)
    try:
        trio.run(Daemon(cfg, tp=sys.modules[__name__]).serve)
    except KeyboardInterrupt:
        pass
