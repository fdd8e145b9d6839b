"""Compile an llvmlite IR module to machine code for this CPU, in explicit stages, with a disk cache.

    ir.Module --str--> IR text --parse--> verify --optimize (new pass builder, O3)--> MCJIT codegen
                                                                                     for the host CPU
The object code is cached on disk, keyed by a hash of (IR text, triple, CPU name, CPU features,
llvmlite version, pipeline version): a second process start with the same cache dir parses the IR
but neither optimizes nor generates code (llvmlite's `set_object_cache` hooks hand MCJIT the stored
object). One process-wide lock serializes all LLVM work; LLVM's global init happens once under it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm
import llvmlite.ir as ir

from ..diskcache import Damaged, evict, sealed, touch, unseal, write_atomically

log = logging.getLogger("dllp2p.jit")

PIPELINE_VERSION = 1  # bump when the optimization pipeline changes what the same IR compiles to
# Compiled code and packed weights of a library caller that names no cache dir. The CLI and the daemon
# pass config.cache_dir(environ) down instead ($DLLP2P_CACHE_DIR, $XDG_CACHE_HOME): nothing here reads
# the environment.
DEFAULT_CACHE_DIR = Path("~/.cache/dllp2p/jit")
CODE_CACHE_BYTES = 512 << 20  # compiled objects kept per cache dir; the least recently used go beyond it

_LOCK = threading.Lock()  # every LLVM call in this process goes through this lock
_initialized = False


# C library functions generated code may call (sleeping, yielding, socket I/O, the clock)
LIBC_SYMBOLS = ("usleep", "sched_yield", "send", "recv", "clock_gettime", "__errno_location")


def _init_llvm() -> None:
    global _initialized
    if not _initialized:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        libc = ctypes.CDLL(None)
        for name in LIBC_SYMBOLS:  # resolved for the JIT linker by address, so the IR names no library
            llvm.add_symbol(name, ctypes.cast(getattr(libc, name), ctypes.c_void_p).value)
        _initialized = True


@dataclass(frozen=True)
class Target:
    """A code-generation target: normally the host; other CPUs only to inspect their assembly."""

    triple: str
    cpu: str
    features: str  # LLVM feature string, e.g. "+avx2,+fma,-avx512f"

    def has(self, feature: str) -> bool:
        return f"+{feature}" in self.features.split(",")

    @property
    def is_x86(self) -> bool:
        return self.triple.startswith(("x86_64", "i686", "i386"))

    @property
    def dot_isa(self) -> str:
        """How an u8 x s8 -> s32 dot of 4-byte groups is emitted: 'avx512vnni', 'avxvnni', 'avx2'
        (vpmaddubsw + vpmaddwd) or 'generic' (plain IR, which LLVM vectorizes as it can)."""
        if self.is_x86 and self.has("avx512vnni") and self.has("avx512bw"):
            return "avx512vnni"
        if self.is_x86 and self.has("avxvnni"):
            return "avxvnni"
        if self.is_x86 and self.has("avx2"):
            return "avx2"
        return "generic"

    def machine(self) -> llvm.TargetMachine:
        with _LOCK:
            _init_llvm()
            target = llvm.Target.from_triple(self.triple)
            return target.create_target_machine(cpu=self.cpu, features=self.features, opt=3, codemodel="jitdefault")


def host_target() -> Target:
    with _LOCK:
        _init_llvm()
        return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


@dataclass
class CompileStats:
    key: str
    from_cache: bool  # True: no optimization and no code generation happened in this process
    seconds: float


@dataclass
class CompiledModule:
    """Machine code loaded into this process. Function addresses stay valid while this object lives."""

    engine: llvm.ExecutionEngine
    stats: CompileStats
    _keep: list = field(default_factory=list)  # module, target machine: owned by the engine's lifetime

    def address(self, name: str) -> int:
        addr = self.engine.get_function_address(name)
        if not addr:
            raise KeyError(f"no function {name!r} in the compiled module")
        return addr


class ObjectCache:
    """Object files on disk, one per key: `<dir>/<key>.o`, sealed (diskcache: sha256 of the object code in
    the header, checked before llvmlite sees a byte: a damaged object would crash the linker) and written
    atomically. A damaged file is deleted with one log line and compiled afresh. Within `budget` bytes:
    the least recently used objects go when a new one is stored."""

    def __init__(self, directory: os.PathLike | str, budget: int | None = CODE_CACHE_BYTES):
        self.dir = Path(directory).expanduser()
        self.budget = budget

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.o"

    def load(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            data = unseal(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, Damaged) as e:
            log.warning("compiled code %s is damaged (%s); compiling afresh", path, e)
            path.unlink(missing_ok=True)
            return None
        touch(path)
        return data

    def store(self, key: str, data: bytes) -> None:
        """Best effort (it runs inside LLVM's callback): a full or read-only disk logs one line."""
        try:
            write_atomically(self.path(key), sealed(data))
        except OSError as e:
            log.warning("compiled code not cached in %s: %s", self.dir, e)
            return
        if self.budget is not None:
            evict(self.dir.glob("*.o"), self.budget, keep=[self.path(key)])


def cache_key(ir_text: str, target: Target) -> str:
    h = hashlib.sha256()
    for part in (ir_text, target.triple, target.cpu, target.features, llvmlite.__version__, str(PIPELINE_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def optimize(module_ref: llvm.ModuleRef, tm: llvm.TargetMachine) -> None:
    """Verify, then the new pass manager's O3 pipeline, in place."""
    module_ref.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module_ref, pb)


def emit_assembly(module: ir.Module, target: Target) -> str:
    """The optimized assembly text of `module` for `target` (for tests and inspection)."""
    tm = target.machine()
    with _LOCK:
        ref = llvm.parse_assembly(str(module))
        optimize(ref, tm)
        return tm.emit_assembly(ref)


def llvm_version() -> str:
    return f"llvmlite {llvmlite.__version__} llvm {'.'.join(map(str, llvm.llvm_version_info))} pipeline {PIPELINE_VERSION}"


def load_object(data: bytes, target: Target, key: str, t0: float | None = None) -> CompiledModule | None:
    """Link cached object code into a fresh engine (no IR parsed, nothing optimized); None if unreadable."""
    t0 = time.perf_counter() if t0 is None else t0
    tm = target.machine()
    with _LOCK:
        try:
            empty = llvm.parse_assembly(f'target triple = "{target.triple}"')
            engine = llvm.create_mcjit_compiler(empty, tm)
            engine.add_object_file(llvm.ObjectFileRef.from_data(data))
            engine.finalize_object()
        except Exception:  # a damaged cache entry: the caller compiles afresh and overwrites it
            return None
    return CompiledModule(engine, CompileStats(key, True, time.perf_counter() - t0), [tm])


def compile_module(module: ir.Module, target: Target, cache: ObjectCache | None) -> CompiledModule:
    """IR -> verify -> optimize -> machine code, or the cached object code for the same key.

    On a cache hit the IR is not even parsed: the object file is linked into an empty engine (the
    IR text is still built, to compute the key: ~10 ms for a whole model's program)."""
    t0 = time.perf_counter()
    text = str(module)
    key = cache_key(text, target)
    cached = cache.load(key) if cache is not None else None
    tm = target.machine()
    if cached is not None:
        compiled = load_object(cached, target, key, t0)
        if compiled is not None:
            return compiled
    with _LOCK:
        ref = llvm.parse_assembly(text)
        optimize(ref, tm)
        engine = llvm.create_mcjit_compiler(ref, tm)

        def notify(_module, data: bytes) -> None:
            if cache is not None:
                cache.store(key, data)

        engine.set_object_cache(notify, lambda _module: None)
        engine.finalize_object()
    stats = CompileStats(key, False, time.perf_counter() - t0)
    return CompiledModule(engine, stats, [tm])
