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
import functools
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
_all_targets = False  # the other architectures' code generators: only to emit their assembly (tests)


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
    def is_aarch64(self) -> bool:
        return self.triple.startswith(("aarch64", "arm64"))

    @property
    def dot_isa(self) -> str:
        """How an u8 x s8 -> s32 dot of 4-byte groups is emitted: 'avx512vnni', 'avxvnni', 'avx2'
        (vpmaddubsw + vpmaddwd), on AArch64 'dotprod' (sdot, ARMv8.2 dot product) or 'neon' (smull +
        pairwise widening adds), else 'generic' (plain IR, which LLVM vectorizes as it can)."""
        if self.is_aarch64:
            return "dotprod" if self.has("dotprod") else "neon"
        if self.is_x86 and self.has("avx512vnni") and self.has("avx512bw"):
            return "avx512vnni"
        if self.is_x86 and self.has("avxvnni"):
            return "avxvnni"
        if self.is_x86 and self.has("avx2"):
            return "avx2"
        return "generic"

    def machine(self) -> llvm.TargetMachine:
        global _all_targets
        with _LOCK:
            _init_llvm()
            if not _all_targets and self.triple.split("-")[0] != llvm.get_process_triple().split("-")[0]:
                llvm.initialize_all_targets()  # ~9 ms, so not at every start
                llvm.initialize_all_asmprinters()
                _all_targets = True
            target = llvm.Target.from_triple(self.triple)
            return target.create_target_machine(cpu=self.cpu, features=self.features, opt=3, codemodel="jitdefault")


def host_target() -> Target:
    with _LOCK:
        _init_llvm()
        return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


class TargetError(ValueError):
    """A target override (DLLP2P_TARGET_CPU) that names no known CPU or cannot run in this process."""


TARGET_ENV = "DLLP2P_TARGET_CPU"
AARCH64_TRIPLE, X86_64_TRIPLE = "aarch64-unknown-linux-gnu", "x86_64-unknown-linux-gnu"
# Feature strings of the CPUs an override may name without spelling out features (the ones dot_isa and
# has_native_f16 look at; the CPU name itself makes LLVM schedule and select for that core).
_A_BASE = "+neon,+fp-armv8,+crc"
_A_V82 = _A_BASE + ",+lse,+rdm,+rcpc,+fullfp16,+dotprod"
_X_AVX2 = "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi2"
_X_512 = _X_AVX2 + ",+avx512f,+avx512bw,+avx512dq,+avx512vl"
KNOWN_CPUS: dict[str, tuple[str, str]] = {
    "generic-aarch64": (AARCH64_TRIPLE, _A_BASE),      # any ARMv8-A (Raspberry Pi 3)
    "cortex-a53": (AARCH64_TRIPLE, _A_BASE),           # Raspberry Pi 3, Zero 2 W
    "cortex-a72": (AARCH64_TRIPLE, _A_BASE),           # Raspberry Pi 4, 400: no dot product
    "cortex-a55": (AARCH64_TRIPLE, _A_V82),
    "cortex-a76": (AARCH64_TRIPLE, _A_V82),            # Raspberry Pi 5: sdot/udot
    "neoverse-n1": (AARCH64_TRIPLE, _A_V82),
    "x86-64": (X86_64_TRIPLE, "+sse2"),
    "haswell": (X86_64_TRIPLE, _X_AVX2),
    "znver2": (X86_64_TRIPLE, _X_AVX2),
    "znver3": (X86_64_TRIPLE, _X_AVX2),
    "alderlake": (X86_64_TRIPLE, _X_AVX2 + ",+avxvnni"),
    "skylake-avx512": (X86_64_TRIPLE, _X_512),
    "icelake-server": (X86_64_TRIPLE, _X_512 + ",+avx512vnni"),
    "znver4": (X86_64_TRIPLE, _X_512 + ",+avx512vnni"),
}


def parse_target(text: str) -> Target:
    """A target from an override: 'CPU' (a name of KNOWN_CPUS), 'CPU,+feat,-feat' (features added to or
    removed from the known ones) or 'TRIPLE:CPU,+feat,...' (any CPU LLVM knows, features spelled out)."""
    triple, _, rest = text.strip().rpartition(":")
    cpu, *extra = [part.strip() for part in rest.split(",") if part.strip()] or [""]
    if not cpu:
        raise TargetError(f"{TARGET_ENV}={text!r} names no CPU")
    known_triple, features = KNOWN_CPUS.get(cpu, (None, ""))
    if not triple and known_triple is None:
        raise TargetError(f"{TARGET_ENV}: unknown CPU {cpu!r}; name one of {', '.join(KNOWN_CPUS)} or give "
                          f"'TRIPLE:CPU,+feature,...' (e.g. {AARCH64_TRIPLE}:cortex-a78,+neon,+dotprod)")
    feats = [f for f in features.split(",") if f]
    for f in extra:
        if f[:1] not in "+-" or len(f) < 2:
            raise TargetError(f"{TARGET_ENV}: feature {f!r} must start with + or -")
        feats = [g for g in feats if g[1:] != f[1:]] + [f]
    triple = triple or known_triple
    llvm_cpu = "generic" if cpu == "generic-aarch64" else cpu
    return Target(triple, llvm_cpu, ",".join(feats))


def target_from_env(environ: dict[str, str] | None = None) -> Target:
    """The target kernels are compiled for: DLLP2P_TARGET_CPU's (see parse_target) or the host's. An
    override for another architecture than this process's is an error here: its code cannot run."""
    text = (os.environ if environ is None else environ).get(TARGET_ENV, "").strip()
    host = host_target()
    if not text:
        return host
    target = parse_target(text)
    if target.triple.split("-")[0] != host.triple.split("-")[0]:
        raise TargetError(f"{TARGET_ENV}={text!r} is a {target.triple} target; this process runs on "
                          f"{host.triple} and can only emit its assembly (compiler.emit_assembly)")
    return target


_default_target: Target | None = None


def default_target() -> Target:
    """The process's target, read from the environment once (first use) and the same afterwards."""
    global _default_target
    if _default_target is None:
        _default_target = target_from_env()
    return _default_target


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


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    """What the generated code depends on besides the spec: every source file of dllp2p, not only jit/'s
    (formats/ holds block layouts and tables the kernels bake in, tp.py the node's table slots): code that
    another checkout or version compiled into a shared cache is never taken for this one's."""
    h = hashlib.sha256()
    root = Path(__file__).parent.parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# Taken when the compiler is imported (with the modules that emit the IR), not at the first compile: files
# replaced under a running process (an upgrade, a checkout) must not key the code it compiled from the old
# ones (found: a program cached that way under the new sources' key crashed the next process that loaded it).
sources_digest()
