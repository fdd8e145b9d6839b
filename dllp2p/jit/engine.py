"""The JIT engine: packed weights + the compiled forward (program.py) + persistent native threads.

    engine = JITEngine(model, ctx=2048, threads=2)
    logits = engine.forward(prompt_ids, 0)        # prefill, in chunks of ProgramSpec.max_chunk
    logits = engine.forward([next_id], len(prompt_ids))

    engine = JITEngine(model, ctx=2048, max_seqs=8)  # 8 slots of KV cache (pages touched as used)
    out = engine.forward_batch([BatchRow(0, (5,), 17), BatchRow(3, tuple(prompt), 0)])  # f32[2, vocab]

Per step Python writes the rows' tokens, positions and slots into the table and makes one ctypes call
(`step`, GIL released); worker threads sit inside the native `worker` loop the whole time. A batch's rows
are packed into steps of up to max_chunk tokens (a long prompt chunk spans several); forward(tokens, pos)
is one row of slot 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine import BatchRow, ContextFull, check_rows, kv_bytes_per_position
from ..formats import GGUFModel, QType
from ..memlimit import MADV_DONTNEED, MADV_WILLNEED, advise
from .compiler import (
    DEFAULT_CACHE_DIR, CompiledModule, ObjectCache, compile_module, default_target, llvm_version, load_object,
    sources_digest,
)
from .cpus import ThreadChoice, choose_threads, read_cpu_facts
from .family import LAYER_EXTRAS, layer_extras, rope_table
from .layout import act_bytes, aligned_zeros, drop_pages, lazy_zeros
from .library import build_module
from .ir_share import counter_words
from .ir_stream import STREAM_WORDS, StreamPlan, madvise_number, page_range, stream_plan, stream_table
from .program import LAYER_MATRICES, ProgramSpec, Slots, build_program, private_sizes
from .program_attention import max_spans
from .weights import load_packed, thread_layout

log = logging.getLogger("dllp2p.jit")


def default_thread_choice(measure_load: bool = True) -> ThreadChoice:
    """The thread count for this process and why (cpus.py: affinity mask, cgroup quota, the load measured
    over cpus.BUSY_SAMPLE_S now unless measure_load is False)."""
    return choose_threads(read_cpu_facts(measure_load))


def default_threads() -> int:
    return default_thread_choice().threads


def _kernel_type(qtype: QType) -> QType:
    """The type a tensor is packed as: BF16 is widened to F32 (exactly); the rest stay as they are."""
    return QType.F32 if qtype == QType.BF16 else qtype


def program_spec(model: GGUFModel, max_chunk: int = 64, dynamic: bool = True) -> ProgramSpec:
    c = model.config
    layer_types = tuple(
        tuple(_kernel_type(model.tensor(f"blk.{i}.{name}.weight").qtype) for name in LAYER_MATRICES)
        for i in range(c.n_layers)
    )
    return ProgramSpec(c, layer_types, _kernel_type(model.tensor("token_embd.weight").qtype),
                       _kernel_type(model.output_tensor().qtype), max_chunk, dynamic=dynamic)


# BatchEngine.inline_rows of a local engine: a decode step of up to 8 rows takes ~2-8 ms of compute here
# (SmolLM2, 2 threads). Run on the serving loop it saves the two thread hand-offs of trio.to_thread per step
# (~0.5 ms per token measured through the daemon on the 2-vCPU VM: the other vCPU is asleep or spinning, and
# waking a thread across vCPUs is slow in a VM).
INLINE_ROWS = 8
DROP_PAGES = 4  # a slot's KV pages past what it holds go back to the OS from this many a head's run (_holds)


class JITEngine:
    """Engine protocol (see dllp2p/engine.py) over JIT-compiled code and `threads` native threads."""

    talks_to_peers = False  # whether a step exchanges with other nodes (a tensor-parallel node's does: tp.TPNode)

    def __init__(self, model: GGUFModel, ctx: int, threads: int | None = None, *,
                 cache_dir: os.PathLike | str | None = DEFAULT_CACHE_DIR, max_chunk: int = 64, max_seqs: int = 1,
                 dynamic: bool = True, mem_limit: int | None = None):
        """mem_limit: this engine's memory budget in bytes (weights, KV cache, buffers); packed weights beyond
        it are streamed from their cache file layer by layer (ir_stream.py). None: no budget."""
        t0 = time.perf_counter()
        self.mem_limit = mem_limit
        spec = program_spec(model, max_chunk, dynamic)
        packed = load_packed(model, None if cache_dir is None else Path(cache_dir).expanduser() / "weights")
        self.max_seqs = max_seqs
        self._start(model.config, ctx, threads, spec, packed, cache_dir, t0)

    # --- what a subclass (the tensor-parallel node) changes --------------------------------------------

    slots_class = Slots
    n_kv_local: int  # KV heads in this engine's cache

    def _program_key(self) -> str:
        return ""

    def _build_program(self, module) -> None:
        build_program(module, self.spec)

    def _extra_buffers(self) -> dict[str, np.ndarray]:
        return {}

    # --- start-up --------------------------------------------------------------------------------------

    def _start(self, config, ctx: int, threads: int | None, spec: ProgramSpec, packed, cache_dir, t0: float) -> None:
        self.config = c = config
        self.ctx = min(ctx, c.context_length)
        self.threads = threads or default_threads()
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if not hasattr(self, "n_kv_local"):
            self.n_kv_local = c.n_kv_heads
        self.max_seqs = getattr(self, "max_seqs", 1)
        if self.max_seqs < 1:
            raise ValueError("max_seqs must be at least 1")
        self.kv_bytes_per_position = kv_bytes_per_position(c, self.n_kv_local)
        self._lengths = [0] * self.max_seqs  # positions each slot holds
        self._high = [0] * self.max_seqs  # positions of each slot whose KV pages rows have written
        self.spec, self.packed = spec, packed
        self.weight_bytes_per_token = packed.bytes_per_token
        t1 = time.perf_counter()
        code_dir = None if cache_dir is None else Path(cache_dir).expanduser() / "code"
        self._compiled = _compile(spec, code_dir, self._program_key(), self._build_program)
        t2 = time.perf_counter()
        self._bufs = self._allocate()
        self._bufs.update(self._extra_buffers())
        self._table = self._fill_table()
        self._table_addr = self._table.ctypes.data
        slots = self.slots_class(c.n_layers)
        self._slots = slots
        self._n_slot, self._n_out_slot, self._quit_slot = slots["n"], slots["n_out"], slots["quit"]
        self.stream = self._setup_stream(getattr(self, "mem_limit", None))
        # decode steps of up to this many rows may run on the caller's event loop (BatchEngine.inline_rows): pure
        # compute of a few ms on this engine's threads. Not when layers stream from disk, nor on a tensor-parallel
        # node (TPNode: its step exchanges with peers and may wait on them)
        self.inline_rows = INLINE_ROWS if self.stream is None and not self.talks_to_peers else 0
        proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        self._step = proto(self._compiled.address("step"))
        self._kick = proto(self._compiled.address("kick"))
        worker = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(self._compiled.address("worker"))
        # what the native threads read through the table: theirs to hold while they run, whatever becomes of
        # the engine object (collected, torn down at exit, its attributes replaced) before they have quit
        held = (self._compiled, self._table, dict(self._bufs), self.packed, self._layout,
                getattr(self, "_stream_buf", None))
        self._workers = [threading.Thread(target=_run_worker, args=(worker, self._table_addr, tid, held), daemon=True,
                                          name=f"dllp2p-jit-{tid}") for tid in range(1, self.threads)]
        for t in self._workers:
            t.start()
        self._closed = False
        self.timings = {"pack_s": t1 - t0, "compile_s": t2 - t1, "from_cache": self._compiled.stats.from_cache,
                        "total_s": time.perf_counter() - t0}

    # --- buffers ---------------------------------------------------------------------------------------

    def _allocate(self) -> dict[str, np.ndarray]:
        c, s, T = self.config, self.spec, self.threads
        mc = s.max_chunk
        priv = private_sizes(s)
        bufs = {
            "barrier": aligned_zeros(16, np.int64),  # ir_barrier.py's state (BARRIER_WORDS of it used)
            "chunks": aligned_zeros(counter_words(c.n_layers, T), np.int64),  # ir_share.py's counters
            "tokens": aligned_zeros(mc, np.int64),
            "row_pos": aligned_zeros(mc, np.int64),
            "row_kv": aligned_zeros(mc, np.int64),
            "out_rows": aligned_zeros(mc, np.int64),
            "rope": rope_table(self.ctx, c, local=False),
            "rope_local": rope_table(self.ctx if c.rope_base_local is not None else 1, c, local=True),
            "logits": aligned_zeros((min(mc, self.max_seqs), c.vocab_size), np.float32),
            "x_t": aligned_zeros(T * priv["x_t"], np.uint8),
            "h_t": aligned_zeros(T * priv["h_t"], np.uint8),
            "xq_t": aligned_zeros(T * priv["xq_t"], np.uint8),
            "scratch_t": aligned_zeros(T * priv["scratch_t"] * self.ctx, np.uint8),
            "attp_t": aligned_zeros(T * priv["attp_t"] * max_spans(self.ctx), np.uint8),
            "s_t": aligned_zeros(T * priv["s_t"], np.uint8),
            "att_po": aligned_zeros((max_spans(self.ctx), c.q_dim), np.float32),
            "att_st": aligned_zeros((max_spans(self.ctx), c.n_heads, 2), np.float32),
        }
        for name, width in (("q", c.q_dim), ("k", c.kv_dim), ("v", c.kv_dim), ("att", c.q_dim), ("o", c.dim),
                            ("g", c.ffn_dim), ("u", c.ffn_dim), ("s", c.ffn_dim), ("d", c.dim)):
            bufs[name] = aligned_zeros((mc, width), np.float32)
        bufs["sq"] = aligned_zeros(mc * act_bytes(c.ffn_dim), np.uint8)  # act(g) * u quantized (several rows)
        bufs["aq"] = aligned_zeros(mc * act_bytes(c.q_dim), np.uint8)  # attention's output quantized (several rows)
        for layer in s.run_layers:
            # pages come from the OS on first write, 4 KiB at a time: an unused context or slot costs no memory
            shape = (self.max_seqs, self.n_kv_local, self.ctx, c.head_dim)  # head-major: program.kv_head
            bufs[f"{layer}.k_cache"] = lazy_zeros(shape, np.float16)
            bufs[f"{layer}.v_cache"] = lazy_zeros(shape, np.float16)
        return bufs

    def _fill_table(self) -> np.ndarray:
        c, slots = self.config, self.slots_class(self.config.n_layers)
        table = aligned_zeros(len(slots) + 8, np.int64)
        table[slots["n_threads"]] = self.threads
        table[slots["ctx"]] = self.ctx
        addr = lambda a: a.ctypes.data if isinstance(a, np.ndarray) else a.data.ctypes.data  # noqa: E731
        for name, buf in self._bufs.items():
            table[slots[name]] = addr(buf)
        m, norms = self.packed.matrices, self.packed.norms
        out_name = "token_embd.weight" if c.tied_output else "output.weight"
        layers = self.spec.run_layers  # all, or a pipeline stage's, which holds only what it computes
        order = [f"blk.{i}.{n}.weight" for i in layers for n in LAYER_MATRICES]
        order += [out_name] if self.spec.emits_logits else []
        self._layout = thread_layout(self.packed, order, self.threads)
        bases = self._layout.bases
        if self.spec.embeds:
            table[slots["embed"]] = addr(m["token_embd.weight"])  # looked up by token: the whole matrix
        if self.spec.emits_logits:
            table[slots["output"]] = addr(bases[out_name])
            table[slots["output_norm"]] = addr(norms["output_norm.weight"])
        for layer in layers:
            p = f"blk.{layer}."
            for name in LAYER_MATRICES:
                table[slots[f"{layer}.{name}"]] = addr(bases[p + name + ".weight"])
            for name in ("attn_norm", "ffn_norm"):
                table[slots[f"{layer}.{name}"]] = addr(norms[p + name + ".weight"])
            for name in layer_extras(c):  # biases, q/k norms, post norms: f32 vectors (this node's rows)
                table[slots[f"{layer}.{name}"]] = addr(norms[p + LAYER_EXTRAS[name]])
        return table

    def _setup_stream(self, budget: int | None) -> StreamPlan | None:
        """The stream plan when the packed weights exceed `budget` (and are mapped from their cache file):
        every layer's pages dropped, the first d read ahead, the table's stream slot set; else None."""
        layers = self.spec.run_layers
        names = {layer: [f"blk.{layer}.{n}.weight" for n in LAYER_MATRICES] for layer in layers}
        m = self.packed.matrices
        spans = {layer: (min(m[n].data.ctypes.data for n in ns), max(m[n].data.ctypes.data + m[n].nbytes for n in ns))
                 for layer, ns in names.items()}
        mapped = sum(a.nbytes for a in self.packed.norms.values()) + sum(x.nbytes for x in m.values())
        layer_bytes = [sum(m[n].nbytes for n in ns) for ns in names.values()]
        other = sum(a.nbytes for a in self._bufs.values())
        plan = stream_plan(layer_bytes, mapped - sum(layer_bytes), other, budget)
        if plan is None:
            return None
        if self.packed.path is None or madvise_number(default_target().triple) is None:
            log.warning("weights of %d MB exceed the memory budget of %d MB but cannot stream here (%s): held in memory",
                        mapped >> 20, budget >> 20, "not in a cache file" if self.packed.path is None else "not Linux")
            return None
        if plan.expected_peak > budget:
            log.warning("memory budget %d MB is below what streaming needs (%d MB: resident %d, 2 layers of %d, "
                        "buffers %d); streaming 1 layer ahead", budget >> 20, plan.expected_peak >> 20,
                        plan.resident >> 20, plan.layer_bytes >> 20, plan.other >> 20)
        run = [page_range(*spans[layer]) for layer in layers]  # a pipeline stage's layers wrap to its first
        self._stream_buf = np.zeros((self.config.n_layers, STREAM_WORDS), np.int64)  # read by the compiled step
        self._stream_buf[layers.start:layers.stop] = stream_table(run, plan.ahead)
        advise(run, MADV_DONTNEED)
        advise(run[:plan.ahead], MADV_WILLNEED)
        self._table[self._slots["stream"]] = self._stream_buf.ctypes.data
        log.info("streaming %d MB of layers from %s within %d MB: %d layers read ahead", sum(layer_bytes) >> 20,
                 self.packed.path, budget >> 20, plan.ahead)
        return plan

    # --- the Engine protocol ---------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """The Engine protocol: one sequence, in slot 0."""
        if self._closed:
            raise RuntimeError("engine is closed")
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if start_pos < 0 or start_pos + n > self.ctx:
            raise ContextFull(f"positions {start_pos}..{start_pos + n - 1} do not fit a context of {self.ctx}")
        ids = [int(t) for t in tokens]
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"token id outside the vocabulary of {self.config.vocab_size}")
        return self._run([BatchRow(0, tuple(ids), start_pos)])[0]

    def forward_batch(self, rows: Sequence[BatchRow]) -> np.ndarray:
        """The BatchEngine protocol (dllp2p/engine.py): f32[len(rows), vocab], each row's last token's logits,
        bit-identical to the same sequence run alone."""
        if self._closed:
            raise RuntimeError("engine is closed")
        check_rows(rows, self._lengths, self.ctx, self.config.vocab_size)
        return self._run(rows)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """dst's KV positions 0..n-1 := src's, every layer (prefix sharing)."""
        for s in (src, dst):
            if not 0 <= s < self.max_seqs:
                raise ValueError(f"sequence slot {s} outside 0..{self.max_seqs - 1}")
        if not 0 <= n <= self._lengths[src]:
            raise ValueError(f"slot {src} holds {self._lengths[src]} positions, not {n}")
        if src != dst:
            for cache in self._kv:  # every layer this engine runs (a pipeline stage's only), K and V
                cache[dst, :, :n] = cache[src, :, :n]
        self._lengths[dst] = n
        self._holds(dst, n)

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """Positions each slot holds (what forward_batch's rows may continue from)."""
        return tuple(self._lengths)

    def _run(self, rows: Sequence[BatchRow]) -> np.ndarray:
        """Rows (checked) packed in order into steps of up to max_chunk tokens; a row's logits are read
        after the step holding its last token."""
        table, mc, b, ctx = self._table, self.spec.max_chunk, self._bufs, self.ctx
        out = None
        steps = _pack(rows, mc)
        for k, pieces in enumerate(steps):
            toks: list[int] = []
            pos: list[int] = []
            kv: list[int] = []
            ends: list[int] = []
            wanted: list[int] = []
            for r, seq, lo, hi in pieces:
                row = rows[r]
                toks.extend(row.tokens[lo:hi])
                pos.extend(range(row.start_pos + lo, row.start_pos + hi))
                kv.extend([seq * ctx] * (hi - lo))
                if hi == len(row.tokens):
                    ends.append(len(toks) - 1)
                    wanted.append(r)
            n = len(toks)
            b["tokens"][:n], b["row_pos"][:n], b["row_kv"][:n] = toks, pos, kv
            b["out_rows"][: len(ends)] = ends
            table[self._n_slot] = n
            table[self._n_out_slot] = len(wanted)
            self._before_step(last=k == len(steps) - 1)
            self._step(self._table_addr)
            self._after_step()
            logits = self._result(len(wanted))
            if len(steps) == 1 and logits is not None and len(wanted) == len(rows) == wanted[-1] + 1:
                out = logits.copy()  # one step, rows in order (every decode step): no gather
            elif wanted:
                if out is None:
                    out = np.zeros((len(rows), self.config.vocab_size), np.float32)
                if logits is not None:
                    out[wanted] = logits
        for row in rows:
            self._lengths[row.seq] = row.start_pos + len(row.tokens)
            self._holds(row.seq, self._lengths[row.seq])
        return out

    @property
    def _kv(self) -> list[np.ndarray]:
        """The KV caches of every layer this engine runs, K and V: f16[max_seqs, n_kv_local, ctx, head_dim]."""
        return [b for name, b in self._bufs.items() if name.endswith((".k_cache", ".v_cache"))]

    def _holds(self, slot: int, n: int) -> None:
        """slot's KV holds n positions now. Where earlier rows wrote DROP_PAGES or more pages of each head's run
        past them (a rewind, a slot taken over, or freed: copy_prefix(s, s, 0)), those pages go back to the OS:
        the caches take about the memory of what their slots hold, which a KV budget counts
        (session/batcher.py), not of the most they ever held. Fewer are kept (a madvise costs ~40 us here, one
        a head's run), but not when the slot holds nothing now (one a layer's K or V)."""
        high = self._high[slot]
        run = self.config.head_dim * 2  # bytes of one position of one head (f16)
        if high <= n or n > 0 and (high - n) * run < DROP_PAGES * mmap.PAGESIZE:
            self._high[slot] = max(high, n)
            return
        self._high[slot] = n
        for cache in self._kv:  # f16[max_seqs, n_kv_local, ctx, head_dim]
            for part in ([cache[slot]] if n == 0 else [cache[slot, h, n:] for h in range(cache.shape[1])]):
                drop_pages(part)

    def _before_step(self, last: bool) -> None:
        pass

    def _after_step(self) -> None:
        pass

    def _result(self, n_out: int) -> np.ndarray | None:
        """f32[n_out, vocab]: the step's logits (None where this engine gets none: a tensor-parallel worker)."""
        return self._bufs["logits"][:n_out]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table[self._quit_slot] = 1
        self._kick(self._table_addr)
        for t in self._workers:
            t.join()

    def __del__(self) -> None:  # threads hold no Python objects, but must not spin forever
        try:
            self.close()
        except Exception:
            pass




def _run_worker(worker, table_addr: int, tid: int, held: tuple) -> None:
    """A native worker thread: the compiled `worker` loop of thread tid until the table's `quit` is set. `held`
    (the code, the table, the buffers, the weights) is referenced by this frame for as long as the loop runs, so
    no memory the thread can reach is freed or unmapped under it (the KV slots are mappings of their own, which
    an unmap makes fault at once: layout.lazy_zeros)."""
    worker(table_addr, tid)


def _pack(rows: Sequence[BatchRow], max_chunk: int) -> list[list[tuple[int, int, int, int]]]:
    """Rows' tokens in order, cut into steps of at most max_chunk: per step (row index, slot, lo, hi), the
    row's tokens [lo, hi); a row longer than a step's room continues in the next."""
    steps: list[list[tuple[int, int, int, int]]] = [[]]
    room = max_chunk
    for r, row in enumerate(rows):
        lo = 0
        while lo < len(row.tokens):
            if room == 0:
                steps.append([])
                room = max_chunk
            hi = min(len(row.tokens), lo + room)
            steps[-1].append((r, row.seq, lo, hi))
            room -= hi - lo
            lo = hi
    return steps


def _compile(spec: ProgramSpec, cache_dir, extra_key: str, build) -> CompiledModule:
    """The program's machine code. A second start finds it by a key over (spec, extra_key, target,
    sources) and builds no IR at all (building the IR of a 30-layer program costs ~0.2 s of Python)."""
    target = default_target()
    cache = ObjectCache(Path(cache_dir)) if cache_dir is not None else None
    spec_key = "spec-" + hashlib.sha256(
        "|".join((repr(spec), extra_key, target.triple, target.cpu, target.features, llvm_version(),
                  sources_digest())).encode()
    ).hexdigest()[:32]
    if cache is not None and (obj := cache.load(spec_key)) is not None:
        compiled = load_object(obj, target, spec_key)
        if compiled is not None:
            return compiled
    module = build_module(spec.kernel_specs(), target)
    build(module)
    compiled = compile_module(module, target, cache)
    if cache is not None and (obj := cache.load(compiled.stats.key)) is not None:
        cache.store(spec_key, obj)
    return compiled
