"""Caches are verified before use: every corruption of every cache file -> rebuilt (or asked for again),
the same output as a fresh run, no crash. A worker whose disk is full is planned without.

    the JIT's compiled objects  <cache>/code/*.o          loaded in a subprocess (a bad object could crash
    the packed weights          <cache>/weights/*.bin     llvmlite): exit 0, the logits bit-equal to a fresh run's
    a node's packed slices      <cache>/weights/tp-*.bin  the packed bytes equal to a fresh pack's
    a worker's slice cache      <state>/slices/<sha256>   dropped, so the worker's Need names it again
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dllp2p.diskcache import Damaged, evict, sealed, unseal
from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.scheduler import Peer, plan
from dllp2p.session.slices import SliceCache

ROOT_DIR = Path(__file__).parent.parent
TINY = SyntheticSpec(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, vocab_size=320, seed=11,
                     qtype=QType.Q4_0, embed_qtype=QType.Q8_0)
TOKENS = [1, 17, 42, 99, 7]

# one JIT engine run: its logits (sha256 of the f32 bytes), greedy token and whether it came from the caches
RUN = """
import hashlib, json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
from dllp2p.formats import load_model
from dllp2p.jit.engine import JITEngine
e = JITEngine(load_model(sys.argv[1]), 16, 1, cache_dir=sys.argv[2])
logits = e.forward([int(t) for t in sys.argv[3].split(",")], 0)
print(json.dumps({"sha": hashlib.sha256(logits.tobytes()).hexdigest(), "top": int(logits.argmax()),
                  "from_cache": bool(e.timings["from_cache"])}))
e.close()
"""

CORRUPTIONS = ("truncated", "empty", "header", "middle", "bitflip")


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(len(data))
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "header":
        data[:16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    elif how == "middle":
        mid = len(data) // 2
        data[mid : mid + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    elif how == "bitflip":
        data[len(data) * 2 // 3] ^= 0x10
    path.write_bytes(bytes(data))


def run_engine(model: Path, cache: Path) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", RUN, str(model), str(cache), ",".join(map(str, TOKENS))],
                       capture_output=True, text=True, timeout=300, cwd=ROOT_DIR,
                       env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
    assert p.returncode == 0, f"exit {p.returncode} (a negative one is a signal: a crash)\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", TINY)


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory) -> tuple[dict, Path]:
    """A fresh run (empty cache), which fills the cache; a second run from that cache gives the same."""
    cache = tmp_path_factory.mktemp("cache")
    fresh, _ = run_engine(tiny, cache)
    again, err = run_engine(tiny, cache)
    assert again["from_cache"] and again["sha"] == fresh["sha"] and "damaged" not in err
    return fresh, cache


@pytest.mark.parametrize("kind", ["code/*.o", "weights/*.bin"])
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_jit_cache_file_is_rebuilt_with_one_log_line(tiny, baseline, tmp_path, kind, how):
    fresh, filled = baseline
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    files = sorted(cache.glob(kind))
    assert files, f"no {kind} in the cache"
    for f in files:
        corrupt(f, how)
    got, err = run_engine(tiny, cache)
    assert got["sha"] == fresh["sha"] and got["top"] == fresh["top"]
    damaged = [line for line in err.splitlines() if "damaged" in line]
    assert len(damaged) == len(files), err
    if how == "middle":  # rebuilt and stored again: the next start uses it, silently (once: it costs a start)
        healed, err = run_engine(tiny, cache)
        assert healed["sha"] == fresh["sha"] and healed["from_cache"] and "damaged" not in err


def test_sealed_files_refuse_every_corruption(tmp_path):
    payload = bytes(range(256)) * 40
    path = tmp_path / "x"
    for how in CORRUPTIONS:
        path.write_bytes(b"".join(sealed(payload)))
        assert unseal(path.read_bytes()) == payload
        corrupt(path, how)
        with pytest.raises(Damaged):
            unseal(path.read_bytes())


def test_eviction_keeps_the_most_recently_used_within_the_budget(tmp_path):
    files = []
    for i in range(6):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 + i, 1000 + i))
        files.append(f)
    gone = evict(files, 300, keep=[files[0]])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["f0", "f4", "f5"] and len(gone) == 3


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    return load_model(write_random_llama(tmp_path_factory.mktemp("tp") / "kv4.gguf", TINY))


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_packed_slice_file_is_packed_afresh(tp_model, tmp_path, how, caplog):
    from dllp2p.tp import TPNode, node_tensors

    p = plan(tp_model.config, [Peer(f"n{i}", "", 1, 1.0) for i in range(2)], epoch=1)
    tensors = node_tensors(tp_model, p, 1)

    def build(cache_dir):
        a, b = socket.socketpair()
        node = TPNode(tp_model.config, p, 1, tensors, [a, None], 16, 1, cache_dir=cache_dir)
        packed = {n: bytes(np.asarray(m.data).view(np.uint8).reshape(-1)) for n, m in node.packed.matrices.items()}
        packed.update({n: bytes(np.asarray(v).view(np.uint8).reshape(-1)) for n, v in node.packed.norms.items()})
        path = node.packed.path
        node.close()
        a.close()
        b.close()
        return packed, path

    want, _ = build(None)  # packed in memory, no cache
    first, path = build(tmp_path)
    assert first == want and path is not None and path.name.startswith("tp-")
    corrupt(path, how)
    caplog.clear()
    got, again = build(tmp_path)
    assert got == want and again == path
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1
    assert build(tmp_path)[0] == want


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_slice_is_dropped_and_asked_for_again(tmp_path, how, caplog):
    cache = SliceCache(tmp_path / "slices")
    data = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    sha = hashlib.sha256(data).hexdigest()
    cache.store(sha, data)
    assert cache.load(sha, len(data)) == data
    corrupt(cache.path(sha), how)
    caplog.clear()
    assert cache.load(sha, len(data)) is None  # the worker's Need names what load() did not return
    assert not cache.path(sha).exists() and sum("damaged" in r.getMessage() for r in caplog.records) == 1
    cache.store(sha, data)  # pushed again
    assert cache.load(sha, len(data)) == data


def test_the_slice_cache_keeps_within_its_budget(tmp_path):
    cache = SliceCache(tmp_path / "slices", budget=3000)
    shas = []
    for i in range(5):
        data = bytes([i]) * 1000
        shas.append(hashlib.sha256(data).hexdigest())
        cache.store(shas[-1], data)
        os.utime(cache.path(shas[-1]), (1000 + i, 1000 + i))
    assert sorted(cache.keys()) == sorted(shas[2:])  # the least recently used went
    assert cache.load(shas[0], 1000) is None and cache.load(shas[4], 1000) == bytes([4]) * 1000


# --- a full disk --------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {p.stderr.strip()}")


def _fill(directory: Path) -> None:
    """Write a file into `directory` until its file system is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC
    finally:
        os.close(fd)


