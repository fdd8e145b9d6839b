"""Tensor-parallel nodes against the single-node JIT engine: with the exact exchange the logits must be
bit-identical; with the q8 exchange (Megatron partial sums in Q8_0) within a stated tolerance, and the
greedy choice the same wherever the single node's choice is not a near tie.

Nodes run in one process here (each forward in its own thread; ctypes releases the GIL), connected by
socket pairs: exactly the blocking stream sockets the daemon hands a node, without the daemon.
The daemon/root plumbing is tested over real TCP in test_daemon.py and test_cluster.py.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit.engine import JITEngine
from dllp2p.scheduler import Peer, plan
from dllp2p.jit.tp_program import RECV_SPINS
from dllp2p.tp import PeerLost, TPNode, node_tensors


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-cache")


@pytest.fixture(scope="module")
def kv8_model(tmp_path_factory):
    spec = SyntheticSpec(dim=512, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=1024, vocab_size=1024,
                         qtype=QType.Q4_0, embed_qtype=QType.Q8_0)
    return load_model(write_random_llama(tmp_path_factory.mktemp("m") / "random-kv8.gguf", spec))


def mesh(n: int, timeout: float = 20.0) -> list[list[socket.socket | None]]:
    socks: list[list[socket.socket | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = socket.socketpair()
            for s in (a, b):
                s.settimeout(timeout)  # TPNode turns this into fd-level SO_RCVTIMEO / SO_SNDTIMEO
            socks[i][j], socks[j][i] = a, b
    return socks


class Cluster:
    def __init__(self, model, n_nodes: int, policy: str, cache_dir, threads: int = 1, ctx: int = 128,
                 exchange: str = "exact", block: int = 32):
        peers = [Peer(f"node{i}", f"127.0.0.1:{7000 + i}", threads, 1.0) for i in range(n_nodes)]
        self.plan = plan(model.config, peers, epoch=1, policy=policy, exchange=exchange, block=block)
        assert self.plan.n_nodes == n_nodes
        self.socks = mesh(n_nodes)
        # all nodes share this machine's cores: polling receives would starve the node being waited for
        spins = 0 if n_nodes * threads > (os.cpu_count() or 1) else RECV_SPINS
        self.nodes = [TPNode(model.config, self.plan, i, node_tensors(model, self.plan, i), self.socks[i], ctx,
                             threads, cache_dir=cache_dir, recv_spins=spins) for i in range(n_nodes)]

    def forward(self, tokens, pos, top=0):
        out, errors = [None] * len(self.nodes), []

        def run(i):
            try:
                out[i] = self.nodes[i].forward(tokens, pos, top)
            except Exception as e:  # noqa: BLE001 - collected and re-raised by the test
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(self.nodes))]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        assert all(o is None for o in out[1:])
        return out[0]

    def close(self):
        for node in self.nodes:
            node.close()
        for row in self.socks:
            for s in row:
                if s is not None:
                    s.close()


def greedy_identical(cluster: Cluster, single: JITEngine, prompt: list[int], steps: int) -> list[int]:
    got, want = cluster.forward(prompt, 0), single.forward(prompt, 0)
    assert np.array_equal(got, want)
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(want)))
        got = cluster.forward([tokens[-1]], len(prompt) + i)
        want = single.forward([tokens[-1]], len(prompt) + i)
        assert np.array_equal(got, want), f"step {i}"
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes,policy", [(1, "pow2"), (2, "pow2"), (3, "weighted")])
def test_smollm2_bit_identical_to_one_node(real_model, cache_dir, n_nodes, policy):
    single = JITEngine(real_model, 128, threads=1, cache_dir=cache_dir)
    cluster = Cluster(real_model, n_nodes, policy, cache_dir)
    try:
        prompt = [1, 504, 3575, 282, 4649, 314]  # "<s>The capital of France is"-like ids
        tokens = greedy_identical(cluster, single, prompt, 64)
        assert tokens[0] == 7042  # " Paris"
    finally:
        cluster.close()
        single.close()


@pytest.mark.parametrize("n_nodes", [1, 2, 4, 8])
def test_eight_kv_heads_bit_identical(kv8_model, cache_dir, n_nodes):
    single = JITEngine(kv8_model, 128, threads=1, cache_dir=cache_dir, max_chunk=16)
    cluster = Cluster(kv8_model, n_nodes, "pow2", cache_dir)
    try:
        prompt = list(np.random.default_rng(3).integers(0, kv8_model.config.vocab_size, 21))
        greedy_identical(cluster, single, prompt, 64)
    finally:
        cluster.close()
        single.close()


def test_two_threads_per_node(kv8_model, cache_dir):
    single = JITEngine(kv8_model, 64, threads=1, cache_dir=cache_dir)
    cluster = Cluster(kv8_model, 2, "pow2", cache_dir, threads=2, ctx=64)
    try:
        greedy_identical(cluster, single, [5, 6, 7], 8)
    finally:
        cluster.close()
        single.close()


def test_lost_peer_raises_and_names_it(kv8_model, cache_dir):
    cluster = Cluster(kv8_model, 2, "pow2", cache_dir)
    try:
        cluster.forward([1, 2], 0)
        cluster.socks[1][0].close()  # node 1 vanishes
        with pytest.raises(PeerLost, match="node 1"):
            cluster.nodes[0].forward([3], 2)
    finally:
        cluster.socks[1][0] = None
        cluster.close()


def test_a_signal_during_a_blocking_receive_is_not_a_lost_peer(kv8_model, cache_dir):
    """A signal handled while a node's thread blocks in recv interrupts the call (EINTR; a socket with a
    timeout is never restarted): the exchange must try again, not report the peer lost."""
    import signal
    import time

    cluster = Cluster(kv8_model, 2, "pow2", cache_dir)
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        cluster.forward([1, 2, 3], 0)
        errors = []
        worker = threading.Thread(target=lambda: _forward_into(errors, cluster.nodes[1], [4], 3))
        worker.start()
        time.sleep(0.2)  # node 1 is blocked receiving node 0's first exchange
        for _ in range(5):
            signal.pthread_kill(worker.ident, signal.SIGUSR1)
            time.sleep(0.02)
        got = cluster.nodes[0].forward([4], 3)
        worker.join(timeout=60)
        assert errors == [] and got is not None
    finally:
        signal.signal(signal.SIGUSR1, old)
        cluster.close()


def _forward_into(errors: list, node, tokens, pos) -> None:
    try:
        node.forward(tokens, pos)
    except Exception as e:  # noqa: BLE001 - collected for the test
        errors.append(e)


def test_bytes_per_token_match_traffic(kv8_model, cache_dir):
    cluster = Cluster(kv8_model, 2, "pow2", cache_dir)
    try:
        cluster.forward([1], 0)
        stats = cluster.nodes[0].stats
        c = kv8_model.config
        # per layer: half the quantized attention output, half of o, half the quantized FFN, half of d
        act = lambda k: k + 8 * (k // 32)  # noqa: E731
        sent = c.n_layers * (act(c.q_dim // 2) + c.dim * 2 + act(c.ffn_dim // 2) + c.dim * 2)
        sent += c.dim * 4  # the embedding row of the token (zeros from the node that does not own it)
        assert stats["bytes_sent"] == sent
        assert stats["bytes_received"] == sent + c.vocab_size // 2 * 4  # + node 1's logits
        assert 0 <= stats["sync_ms"] <= stats["step_ms"]
    finally:
        cluster.close()


@pytest.mark.parametrize("n_nodes,exchange", [(2, "exact"), (4, "q8")])
def test_top_logits_are_what_sampling_reads(kv8_model, cache_dir, n_nodes, exchange):
    """With top=K the workers send their K best logits: node 0's rows stay whole, every other row is
    -inf but each node's K best (by numpy's stable order, value for value), so the greedy token and the
    top-k candidates and probabilities (k <= K) are those of all the logits. Each step runs twice at the
    same position (the KV cache rows are rewritten with the same values): once with all logits."""
    from dllp2p.sampler import SamplerConfig, candidate_probs

    cluster = Cluster(kv8_model, n_nodes, "pow2", cache_dir, exchange=exchange)
    part, K = cluster.nodes[0].part, 8
    try:
        prompt = list(np.random.default_rng(5).integers(0, kv8_model.config.vocab_size, 9))
        token, pos = prompt, 0
        for _ in range(6):
            full = cluster.forward(token, pos)
            best = cluster.forward(token, pos, top=K)
            v0, v1 = part.vocab_rows[0]
            np.testing.assert_array_equal(best[v0:v1], full[v0:v1])
            for a, b in part.vocab_rows[1:]:
                keep = np.sort(a + np.argsort(-full[a:b], kind="stable")[:K])
                np.testing.assert_array_equal(np.flatnonzero(np.isfinite(best[a:b])) + a, keep)
                np.testing.assert_array_equal(best[keep], full[keep])
            assert int(np.argmax(best)) == int(np.argmax(full))
            for cfg in (SamplerConfig(top_k=K), SamplerConfig(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0)):
                (ids_b, p_b), (ids_f, p_f) = candidate_probs(best, cfg), candidate_probs(full, cfg)
                np.testing.assert_array_equal(ids_b, ids_f)
                np.testing.assert_array_equal(p_b, p_f)
            pos += len(token)
            token = [int(np.argmax(full))]
        sent, received = cluster.nodes[0].stats["bytes_sent"], cluster.nodes[0].stats["bytes_received"]
        cluster.forward([1], pos)
        assert cluster.nodes[0].stats["bytes_received"] - cluster.nodes[0].stats["bytes_sent"] == (
            sum(b - a for a, b in part.vocab_rows[1:]) * 4)  # all logits: 4 bytes a row
        assert received - sent == (n_nodes - 1) * K * 8  # K records of (f32, i32) per worker
    finally:
        cluster.close()


@pytest.mark.parametrize("cfg,top", [(dict(temperature=0.0), 1), (dict(temperature=0.9, top_k=40, seed=11), 40),
                                     (dict(temperature=0.9, top_k=0, seed=11), 0),
                                     (dict(temperature=0.0, repeat_penalty=1.3), 0)])
def test_generate_asks_for_what_the_sampler_reads(kv8_model, cache_dir, cfg, top):
    """generate() on a cluster asks for 1 logit per worker when greedy, k with top-k, all of them without
    top-k or with a repeat penalty; the tokens are the single node's, draw for draw."""
    from dllp2p.generate import generate
    from dllp2p.sampler import Sampler, SamplerConfig

    single = JITEngine(kv8_model, 64, threads=1, cache_dir=cache_dir)
    cluster = Cluster(kv8_model, 2, "pow2", cache_dir, ctx=64)
    asked = []

    class Engine:  # the test cluster behind the Engine protocol, as cluster.ClusterEngine
        ctx, max_top = 64, TPNode.max_top

        def forward(self, tokens, pos, top=0):
            asked.append(top)
            return cluster.forward(tokens, pos, top)

    try:
        sc = SamplerConfig(**cfg)
        prompt = [3, 1, 4, 1, 5]
        got = list(generate(Engine(), prompt, Sampler(sc), 24))
        assert got == list(generate(single, prompt, Sampler(sc), 24))
        assert set(asked) == {top}
    finally:
        cluster.close()
        single.close()


