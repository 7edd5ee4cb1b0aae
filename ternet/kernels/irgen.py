"""LLVM-IR building blocks shared by the IR micro-kernels (vnni.py, amx.py, dw_vnni.py,
depthwise.py): types, constants, splats and shuffles, x86 intrinsics, `vpdpbusd` and its portable
emulation, internal helper functions, array access.

Importing this module imports llvmlite and numba's code generation helpers; it emits nothing.
"""
from __future__ import annotations

from llvmlite import binding as llb
from llvmlite import ir
from numba.core import cgutils

i1, i8, i16, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f32 = ir.FloatType()


def vec(ty, n):
    return ir.VectorType(ty, n)


def const(v, ty=i64):
    return ir.Constant(ty, v)


def lanes(idx):
    """A constant <n x i32> lane list (shuffle masks)."""
    idx = list(idx)
    return ir.Constant(vec(i32, len(idx)), idx)


def shuffle(b, v, idx, v2=None):
    """shufflevector of v (and v2; undef if None) picking lanes idx."""
    v2 = ir.Constant(v.type, ir.Undefined) if v2 is None else v2
    return b.shuffle_vector(v, v2, lanes(idx))


def splat(b, scalar, n):
    """<n x T> with every lane = scalar."""
    v = b.insert_element(ir.Constant(vec(scalar.type, n), ir.Undefined), scalar, const(0, i32))
    return shuffle(b, v, [0] * n)


def x86(b, name, ret, argtys):
    """Declare (once per module) an LLVM intrinsic by its full name."""
    return b.module.declare_intrinsic(name, fnty=ir.FunctionType(ret, argtys))


def internal_function(module, name, ret, argtys, body):
    """An internal noinline function of the module, defined on first use by body(builder, fn),
    which emits its return. For emulations of wide instructions: inlined at every call site of an
    unrolled register tile, their element loops and 64-lane arithmetic took LLVM minutes."""
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ret, argtys), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    body(ir.IRBuilder(fn.append_basic_block()), fn)
    return fn


def dpbusd(b, acc, a, w, native: bool):
    """<16 x i32> acc + per lane the sum of its 4 products u8(a byte) * s8(w byte), a and w any
    512-bit vectors: `vpdpbusd` (native; never the saturating vpdpbusds), else the same exact,
    wrapping int32 arithmetic in portable IR (emulation on CPUs without AVX512-VNNI)."""
    v16i32, v64i8 = vec(i32, 16), vec(i8, 64)
    if native:
        # LLVM >= 22 types the byte operands as <64 x i8>; older versions use <16 x i32>
        # (which LLVM 22 still auto-upgrades).
        opty = v64i8 if llb.llvm_version_info >= (22,) else v16i32
        fn = x86(b, "llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32, opty, opty])
        return b.call(fn, [acc, b.bitcast(a, opty), b.bitcast(w, opty)])
    return b.call(_emu_dpbusd(b.module), [acc, b.bitcast(a, v64i8), b.bitcast(w, v64i8)])


def _emu_dpbusd(module):
    """The portable vpdpbusd, one internal function per module."""
    v16i32, v64i8, v64i32 = vec(i32, 16), vec(i8, 64), vec(i32, 64)

    def body(b, fn):
        acc, a, w = fn.args
        prod = b.mul(b.zext(a, v64i32), b.sext(w, v64i32))
        for k in range(4):
            acc = b.add(acc, shuffle(b, prod, [4 * l + k for l in range(16)]))
        b.ret(acc)
    return internal_function(module, "ternet_emu_dpbusd", v16i32, [v16i32, v64i8, v64i8], body)


def array(ctx, b, ty, val):
    """(i8* data, byte stride of the first axis) of a numba array argument."""
    a = ctx.make_array(ty)(ctx, b, val)
    return b.bitcast(a.data, i8.as_pointer()), cgutils.unpack_tuple(b, a.strides, ty.ndim)[0]


def ptr(b, base, off, ty):
    """base (i8*) + off bytes, as a pointer to ty."""
    return b.bitcast(b.gep(base, [off]), ty.as_pointer())


class Record:
    """The fields of a numba named-tuple argument of an intrinsic, by name: `rec.x` the IR value,
    `rec.types.x` its numba type; integer fields cast to uint64 when `unsigned` (offsets)."""

    def __init__(self, ctx, b, ty, val, unsigned=False):
        from numba import types    # noqa: PLC0415
        vals = cgutils.unpack_tuple(b, val, len(ty))
        tys = list(ty.types)
        if unsigned:
            vals = [ctx.cast(b, v, t, types.uint64) if isinstance(t, types.Integer) else v
                    for v, t in zip(vals, tys)]
        self.__dict__.update(zip(ty.fields, vals))
        self.types = type("Types", (), dict(zip(ty.fields, tys)))
