"""Small helpers for writing kernels with llvmlite.ir: types, signatures, loops, vector idioms.

Loops keep their induction variable in an alloca; LLVM's SROA/mem2reg turns it into SSA at -O3.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import llvmlite.ir as ir

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F16 = ir.HalfType()
F32 = ir.FloatType()
PTR = ir.PointerType()
VOID = ir.VoidType()

# Argument kinds of a kernel signature: pointer, i64, f32. Shared by the IR and the ctypes side.
ARG_TYPES = {"p": PTR, "i": I64, "f": F32}


@dataclass(frozen=True)
class Signature:
    """A kernel's arguments as (name, kind) pairs; kind is 'p' (pointer), 'i' (i64) or 'f' (f32)."""

    args: tuple[tuple[str, str], ...]

    def ir_type(self) -> ir.FunctionType:
        return ir.FunctionType(VOID, [ARG_TYPES[k] for _, k in self.args])


def vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, v)


def splat_const(elem: ir.Type, n: int, value) -> ir.Constant:
    return ir.Constant(vec(elem, n), [ir.Constant(elem, value)] * n)


def mask(indices) -> ir.Constant:
    return ir.Constant(vec(I32, len(indices)), [i32(i) for i in indices])


def splat(b: ir.IRBuilder, scalar: ir.Value, n: int) -> ir.Value:
    """scalar -> <n x type(scalar)> with every lane equal."""
    t = vec(scalar.type, n)
    one = b.insert_element(ir.Constant(t, ir.Undefined), scalar, i32(0))
    return b.shuffle_vector(one, ir.Constant(t, ir.Undefined), mask([0] * n))


def define(module: ir.Module, name: str, sig: Signature, *, internal: bool = False) -> tuple[ir.Function, ir.IRBuilder]:
    """A new noinline function with named arguments and an entry block; returns (function, builder)."""
    fn = ir.Function(module, sig.ir_type(), name)
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    if internal:
        fn.linkage = "internal"
    for arg, (arg_name, _) in zip(fn.args, sig.args):
        arg.name = arg_name
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def intrinsic(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    """Declare (once) and return an LLVM intrinsic or external function."""
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name)


def gep(b: ir.IRBuilder, ptr: ir.Value, offset: ir.Value, elem: ir.Type = I8) -> ir.Value:
    """ptr + offset elements of type elem."""
    return b.gep(ptr, [offset], source_etype=elem)


def load(b: ir.IRBuilder, ptr: ir.Value, typ: ir.Type, offset: ir.Value | None = None, elem: ir.Type = I8) -> ir.Value:
    """Load a typ at ptr + offset elements of elem (byte offsets by default), alignment 1."""
    p = ptr if offset is None else gep(b, ptr, offset, elem)
    return b.load(p, typ=typ, align=1)


def store(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value, offset: ir.Value | None = None, elem: ir.Type = I8) -> None:
    p = ptr if offset is None else gep(b, ptr, offset, elem)
    b.store(value, p, align=1)


def entry_alloca(b: ir.IRBuilder, typ: ir.Type, init: ir.Value | None = None, name: str = "") -> ir.Value:
    """A stack slot in the entry block (so mem2reg promotes it), optionally initialised here."""
    fn = b.function
    with b.goto_block(fn.entry_basic_block):
        entry = fn.entry_basic_block
        if entry.instructions:
            b.position_before(entry.instructions[0])
        slot = b.alloca(typ, name=name)
    if init is not None:
        b.store(init, slot)
    return slot


@contextlib.contextmanager
def for_range(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int | ir.Value = 1, name: str = "i") -> Iterator[ir.Value]:
    """`for i in range(start, stop, step)` (step > 0, i64); the body is emitted inside the with-block."""
    step_v = i64(step) if isinstance(step, int) else step
    slot = entry_alloca(b, I64, start, name=f"{name}.slot")
    cond_bb = b.append_basic_block(f"{name}.cond")
    body_bb = b.append_basic_block(f"{name}.body")
    end_bb = b.append_basic_block(f"{name}.end")
    b.branch(cond_bb)
    b.position_at_end(cond_bb)
    i = b.load(slot, typ=I64, name=name)
    b.cbranch(b.icmp_signed("<", i, stop), body_bb, end_bb)
    b.position_at_end(body_bb)
    yield i
    b.store(b.add(i, step_v), slot)
    b.branch(cond_bb)
    b.position_at_end(end_bb)


def hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Horizontal sum of a float or int vector by halving (a fixed, vectorizable tree order)."""
    n = v.type.count
    is_float = isinstance(v.type.element, (ir.FloatType, ir.HalfType, ir.DoubleType))
    while n > 1:
        half = n // 2
        lo = b.shuffle_vector(v, v, mask(range(half)))
        hi = b.shuffle_vector(v, v, mask(range(half, n)))
        v = b.fadd(lo, hi) if is_float else b.add(lo, hi)
        n = half
    return b.extract_element(v, i32(0))


def hmax(b: ir.IRBuilder, module: ir.Module, v: ir.Value) -> ir.Value:
    """Horizontal max of a float vector (llvm.maxnum tree)."""
    n = v.type.count
    while n > 1:
        half = n // 2
        t = vec(v.type.element, half)
        fn = intrinsic(module, f"llvm.maxnum.v{half}f32", t, [t, t])
        v = b.call(fn, [b.shuffle_vector(v, v, mask(range(half))), b.shuffle_vector(v, v, mask(range(half, n)))])
        n = half
    return b.extract_element(v, i32(0))


def vector_loop(b: ir.IRBuilder, n: ir.Value, width: int, body: Callable[[ir.Value, int], None]) -> None:
    """Run body(i, w) for i in 0..n: with w = width lanes while they fit, then w = 1 for the tail."""
    main = b.and_(n, i64(~(width - 1)))
    with for_range(b, i64(0), main, width, name="v") as i:
        body(i, width)
    with for_range(b, main, n, 1, name="t") as i:
        body(i, 1)


# --- f32 helpers the element-wise, attention and product kernels share (n = 0: a scalar) ---------------

def fvec(n: int) -> ir.Type:
    return vec(F32, n)


def fconst(v: float, n: int = 0) -> ir.Constant:
    return ir.Constant(fvec(n), [ir.Constant(F32, v)] * n) if n else ir.Constant(F32, v)


def fmuladd(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """x * y + z, fused where the target can: scalars or any f32 vector."""
    name = f"llvm.fmuladd.v{x.type.count}f32" if isinstance(x.type, ir.VectorType) else "llvm.fmuladd.f32"
    return b.call(intrinsic(b.module, name, x.type, [x.type] * 3), [x, y, z])


def fminmax(b: ir.IRBuilder, name: str, x: ir.Value, y: ir.Value) -> ir.Value:
    """llvm.{name} (minnum, maxnum, ...) of two f32 vectors."""
    n = x.type.count
    return b.call(intrinsic(b.module, f"llvm.{name}.v{n}f32", x.type, [x.type, x.type]), [x, y])