def test_prompt_chunks_before_the_last_send_no_logits(kv8_model, cache_dir):
    """A prompt longer than a chunk: the logits of every chunk but the last are never read, so no worker
    sends any for those (no row of theirs is wanted); the last chunk's logits are exact."""
    single = JITEngine(kv8_model, 160, threads=1, cache_dir=cache_dir, max_chunk=64)
    cluster = Cluster(kv8_model, 2, "pow2", cache_dir, ctx=160)
    try:
        prompt = list(np.random.default_rng(6).integers(0, kv8_model.config.vocab_size, 150))  # 3 chunks
        np.testing.assert_array_equal(cluster.forward(prompt, 0), single.forward(prompt, 0))
        s = cluster.nodes[0].stats
        assert s["bytes_received"] - s["bytes_sent"] == kv8_model.config.vocab_size // 2 * 4
    finally:
        cluster.close()
        single.close()


# --- the q8 exchange: Megatron partial sums in Q8_0 --------------------------------------------------------
#
# Not bit-identical, and it cannot be: the nodes' partial sums are rounded to 8 bits, and even exact f32
# partial sums change the summation order, which flips the rounding of some 8-bit activations downstream
# (measured on SmolLM2: f32 partial sums gave max |dlogit| 1.5 over 64 steps, Q8_0 ones 2.3-3.3, mean
# 0.3; the JIT engine itself is ~0.9 from the float32 reference). Tolerance stated here, over 64
# teacher-forced steps (both fed the single node's greedy token): max |dlogit| <= 4, mean |dlogit| <= 0.5,
# and the same greedy choice on at least 85% of the steps (measured 89-98%; the others are near ties).