def test_a_worker_with_a_full_disk_is_planned_without(tmp_path, monkeypatch):
    """Daemon 1's state dir is a small tmpfs, filled up: the root's push to it fails with disk_full, the
    root plans the prompt without it (the answer equals one node's) and `status` says why it is left out."""
    from test_serve import KEY_FILE, SPEC_8KV, Daemons, dllp2p_run, status, wait_members

    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(tmp_path / "cache"))
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    state = tmp_path / "d1"
    _mount_tmpfs(state, "1m")
    d = Daemons(tmp_path, 2, model=model)
    prompt = ["--prompt", "hello there"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0)
        time.sleep(0.05)
        d.start(1)
        wait_members(root, 2)
        _fill(state)
        got = dllp2p_run(*prompt, "--daemon", root)
        assert got.returncode == 0 and got.stdout == want, got.stderr
        assert ", 1 node)" in got.stderr, got.stderr
        reply = status(root)
        worker = next(n.member.node_id for n in reply.nodes if n.member.address == d.address(1))
        assert [(x.node_id, x.code) for x in reply.left_out] == [(worker, "disk_full")]
        host, port = root.rsplit(":", 1)
        shown = subprocess.run([sys.executable, "-m", "dllp2p.cli", "status", "--host", host, "--port", port, "--json",
                                "--key-file", KEY_FILE], capture_output=True, text=True, timeout=60, cwd=ROOT_DIR)
        assert shown.returncode == 0, shown.stderr
        rows = {row["id"]: row for row in json.loads(shown.stdout)["nodes"]}
        assert rows[worker]["left_out"]["code"] == "disk_full" and "disk is full" in rows[worker]["left_out"]["reason"]
        again = dllp2p_run(*prompt, "--daemon", root)  # the next prompt: planned without it from the start
        assert again.stdout == want and ", 1 node)" in again.stderr
        assert sum("disk full" in line or "disk_full" in line or "its disk is full" in line
                   for line in d.logs[0]) >= 1, d.logs[0]
    finally:
        d.stop_all()
        subprocess.run(["umount", str(state)], capture_output=True)


