"""Weight streaming under a memory budget (jit/ir_stream.py): a small random model whose packed weights
exceed the budget gives the unlimited run's logits bit for bit, while the pages of its packed file mapped
into the process (smaps) stay within one layer plus the resident part; in a child process confined to a
memory cgroup below the model's size, it still runs and its VmRSS stays under budget + the interpreter's
own memory."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama, write_random_q4_0
from dllp2p.jit.engine import JITEngine
from dllp2p.jit.ir_stream import StreamPlan, page_range, stream_plan, stream_table
from dllp2p.memlimit import MemoryCgroup, cgroup_unavailable

SPEC = SyntheticSpec(dim=512, n_layers=6, ffn_dim=1536, n_heads=8, n_kv_heads=2, vocab_size=512, qtype=QType.Q4_0)
PROMPT = [1, 5, 9, 200, 17, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_llama(tmp_path_factory.mktemp("stream") / "m.gguf", SPEC))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stream-cache")


def mapped_bytes(path: Path) -> int:
    """Rss of this process's mappings of `path` (smaps): the packed weights' pages it maps now."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) >= 6 and head[-1] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) << 10
    return total


def greedy(engine: JITEngine, n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = engine.forward(PROMPT, 0)
    out, all_logits = [], [logits]
    for i in range(n):
        out.append(int(logits.argmax()))
        logits = engine.forward([out[-1]], len(PROMPT) + i)
        all_logits.append(logits)
    return out, all_logits


def test_plan_is_pure_and_reads_ahead_what_fits():
    assert stream_plan([100] * 6, 10, 20, None) is None
    assert stream_plan([100] * 6, 10, 20, 630) is None  # fits exactly: no streaming
    assert stream_plan([100] * 6, 10, 20, 629) == StreamPlan(629, 4, 100, 10, 20)  # 599 // 100 - 1
    assert stream_plan([100] * 6, 10, 20, 100).ahead == 1  # below what streaming needs: 1 ahead (logged)
    assert page_range(4096 + 5, 8192 + 1, 4096) == (4096, 8192)
    t = stream_table([(4096, 4096), (8192, 4096), (12288, 8192)], 1)
    assert t.tolist() == [[4096, 4096, 12288, 8192], [8192, 4096, 4096, 4096], [12288, 8192, 8192, 4096]]


def test_streaming_gives_the_unlimited_tokens_and_maps_one_layer(model, cache_dir):
    free = JITEngine(model, 64, threads=2, cache_dir=cache_dir)
    try:
        assert free.stream is None
        want, want_logits = greedy(free, 40)
        total = free.packed.path.stat().st_size
        limit = sum(a.nbytes for a in free._bufs.values()) + total // 2  # about half the weights fit
    finally:
        free.close()
    del free
    gc.collect()  # its mapping of the same file goes: smaps below sees the streaming engine's only
    streamed = JITEngine(model, 64, threads=2, cache_dir=cache_dir, mem_limit=limit)
    plan = streamed.stream
    assert plan is not None and 1 <= plan.ahead < SPEC.n_layers - 1
    path = streamed.packed.path
    pages = (len(streamed.packed.norms) + 4) * 4096  # every resident blob rounded up to its pages
    assert mapped_bytes(path) <= plan.resident + pages  # every layer dropped before the first step
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # the pages of the file mapped while steps run (ctypes releases the GIL)
        while not done.is_set():
            samples.append(mapped_bytes(path))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got, got_logits = greedy(streamed, 40)
        after = mapped_bytes(path)
    finally:
        done.set()
        sampler.join()
        streamed.close()
    assert got == want
    for a, b in zip(want_logits, got_logits):
        assert np.array_equal(a, b)
    assert after <= plan.resident + pages  # after a step: the last layer dropped too
    # mapped at any moment: the resident part, the layer computing, and the one just finished (dropped by
    # thread 0 right after it); a fault maps its page cache folio whole (large folios: up to 2 MiB here),
    # so each may reach a folio beyond its ends; the whole file when nothing is dropped
    bound = plan.resident + pages + 2 * (plan.layer_bytes + (2 << 20))
    assert samples and max(samples) <= bound < total, (max(samples), bound, total)


CHILD = r"""  # a child process: the greedy ids and its VmRSS before the engine and at its peak (sampled)
import json, os, sys, threading, time
from dllp2p.formats import load_model
from dllp2p.jit.engine import JITEngine
model, cache, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
peak = [0]
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmRSS:"))
base = rss()
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
e = JITEngine(load_model(model), 64, threads=2, cache_dir=cache, mem_limit=limit)
logits = e.forward([1, 5, 9, 200, 17, 3], 0)
ids = []
for i in range(8):
    ids.append(int(logits.argmax())); logits = e.forward([ids[-1]], 6 + i)
stop.set(); t.join()
print(json.dumps({"ids": ids, "base": base, "peak": peak[0], "ahead": e.stream.ahead if e.stream else 0}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """16 layers of ~5 MB (packed ~81 MB): more than the child's cgroup may hold beside its interpreter."""
    spec = SyntheticSpec(dim=1024, n_layers=16, ffn_dim=2048, n_heads=8, n_kv_heads=2, vocab_size=512)
    return load_model(write_random_q4_0(tmp_path_factory.mktemp("stream-big") / "m.gguf", spec))  # blocks drawn: fast


CGROUP_LIMIT = 60 << 20  # charged: the child's anonymous memory and the file pages it reads in (the packed
# file's pages are evicted first; the interpreter's files, already cached, stay charged where they were)
OVERHEAD = 16 << 20  # beyond the budget, what building the engine adds to VmRSS: compiled code, llvmlite


def test_runs_in_a_memory_cgroup_below_its_size(big_model, cache_dir):
    why = cgroup_unavailable()
    if why:
        pytest.skip(f"no memory cgroup to confine a child in: {why}")
    free = JITEngine(big_model, 64, threads=1, cache_dir=cache_dir)  # packs the file once, outside the cgroup
    try:
        want, _ = greedy(free, 8)
        path = free.packed.path
        size = path.stat().st_size
        other = sum(a.nbytes for a in free._bufs.values())
    finally:
        free.close()
    assert size > CGROUP_LIMIT
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the child reads the file in itself
    finally:
        os.close(fd)
    budget = other + size // 3
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with MemoryCgroup(f"dllp2p-test-{os.getpid()}", CGROUP_LIMIT) as cg:
        out = subprocess.run([sys.executable, "-c", CHILD, str(big_model.path), str(cache_dir), str(budget)],
                             env=env, capture_output=True, text=True, timeout=120, preexec_fn=cg.enter)
        oom = cg.oom_kills()
    assert out.returncode == 0, (out.returncode, oom, out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ids"] == want
    assert r["ahead"] >= 1
    # what the engine adds to the interpreter's own resident memory stays within the budget + OVERHEAD
    assert r["peak"] - r["base"] <= budget + OVERHEAD, (r, budget)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """3 layers: the fewest that stream with a layer read ahead (two programs compile in the TP test)."""
    spec = SyntheticSpec(dim=256, n_layers=3, ffn_dim=768, n_heads=8, n_kv_heads=2, vocab_size=300, qtype=QType.Q4_0)
    return load_model(write_random_llama(tmp_path_factory.mktemp("stream-small") / "m.gguf", spec))


def test_a_tensor_parallel_node_streams_its_share(small_model, cache_dir):
    """Two tensor-parallel nodes over a socket pair, node 1 over its budget: the unlimited single node's
    logits, bit for bit; node 1 streams, node 0 (no budget) does not."""
    import socket as socketlib

    from dllp2p.scheduler import Peer, plan
    from dllp2p.tp import TPNode, node_tensors

    model = small_model
    single = JITEngine(model, 64, threads=1, cache_dir=cache_dir)
    p = plan(model.config, [Peer(f"n{i}", f"127.0.0.1:{7000 + i}", 1, 1.0) for i in range(2)], epoch=1, policy="pow2")
    a, b = socketlib.socketpair()
    tensors = [node_tensors(model, p, i) for i in range(2)]
    share = sum(t.data.nbytes for t in tensors[1].values())
    nodes = [TPNode(model.config, p, 0, tensors[0], [None, a], 64, 1, cache_dir=cache_dir),
             TPNode(model.config, p, 1, tensors[1], [b, None], 64, 1, cache_dir=cache_dir, mem_limit=share // 2)]
    try:
        assert nodes[0].stream is None and nodes[1].stream is not None
        logits, want = None, single.forward(PROMPT, 0)
        ids = []
        for i in range(10):
            tokens, pos = (PROMPT, 0) if i == 0 else ([ids[-1]], len(PROMPT) + i - 1)
            worker = threading.Thread(target=nodes[1].forward, args=(tokens, pos))
            worker.start()
            logits = nodes[0].forward(tokens, pos)
            worker.join(timeout=60)
            if i:
                want = single.forward(tokens, pos)
            assert np.array_equal(logits, want), i
            ids.append(int(logits.argmax()))
    finally:
        for n in (*nodes, single):
            n.close()
        a.close()
        b.close()


@pytest.mark.parametrize("text,want", [("1500M", 1500 << 20), ("1.5G", 3 << 29), ("1.5GiB", 3 << 29), ("800", 800 << 20),
                                       ("64k", 64 << 10), ("off", None), ("0", None), (" OFF ", None)])
def test_mem_limit_parses(text, want):
    from dllp2p.memlimit import parse_mem_limit

    assert parse_mem_limit(text) == want


def test_mem_limit_refuses_what_is_not_a_size():
    from dllp2p.config import ConfigError, check
    from dllp2p.memlimit import parse_mem_limit

    for bad in ("lots", "1.5X", "-3G", ""):
        with pytest.raises(ValueError):
            parse_mem_limit(bad)
    with pytest.raises(ConfigError, match="mem_limit|size"):
        check({"mem_limit": "1.5X"}, "test")
    assert check({"mem_limit": "auto"}, "test") == {"mem_limit": "auto"}


def test_default_budget_from_cgroup_v1_v2_and_meminfo(tmp_path):
    from dllp2p.memlimit import PROCESS_RESERVE, MemoryFacts, default_mem_limit, read_memory_facts

    proc, root = tmp_path / "proc" / "self", tmp_path / "cg"
    proc.mkdir(parents=True)
    (proc.parent / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 2097152 kB\n")
    (proc / "cgroup").write_text("4:memory:/a/b\n0::/x/y\n")
    v1 = root / "memory" / "a" / "b"
    v1.mkdir(parents=True)
    (v1 / "memory.stat").write_text("cache 0\nhierarchical_memory_limit 9223372036854771712\n")
    v2 = root / "unified" / "x" / "y"
    v2.mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("memory\n")
    (v2 / "memory.max").write_text("max\n")
    (v2.parent / "memory.max").write_text(f"{3 << 30}\n")  # a parent's limit binds its children
    facts = read_memory_facts(proc, root)
    assert facts == MemoryFacts(3 << 30, 2 << 30)
    (v1 / "memory.stat").write_text(f"hierarchical_memory_limit {1 << 30}\n")
    assert read_memory_facts(proc, root).cgroup_limit == 1 << 30  # the tightest of v1 and v2
    assert default_mem_limit(MemoryFacts(1 << 30, 2 << 30))[0] == (1 << 30) - PROCESS_RESERVE
    assert default_mem_limit(MemoryFacts(None, 2 << 30))[0] == (2 << 30) - PROCESS_RESERVE
    assert default_mem_limit(MemoryFacts(None, None))[0] is None


def test_cli_mem_limit_reaches_the_configs(tmp_path):
    from dllp2p import cli

    ns = cli.build_parser().parse_args(["run", "--prompt", "x", "--local", "--mem-limit", "1G"])
    assert cli.run_config(ns, {}).mem_limit == 1 << 30
    ns = cli.build_parser().parse_args(["run", "--prompt", "x", "--local", "--mem-limit", "off"])
    assert cli.run_config(ns, {}).mem_limit is None
    ns = cli.build_parser().parse_args(["daemon", "--mem-limit", "700M", "--port", "0"])
    conf = tmp_path / "config.toml"
    conf.write_text('[daemon]\nmem_limit = "1.5G"\n')
    assert cli.daemon_settings(ns, {"DLLP2P_CONFIG": str(conf)})["mem_limit"] == "700M"  # the flag wins
    ns = cli.build_parser().parse_args(["daemon", "--port", "0"])
    assert cli.daemon_settings(ns, {"DLLP2P_CONFIG": str(conf)})["mem_limit"] == "1.5G"
    assert cli.daemon_settings(ns, {"DLLP2P_CONFIG": str(conf), "DLLP2P_MEM_LIMIT": "off"})["mem_limit"] == "off"


def test_packing_into_the_file_one_tensor_at_a_time_writes_the_same_file(model, tmp_path):
    """pack_into (a tensor in memory at a time) and _write(pack(...)) (all at once) make the same bytes."""
    from dllp2p.jit.family import arranged
    from dllp2p.jit.weights import _write, execution_order, pack, pack_into

    c = model.config
    order = execution_order(c, not c.tied_output)
    tensor = arranged(model.tensor, c)
    _write(tmp_path / "whole.bin", pack(order, tensor, "output.weight"))
    pack_into(tmp_path / "streamed.bin", order, tensor, "output.weight")
    assert (tmp_path / "whole.bin").read_bytes() == (tmp_path / "streamed.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.bin", "whole.bin"]  # no body file left
