"""Memory per node (issue 20): a root cuts, hashes and pushes its workers' slices from the model's memory map
piece by piece, never holding the whole model; an idle worker gives its engine's memory back.

    cuts      tp.node_tensors' CutTensors (formats/cuts.py) against the slow obvious twin: family.arranged,
              Tensor.rows / Tensor.columns, hashlib over the whole copy; for a NEOX family with biases and
              q/k norms and the q8 exchange's column cuts, 1 to 3 nodes
    pages     hashing and pushing a random ~200 MB model's slices in a child process: its peak resident set
              stays far below the model's bytes (memory.resident)
    worker    a worker daemon's resident set after its session ends falls back by about the slice bytes it
              held, measured against its in-session RSS
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fake_tp
from pages import resident_bytes
from ports import free_port
from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama, write_random_model
from dllp2p.jit.family import arranged
from dllp2p.memory import release, resident
from dllp2p.scheduler import Peer, plan
from dllp2p.tp import node_tensors, partition_of, slice_ranges

ROOT_DIR = Path(__file__).parent.parent
QWEN = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=384, arch="qwen3",
                     seed=3)


def _plan(config, n: int, exchange: str):  # noqa: ANN001, ANN202
    peers = [Peer(f"node{i}", f"127.0.0.1:{7000 + i}", 1, 1.0 + i) for i in range(n)]
    return plan(config, peers, epoch=1, policy="weighted", exchange=exchange, block=32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_model(write_random_llama(tmp_path_factory.mktemp("m") / "qwen.gguf", QWEN))


@pytest.mark.parametrize("n,exchange", [(1, "exact"), (2, "q8"), (3, "exact")])
def test_cut_slices_are_the_copies_the_twin_makes(qwen, n, exchange):
    c = qwen.config
    assert c.rope_neox and c.qk_norm  # Q/K rows and their norms reordered
    the_plan = _plan(c, n, exchange)
    tensor = arranged(qwen.tensor, c)
    for index in range(n):
        cuts = slice_ranges(c, partition_of(the_plan, index))
        got = node_tensors(qwen, the_plan, index)
        assert got, index
        for name, x in got.items():
            matrix = name.split(".")[2] if name.startswith("blk.") else "output"
            t = tensor(name)
            how = cuts.get(matrix) if t.data.ndim == 2 or name.endswith(".bias") else None
            if name.endswith("_norm.weight") or name.endswith("norm.weight"):
                how = None
            if how is not None:
                t = t.rows(*how[1]) if how[0] == "rows" else t.columns(*how[1])
            want = np.ascontiguousarray(t.data)
            assert x.shape == tuple(t.shape) and x.qtype == t.qtype, name
            assert x.data.dtype == want.dtype and np.array_equal(x.data, want), name
            assert x.sha256 == hashlib.sha256(want.view(np.uint8).reshape(-1)).hexdigest(), name
            pieces = list(x.pieces(1000))
            assert b"".join(p.tobytes() for p in pieces) == want.tobytes() and x.nbytes == want.nbytes, name


def test_release_drops_mapped_pages_and_leaves_copies_alone(qwen):
    t = qwen.tensor("token_embd.weight")
    copy = np.array(t.data)
    assert release(t.data) and not release(copy)
    assert np.array_equal(copy, t.data)  # read again from the file
    assert resident()[0] > 0


# ~215 MB: 4 layers of dim 2048 (FFN 8192) and a 32000-row embedding and output, Q4_0 random bytes
BIG = SyntheticSpec(dim=2048, n_layers=4, n_heads=16, n_kv_heads=8, ffn_dim=8192, vocab_size=32000,
                    embed_qtype=QType.Q4_0, seed=7)

# the root, in a process of its own (its VmHWM is its own): a ClusterEngine over the worker daemon, the real
# compute module but for plan_node, which first notes the resident peak so far (the slices hashed and pushed,
# the root's own not yet packed); one step; then it waits for a line on stdin and closes the session
ROOT_CHILD = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace
from dllp2p import clusterkey, pipeline_node as real
from dllp2p.formats import load_model
from dllp2p.memory import resident
from dllp2p.session.root import ClusterEngine, ClusterOptions

path, worker, cache, key = sys.argv[1:5]
model = load_model(path)
before = resident()[0]
at_build = []

def plan_node(*args, **kw):
    at_build.append(resident()[1])
    return real.plan_node(*args, **kw)

tp = SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
tp.plan_node = plan_node
options = ClusterOptions((worker,), cache_dir=cache, key=clusterkey.load(Path(key)))
engine = ClusterEngine.connect(model, options, 64, 1, tp=tp)
engine.forward([1, 2, 3], 0)
print(json.dumps({"before": before, "push_peak": at_build[0], "pushed": engine.stats.pushed_bytes}), flush=True)
sys.stdin.readline()
engine.close()
print("closed", flush=True)
"""


