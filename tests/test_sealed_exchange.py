"""The sealed activation exchange (tp_program: every message ChaCha20-Poly1305 under per-peer, per-direction
keys, called from the compiled code): the same logits as the plain exchange and as one node, bit for bit;
a byte flipped in flight or a wrong key fails the step with ExchangeAuthFailed, never wrong logits; the
byte counts include one 16-byte tag per message (checked against the bytes a proxy forwards).
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
from dllp2p.jit.tp_seal import TAG
from dllp2p.scheduler import Peer, plan
from dllp2p.tp import ExchangeAuthFailed, PeerLost, TPNode, node_tensors
from dllp2p.wire.secure import mesh_keys

from test_tp import Cluster, greedy_identical, mesh


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sealed-cache")


@pytest.fixture(scope="module")
def kv8_model(tmp_path_factory):
    spec = SyntheticSpec(dim=512, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=1024, vocab_size=1024,
                         qtype=QType.Q4_0, embed_qtype=QType.Q8_0)
    return load_model(write_random_llama(tmp_path_factory.mktemp("m") / "random-kv8.gguf", spec))


def keys_for(n: int, seed: int = 0) -> list[list[tuple[bytes, bytes] | None]]:
    """Per node, per peer (send, receive) keys from one random exporter secret per pair (as a mesh
    connection's Channel.exporter would give both ends)."""
    rng = np.random.default_rng(seed)
    secret = {(i, j): rng.bytes(32) for i in range(n) for j in range(i + 1, n)}
    return [[None if i == j else mesh_keys(secret[min(i, j), max(i, j)], i, j) for j in range(n)] for i in range(n)]


def sealed_plan(model, n_nodes: int, exchange: str = "exact"):
    peers = [Peer(f"node{i}", f"127.0.0.1:{7000 + i}", 1, 1.0) for i in range(n_nodes)]
    policy = "pow2" if n_nodes & (n_nodes - 1) == 0 else "weighted"
    return plan(model.config, peers, epoch=1, policy=policy, exchange=exchange, block=32)


class SealedCluster(Cluster):
    def __init__(self, model, n_nodes: int, cache_dir, exchange: str = "exact", keys=None, socks=None):
        self.plan = sealed_plan(model, n_nodes, exchange)
        self.socks = socks or mesh(n_nodes)
        keys = keys or keys_for(n_nodes)
        spins = 0 if n_nodes > (os.cpu_count() or 1) else 200
        self.nodes = [TPNode(model.config, self.plan, i, node_tensors(model, self.plan, i), self.socks[i], 128, 1,
                             cache_dir=cache_dir, recv_spins=spins, exchange_keys=keys[i]) for i in range(n_nodes)]


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_sealed_exact_exchange_bit_identical_to_one_node(kv8_model, cache_dir, n_nodes):
    single = JITEngine(kv8_model, 128, threads=1, cache_dir=cache_dir, max_chunk=64)
    cluster = SealedCluster(kv8_model, n_nodes, cache_dir)
    try:
        assert all(node.sealed for node in cluster.nodes)
        prompt = list(np.random.default_rng(3).integers(0, kv8_model.config.vocab_size, 21))
        greedy_identical(cluster, single, prompt, 24)
    finally:
        cluster.close()
        single.close()


def test_sealed_q8_exchange_bit_identical_to_plain(kv8_model, cache_dir):
    plain = Cluster(kv8_model, 2, "pow2", cache_dir, exchange="q8")
    sealed = SealedCluster(kv8_model, 2, cache_dir, exchange="q8")
    try:
        prompt = list(np.random.default_rng(5).integers(0, kv8_model.config.vocab_size, 9))
        got, want = sealed.forward(prompt, 0), plain.forward(prompt, 0)
        assert np.array_equal(got, want)
        for i in range(16):
            token = int(np.argmax(want))
            got, want = sealed.forward([token], len(prompt) + i), plain.forward([token], len(prompt) + i)
            assert np.array_equal(got, want), f"step {i}"
    finally:
        sealed.close()
        plain.close()


class Proxy:
    """Forwards bytes between two socket pairs (node 0 <-> proxy <-> node 1), counting them per direction;
    flips one bit of the byte at offset `flip_at` of the node 1 -> node 0 stream, when set."""

    def __init__(self):
        a0, self.p0 = socket.socketpair()
        self.p1, a1 = socket.socketpair()
        for s in (a0, a1):
            s.settimeout(20.0)
        self.ends = (a0, a1)
        self.counts = [0, 0]  # bytes forwarded 0 -> 1, 1 -> 0
        self.flip_at: int | None = None
        self.threads = [threading.Thread(target=self._pump, args=(self.p0, self.p1, 0), daemon=True),
                        threading.Thread(target=self._pump, args=(self.p1, self.p0, 1), daemon=True)]
        for t in self.threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: int) -> None:
        try:
            while data := src.recv(1 << 16):
                data = bytearray(data)
                at = self.counts[direction]
                if direction == 1 and self.flip_at is not None and at <= self.flip_at < at + len(data):
                    data[self.flip_at - at] ^= 0x10
                    self.flip_at = None
                self.counts[direction] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in (self.p0, self.p1, *self.ends):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=10)
        for s in (self.p0, self.p1, *self.ends):
            s.close()