def test_a_worker_asks_again_for_damaged_slices_and_repacks_damaged_packed_files(tmp_path, monkeypatch):
    """Two daemons; after a first prompt, every slice file of the worker and every packed tp-*.bin is
    damaged (a different way each): the next prompt (another ctx: a fresh session, not the kept one) has
    the slices pushed again and gives the single-node output."""
    from test_serve import SPEC_8KV, Daemons, dllp2p_run, wait_members

    monkeypatch.setenv("DLLP2P_CACHE_DIR", str(tmp_path / "cache"))
    model = write_random_llama(tmp_path / "kv8.gguf", SPEC_8KV)
    d = Daemons(tmp_path, 2, model=model)
    prompt = ["--prompt", "hello there"]
    try:
        want = dllp2p_run(*prompt, "--local", "--model", str(model)).stdout
        root = d.start(0)
        time.sleep(0.05)
        d.start(1)
        wait_members(root, 2)
        first = dllp2p_run(*prompt, "--daemon", root, "--stats")
        assert first.stdout == want and ", 2 nodes)" in first.stderr, first.stderr
        slices = sorted((tmp_path / "d1" / "slices").iterdir())
        packed = sorted((tmp_path / "cache" / "weights").glob("tp-*.bin"))
        assert slices and len(packed) == 2
        for i, f in enumerate(slices + packed):
            corrupt(f, CORRUPTIONS[i % len(CORRUPTIONS)])
        again = dllp2p_run(*prompt, "--daemon", root, "--stats", "--ctx", "1024")
        assert again.stdout == want and ", 2 nodes)" in again.stderr, again.stderr
        assert "weights pushed 0.0 MB" not in again.stderr and "session kept" not in again.stderr, again.stderr
        assert sum("damaged" in line for line in d.logs[1]) >= len(slices), d.logs[1]
    finally:
        d.stop_all()


def test_a_full_disk_is_answered_disk_full_and_the_worker_stays_usable(tmp_path):
    """Without a tmpfs (no root needed): an in-process worker daemon whose slice cache's writes fail with
    ENOSPC answers the push with disk_full, which the root's set-up raises as a ClusterError naming the
    worker and the code; with room again, the same worker serves the next session."""
    import errno

    import fake_tp
    from test_cluster import DaemonThread, connect, generate, wait_idle

    from dllp2p.error_codes import ErrorCode, code_of
    from dllp2p.session.root import ClusterError

    a = DaemonThread(tmp_path / "w")
    try:
        cache = a.daemon.worker.cache
        real_store = cache.store

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        cache.store = full
        with pytest.raises(ClusterError) as caught:
            connect([a.address])
        assert code_of(caught.value) == ErrorCode.DISK_FULL and caught.value.address == a.address
        assert caught.value.node_id == a.daemon.node_id and "disk is full" in str(caught.value)
        wait_idle(a, 1)
        cache.store = real_store
        model = fake_tp.model()
        e = connect([a.address], model)
        generate(e, model, steps=2)
        e.close()
    finally:
        a.stop()


def test_whole_model_packed_files_keep_within_their_budget(tiny, tmp_path):
    """load_packed evicts the least recently used other <key>.bin files beyond its budget, never the one it
    maps and never a tensor-parallel node's tp-*.bin (their own budget)."""
    from dllp2p.jit.weights import load_packed

    weights = tmp_path / "weights"
    weights.mkdir()
    for i in range(3):
        old = weights / f"{i:032x}.bin"
        old.write_bytes(b"x" * 1000)
        os.utime(old, (1000 + i, 1000 + i))
    (weights / "tp-other.bin").write_bytes(b"y" * 5000)
    packed = load_packed(load_model(tiny), weights, budget=0)
    assert sorted(f.name for f in weights.iterdir()) == sorted([packed.path.name, "tp-other.bin"])
    again = load_packed(load_model(tiny), weights, budget=packed.path.stat().st_size + 1000)
    assert again.path == packed.path