Q8_MAX, Q8_MEAN, Q8_AGREE = 4.0, 0.5, 0.85


def q8_within_tolerance(cluster: Cluster, single: JITEngine, prompt: list[int], steps: int) -> tuple[float, float]:
    """-> (max |dlogit|, share of steps with the same argmax); asserts the stated tolerance."""
    got, want = cluster.forward(prompt, 0), single.forward(prompt, 0)
    worst, means, agree = 0.0, [], 0
    for i in range(steps):
        diff = np.abs(got - want)
        worst, agree = max(worst, float(diff.max())), agree + (int(np.argmax(got)) == int(np.argmax(want)))
        means.append(float(diff.mean()))
        token = int(np.argmax(want))
        got, want = cluster.forward([token], len(prompt) + i), single.forward([token], len(prompt) + i)
    print(f"q8 exchange: max |dlogit| {worst:.3f}, mean {np.mean(means):.3f}, same argmax {agree}/{steps}")
    assert worst <= Q8_MAX and np.mean(means) <= Q8_MEAN and agree >= Q8_AGREE * steps
    return worst, agree / steps


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes,policy", [(2, "pow2"), (3, "weighted")])
def test_smollm2_q8_exchange_within_tolerance(real_model, cache_dir, n_nodes, policy):
    single = JITEngine(real_model, 128, threads=1, cache_dir=cache_dir)
    cluster = Cluster(real_model, n_nodes, policy, cache_dir, exchange="q8")
    try:
        worst, _ = q8_within_tolerance(cluster, single, [1, 504, 3575, 282, 4649, 314], 64)
        assert worst > 0  # 8-bit partial sums: bit-identity here would mean the exchange was skipped
    finally:
        cluster.close()
        single.close()