def proxied(model, cache_dir, keys=None):
    proxy = Proxy()
    socks = [[None, proxy.ends[0]], [proxy.ends[1], None]]
    return proxy, SealedCluster(model, 2, cache_dir, keys=keys, socks=socks)


def test_sealed_bytes_per_token_include_the_tags(kv8_model, cache_dir):
    proxy, cluster = proxied(kv8_model, cache_dir)
    plain = Cluster(kv8_model, 2, "pow2", cache_dir)
    try:
        for tokens, pos in (([5, 17, 300], 0), ([9], 3)):
            before = list(proxy.counts)
            cluster.forward(tokens, pos)
            plain.forward(tokens, pos)
            # the proxy has forwarded every byte once node 0 has its logits (node 1's last send came first)
            stats, payload = cluster.nodes[0].stats, plain.nodes[0].stats
            assert stats["bytes_sent"] == proxy.counts[0] - before[0]
            assert stats["bytes_received"] == proxy.counts[1] - before[1]
            # one tag per message: per chunk the embedding swap, 4 all-gathers per layer, node 1's logits
            messages = 1 + 4 * kv8_model.config.n_layers
            assert stats["bytes_sent"] == payload["bytes_sent"] + TAG * messages
            assert stats["bytes_received"] == payload["bytes_received"] + TAG * (messages + 1)
    finally:
        cluster.close()
        plain.close()
        proxy.close()


def _fails(cluster, proxy, tokens, pos, settle: float = 0.0) -> tuple[BaseException | None, BaseException | None,
                                                                       object]:
    """Run a step that must fail: node 1 in a thread, node 0 here; once node 0 is done (and node 1, or
    `settle` seconds), the links are shut so that node 1, if waiting for what node 0 no longer sends, ends
    too. -> (node 0's error, node 1's, logits)."""
    errors: list[BaseException] = []

    def run1():
        try:
            cluster.nodes[1].forward(tokens, pos)
        except Exception as e:  # noqa: BLE001 - examined by the test
            errors.append(e)

    t = threading.Thread(target=run1)
    t.start()
    out, err0 = None, None
    try:
        out = cluster.nodes[0].forward(tokens, pos)
    except Exception as e:  # noqa: BLE001 - examined by the test
        err0 = e
    t.join(timeout=settle)
    proxy.close()
    t.join(timeout=60)
    assert not t.is_alive()
    return err0, (errors[0] if errors else None), out


def test_a_flipped_byte_in_flight_fails_the_step_with_the_authentication_error(kv8_model, cache_dir):
    proxy, cluster = proxied(kv8_model, cache_dir)
    try:
        cluster.forward([5, 17, 300], 0)  # a clean step first: the counters advance in step at both ends
        proxy.flip_at = proxy.counts[1] + 1000  # inside node 1's next embedding message to node 0
        err0, err1, out = _fails(cluster, proxy, [9], 3)
        assert out is None
        assert isinstance(err0, ExchangeAuthFailed) and err0.node == 1
        assert "activation exchange authentication failed" in str(err0)
        assert isinstance(err1, PeerLost)  # node 1 loses node 0 (the link is dropped), no logits anywhere
    finally:
        cluster.close()


def test_a_peer_with_another_key_fails_the_first_step(kv8_model, cache_dir):
    keys, other = keys_for(2, seed=1), keys_for(2, seed=2)
    keys[1] = other[1]
    proxy, cluster = proxied(kv8_model, cache_dir, keys=keys)
    try:
        # both ends fail their first receive and skip the rest: node 1 ends on its own (given time to)
        err0, err1, out = _fails(cluster, proxy, [5, 17, 300], 0, settle=20.0)
        assert out is None
        assert isinstance(err0, ExchangeAuthFailed) and err0.node == 1
        assert isinstance(err1, ExchangeAuthFailed) and err1.node == 0
    finally:
        cluster.close()