def test_a_root_streams_its_pushes_and_an_idle_worker_gives_its_engine_back(tmp_path):
    """The root: its resident peak up to its own engine's build (every slice hashed, the worker's pushed) stays
    far below the model's bytes (before: all of them, the whole map hashed). The worker: once the session
    ends (the root closes it), its resident set falls from what it was in the session by at least half the
    slice bytes it held (its engine's packed copy, KV, buffers; malloc_trim; measured here: ~85 % of them)."""
    path = write_random_model(tmp_path / "big.gguf", BIG, raw=True)
    model_bytes = path.stat().st_size
    key = fake_tp.write_key(tmp_path)
    env = {**os.environ, "DLLP2P_CACHE_DIR": str(tmp_path / "cache")}
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "dllp2p.cli", "daemon", "--host", "127.0.0.1", "--port", str(port),
                               "--threads", "1",
                               "--state-dir", str(tmp_path / "w"), "--no-discovery", "--cluster", "test-memory",
                               "--api", "off", "--key-file", str(key)],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR, env=env)
    root = None
    try:
        line = worker.stderr.readline()
        assert "listening on" in line, line
        threading.Thread(target=worker.stderr.read, daemon=True).start()
        root = subprocess.Popen([sys.executable, "-c", ROOT_CHILD, str(path), f"127.0.0.1:{port}",
                                 str(tmp_path / "cache"), str(key)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT_DIR, env=env)
        said = root.stdout.readline()
        assert said, f"the root failed (rc {root.wait(30)})"
        info = json.loads(said)
        in_session = resident(worker.pid)[0]
        root.stdin.write("\n")
        root.stdin.flush()
        assert root.stdout.readline().strip() == "closed"
        share = info["pushed"]  # the worker's slices (its cache was empty)
        deadline, after = time.monotonic() + 10, in_session
        while time.monotonic() < deadline and after > in_session - share // 2:
            time.sleep(0.1)
            after = resident(worker.pid)[0]
    finally:
        for p in (root, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert share > model_bytes // 3, share  # the worker's half of the weights went over the wire
    grew = info["push_peak"] - info["before"]
    assert grew < model_bytes // 4, f"the root grew {grew >> 20} MiB pushing a {model_bytes >> 20} MiB model"
    assert in_session - after >= share // 2, (
        f"the idle worker holds {after >> 20} MiB, {in_session >> 20} MiB in the session; its slices {share >> 20} MiB")


def test_kv_slots_take_memory_as_rows_are_written(qwen, tmp_path):
    """An engine of 8 slots x 2048 positions (4 MiB a layer's K or V) after a 5-token prompt in slot 0 holds
    about a page per KV head of each: np.zeros of that size asked for transparent huge pages, and a
    write then brought in 2 MiB at once (25 MiB of KV for one 100-token SmolLM2 prompt, 2048 positions)."""
    from dllp2p.engine import BatchRow
    from dllp2p.jit.engine import JITEngine

    c = qwen.config
    engine = JITEngine(qwen, 4096, threads=1, cache_dir=tmp_path, max_seqs=8)
    try:
        engine.forward_batch([BatchRow(0, (1, 2, 3, 4, 5), 0)])
        page = os.sysconf("SC_PAGE_SIZE")
        for layer in range(c.n_layers):
            for name in ("k_cache", "v_cache"):
                cache = engine._bufs[f"{layer}.{name}"]
                assert cache.nbytes >= 4 << 20  # numpy asks huge pages for 4 MiB or more
                held = resident_bytes(cache)  # (before anything reads the rest: a read maps pages too)
                assert held <= c.n_kv_heads * 2 * page, (layer, name, held)
                assert np.all(np.any(cache[0, :, :5] != 0, axis=-1))  # the rows were written there
    finally:
        engine.close()


def test_lazy_zeros_are_zeroed_aligned_and_refuse_clearly():
    """layout.lazy_zeros: zeros of the shape and dtype asked, writable, page-aligned, no page in memory until
    written; a size the system cannot map is a MemoryError that says what was asked (as np.zeros would be)."""
    from dllp2p.jit.layout import lazy_zeros

    a = lazy_zeros((4, 3, 1024), np.float16)
    assert a.shape == (4, 3, 1024) and a.dtype == np.float16 and a.flags.writeable
    assert a.ctypes.data % os.sysconf("SC_PAGE_SIZE") == 0
    assert resident_bytes(a) == 0
    a[2, 1, 5] = 3.0
    assert resident_bytes(a) == os.sysconf("SC_PAGE_SIZE") and float(a.sum()) == 3.0
    assert lazy_zeros((0, 8), np.float32).shape == (0, 8)
    with pytest.raises(MemoryError, match="cannot map 288230376151711744 bytes"):
        lazy_zeros((1 << 40, 1 << 18), np.uint8)