@pytest.mark.parametrize("n_nodes", [1, 2, 4, 8])  # from 3 nodes: reduce-scatter + all-gather
def test_eight_kv_heads_q8_exchange(kv8_model, cache_dir, n_nodes):
    single = JITEngine(kv8_model, 128, threads=1, cache_dir=cache_dir, max_chunk=16)
    cluster = Cluster(kv8_model, n_nodes, "pow2", cache_dir, exchange="q8", threads=2 if n_nodes == 2 else 1)
    try:
        prompt = list(np.random.default_rng(4).integers(0, kv8_model.config.vocab_size, 21))
        if n_nodes == 1:  # alone, a node adds its whole output exactly: the single-node engine's numerics
            greedy_identical(cluster, single, prompt, 16)
        else:
            worst, _ = q8_within_tolerance(cluster, single, prompt, 32)
            assert 0 < worst
    finally:
        cluster.close()
        single.close()


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_q8_bytes_per_token(kv8_model, cache_dir, n_nodes):
    cluster = Cluster(kv8_model, n_nodes, "pow2", cache_dir, exchange="q8")
    try:
        cluster.forward([1, 2, 3], 0)
        stats = cluster.nodes[0].stats
        c = kv8_model.config
        row = c.dim // 32 * 34  # one Q8_0 row of the model dimension
        # per all-reduce and token: 2 nodes send their whole partial; from 3 nodes, each node sends every
        # owner its 1/N of the partial and every peer its 1/N of the sum: 2 (N - 1) / N of a row
        per = row if n_nodes == 2 else 2 * (n_nodes - 1) * row // n_nodes
        sent = 3 * c.n_layers * 2 * per + 3 * c.dim * 4 * (n_nodes - 1)  # + the embedding rows to every peer
        logits = c.vocab_size // n_nodes * 4 * (n_nodes - 1)
        assert (stats["bytes_sent"], stats["bytes_received"]) == (sent, sent + logits)
    finally:
        cluster.close()


def test_node_weights_are_packed_once_then_mapped_from_the_cache(kv8_model, tmp_path):
    """A node keys its packed weights by its slices' hashes: the next session with the same slices maps
    the file instead of packing again; other slices get another file."""
    p = plan(kv8_model.config, [Peer(f"n{i}", "", 1, 1.0) for i in range(2)], epoch=1)
    tensors = node_tensors(kv8_model, p, 1)
    files = []
    for _ in range(2):
        a, b = socket.socketpair()
        node = TPNode(kv8_model.config, p, 1, tensors, [a, None], 32, 1, cache_dir=tmp_path)
        files.append(node.packed.path)
        node.close()
        a.close()
        b.close()
    assert files[0] is not None and files[0] == files[1] and files[0].parent == tmp_path / "weights"
    for i in range(10):  # older sets of slices, 1000 bytes each: only the most recently used stay
        stale = tmp_path / "weights" / f"tp-stale{i}.bin"
        stale.write_bytes(b"x" * 1000)
        os.utime(stale, (1_000_000 + i, 1_000_000 + i))
    other = node_tensors(kv8_model, p, 0)
    a, b = socket.socketpair()
    probe = TPNode(kv8_model.config, p, 0, other, [None, a], 32, 1, cache_dir=tmp_path / "probe")
    budget = files[0].stat().st_size + probe.packed.path.stat().st_size + 3000  # room for 3 stale files
    probe.close()
    node = TPNode(kv8_model.config, p, 0, other, [None, a], 32, 1, cache_dir=tmp_path, cache_budget=budget)
    assert node.packed.path not in (None, files[0])
    node.close()
    a.close()
    b.close()
    kept = sorted(f.name for f in (tmp_path / "weights").glob("tp-*.bin"))
    assert node.packed.path.name in kept and files[0].name in kept  # files[0]: used more recently than the stale
    assert [k for k in kept if "stale" in k] == ["tp-stale7.bin", "tp-stale8.bin", "tp-stale9.bin"]
