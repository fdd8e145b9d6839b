"""KernelSpecs -> one llvmlite module -> compiled machine code -> ctypes functions.

    lib = compile_kernels(all_specs(), cache_dir=...)   # one module: compiling once costs ~0.x s
    lib["matvec_q4_1_q8s"](w_ptr, x_ptr, y_ptr, k, r0, r1)

Pointers are passed as plain ints (`arr.ctypes.data`, looked up once by the caller: ~1 us per call
instead of ~6 us). ctypes releases the GIL during the call, so Python threads run kernels in parallel.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import llvmlite.ir as ir

from .compiler import DEFAULT_CACHE_DIR, CompiledModule, ObjectCache, Target, compile_module, default_target
from .ir_barrier import emit_barrier, emit_barrier_demo
from .ir_matvec import emit_matmul_q, emit_matvec_f, emit_matvec_q, emit_quantize, emit_quantize_part, emit_quantize_q8_0
from .ir_matvec_extra import emit_embed_extra
from .layout import EXTRA_TYPES
from .ir_attention import emit_attention, emit_attention_merge
from .ir_ops import (
    emit_add, emit_add_q8_0, emit_embed, emit_gelu_tanh_mul, emit_rmsnorm, emit_rope, emit_scale, emit_silu_mul,
    emit_to_f16, emit_top_k,
)
from .specs import QUANT_WEIGHTS, KernelSpec, Op

_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}

_EMITTERS: dict[Op, Callable] = {
    Op.QUANTIZE: emit_quantize,
    Op.QUANTIZE_PART: emit_quantize_part,
    Op.QUANTIZE_Q8_0: emit_quantize_q8_0,
    Op.ADD_Q8_0: emit_add_q8_0,
    Op.MATMUL: emit_matmul_q,
    Op.EMBED: emit_embed,
    Op.RMSNORM: emit_rmsnorm,
    Op.ROPE: emit_rope,
    Op.ATTENTION: emit_attention,
    Op.ATTENTION_MERGE: emit_attention_merge,
    Op.SILU_MUL: emit_silu_mul,
    Op.GELU_TANH_MUL: emit_gelu_tanh_mul,
    Op.SCALE: emit_scale,
    Op.ADD: emit_add,
    Op.TO_F16: emit_to_f16,
    Op.TOP_K: emit_top_k,
    Op.BARRIER: emit_barrier,
    Op.BARRIER_DEMO: emit_barrier_demo,
}


def _emitter(spec: KernelSpec) -> Callable:
    if spec.op == Op.MATVEC:
        return emit_matvec_q if spec.qtype in QUANT_WEIGHTS else emit_matvec_f
    if spec.op == Op.EMBED and spec.qtype in EXTRA_TYPES:
        return emit_embed_extra  # the packed layouts of the 5/6-bit and K-quant types live in ir_matvec_extra
    return _EMITTERS[spec.op]


def build_module(specs: Iterable[KernelSpec], target: Target) -> ir.Module:
    """IR for every spec, in one module (kernels are noinline; shared helpers are emitted once)."""
    module = ir.Module(name="dllp2p_kernels")
    module.triple = target.triple
    for spec in dict.fromkeys(specs):  # unique, in order
        if spec.name not in module.globals:
            _emitter(spec)(module, spec, target)
    return module


@dataclass
class KernelLibrary:
    """Compiled kernels by name, as ctypes functions; keeps the machine code alive."""

    compiled: CompiledModule
    functions: dict[str, Callable]
    specs: tuple[KernelSpec, ...]

    def __getitem__(self, name: str) -> Callable:
        return self.functions[name]

    def address(self, name: str) -> int:
        return self.compiled.address(name)


def compile_kernels(
    specs: Iterable[KernelSpec],
    cache_dir: os.PathLike | str | None = DEFAULT_CACHE_DIR,
    target: Target | None = None,
) -> KernelLibrary:
    """Build, compile (or load from the cache under cache_dir; None: no disk cache) and wrap the kernels."""
    specs = tuple(dict.fromkeys(specs))
    target = target or default_target()
    cache = ObjectCache(Path(cache_dir)) if cache_dir is not None else None
    compiled = compile_module(build_module(specs, target), target, cache)
    functions = {}
    for spec in specs:
        proto = ctypes.CFUNCTYPE(None, *(_CTYPES[k] for _, k in spec.signature.args))
        functions[spec.name] = proto(compiled.address(spec.name))
    return KernelLibrary(compiled, functions, specs)