def test_mesh_keys_mirror_each_other():
    secret = os.urandom(32)
    assert mesh_keys(secret, 0, 1) == mesh_keys(secret, 1, 0)[::-1]
    send, receive = mesh_keys(secret, 0, 1)
    assert send != receive and len(send) == len(receive) == 32
    assert mesh_keys(os.urandom(32), 0, 1) != (send, receive)


class TCPProxy:
    """A TCP proxy on loopback (threads) to upstream. Counts the bytes of connection k in each direction
    (bytes[k, "down"]: upstream -> client, bytes[k, "up"]); flip[k, direction] = offset: one bit of that
    byte flipped (set while running)."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.bytes: dict[tuple[int, str], int] = {}
        self.flip: dict[tuple[int, str], int] = {}
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                client, _ = self.server.accept()
                up = socket.create_connection(self.upstream)
                k = len(self.bytes) // 2
                self.bytes[k, "up"] = self.bytes[k, "down"] = 0
                self.socks += [client, up]
                threading.Thread(target=self._pump, args=(client, up, (k, "up")), daemon=True).start()
                threading.Thread(target=self._pump, args=(up, client, (k, "down")), daemon=True).start()
        except OSError:
            pass

    def _pump(self, src: socket.socket, dst: socket.socket, k: tuple[int, str]) -> None:
        try:
            while data := src.recv(1 << 16):
                data, at = bytearray(data), self.bytes[k]
                if (f := self.flip.get(k)) is not None and at <= f < at + len(data):
                    data[f - at] ^= 0x04
                self.bytes[k] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("direction", ["down", "up"])
def test_through_a_keyed_daemon_a_flipped_exchange_byte_fails_the_request(kv8_model, cache_dir, tmp_path, caplog,
                                                                          direction):
    """Root (ClusterEngine, this thread) and a worker daemon with the real engine (its own thread), both with
    the key, the worker reached through a proxy: logits equal one node's while the exchange is intact; then
    one bit of the next exchange message worker -> root ("down": the root finds it) or root -> worker ("up":
    the worker finds it, logs it and tells the root) is flipped: the request fails, and no logits come back."""
    import logging

    import trio

    from dllp2p.config import Timeouts
    from dllp2p.daemon import Daemon, DaemonConfig
    from dllp2p.session.root import ClusterEngine, ClusterError, ClusterOptions

    import fake_tp

    caplog.set_level(logging.INFO)
    t = Timeouts(hello=10, idle=30, transfer=30, mesh=10, build=120, socket=10, slot=1)
    daemon = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "w", timeouts=t, cluster=fake_tp.TEST_CLUSTER,
                                 key=fake_tp.TEST_KEY, cache_dir=cache_dir))
    started: list = []

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            started.append((await nursery.start(daemon.serve), trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    for _ in range(200):
        if started:
            break
        threading.Event().wait(0.05)
    address, token, scope = started[0]
    proxy = TCPProxy(address)
    single = JITEngine(kv8_model, 64, threads=1, cache_dir=cache_dir)
    engine = None
    try:
        engine = ClusterEngine.connect(kv8_model, ClusterOptions((proxy.address,), timeouts=t, cache_dir=cache_dir,
                                                                 key=fake_tp.TEST_KEY), 64, 1)
        prompt = [5, 17, 300, 41]
        assert np.array_equal(engine.forward(prompt, 0), single.forward(prompt, 0))
        assert len(proxy.bytes) == 4  # the control link, then the mesh link
        proxy.flip[1, direction] = proxy.bytes[1, direction] + 100  # inside the next message: the embedding rows
        with pytest.raises(ClusterError) as failed:
            engine.forward([9], 4)
        # down: the root's own engine found it; up: the worker's Error (the root's error quotes it)
        assert "activation exchange authentication failed" in str(failed.value), failed.value
        if direction == "up":  # the worker drops the step and the link; it names the failure in its log
            logged = [r for r in caplog.records if r.levelno >= logging.ERROR
                      and "activation exchange authentication failed" in r.getMessage()]
            assert logged, caplog.text
    finally:
        if engine is not None:
            engine.close()
        single.close()
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=30)
        proxy.close()
