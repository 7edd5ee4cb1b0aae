"""Pointwise 1x1 conv on Intel AMX-INT8: `tdpbusd` tiles, requantization fused, VNNI for the rest.

`tdpbusd` multiplies a 16 x 64 u8 tile A (16 pixels x 64 input channels) by a 64 x 16 s8 tile B
stored as 16 rows of (16 output channels x 4 input channels), adding 16 x 16 int32 sums into a
tile C: 16384 products per instruction, exact, never saturating (int32 sums wrap like vpdpbusd's).
B is exactly a 16-row slice of the VNNI kernel's packed weights (vnni.pack_weights), so one weight
array, packed at load with the input channels padded to a multiple of 64, serves both kernels.

Tiles (all configured 16 rows x 64 bytes, palette 1): tmm0-3 accumulate 16 pixels x 64 output
channels (fewer at the end of the channels), tmm4 holds A, tmm5/tmm6 alternate as B. C starts as
the bias (loaded with row stride 0). A is loaded straight from the NHWC activations with the
buffer's row stride; where the input channels end inside a 64-byte block A reads on into the next
pixel (or the buffer's slack rows, which the buffer contract allows), and those bytes meet zero
weights. The C tiles are stored to one half of an 8 KiB stack buffer and requantized row by row
by the VNNI emitter's epilogue (and residual add), so the arithmetic after the sums is the VNNI
kernel's; the epilogue of one 16-row block runs after the next block's tile work (pipelined:
5-25 % faster on Lite0's layers, and it made AMX pay from 32 input channels).

A work chunk runs its pixels in blocks of 16 on AMX and its last (p1 - p0) % 16 pixels on the VNNI
micro-kernel. The first tile instruction needs the process's permission (cpu.amx_permission);
plans only pick AMX where cpu.has_amx() says it was granted.

emuamx: the same chunks, tiles and epilogue with the tile instructions emulated in portable IR
(tiles in stack memory, tdpbusd as 16 x 16 emulated vpdpbusd on broadcast A dwords) and the tails
on vnni's emu512, so the AMX code paths are tested on CPUs without AMX. Slow; never chosen.
"""
from __future__ import annotations

from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu
from ._jit import kernel
from .vnni import ISAS, PANEL_BYTES, _Emitter, _const, _splat, _x86, dpbusd

ROWS = 16            # pixels per tile
KBLOCK = 64          # input channels per tdpbusd
NTILES = 4           # C tiles: 64 output channels per pass
_A, _B = 4, (5, 6)
_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _config(module):
    """The 64-byte tile configuration as an internal constant: palette 1, tiles 0-6 16 x 64 B."""
    name = "ternet_amx_tilecfg"
    if name in module.globals:
        return module.globals[name]
    cfg = bytearray(64)
    cfg[0] = 1
    for t in range(7):
        cfg[16 + 2 * t] = 64            # colsb, little-endian u16
        cfg[48 + t] = ROWS
    g = ir.GlobalVariable(module, ir.ArrayType(_i8, 64), name)
    g.initializer = ir.Constant(ir.ArrayType(_i8, 64), bytearray(cfg))
    g.global_constant = True
    g.linkage = "internal"
    g.align = 64
    return g


def _emu_function(module, name, argtys, body):
    """An internal noinline void function of the module, defined on first use by body(b, args)."""
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), argtys), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    b = ir.IRBuilder(fn.append_basic_block())
    body(b, fn.args)
    b.ret_void()
    return fn


def _emu_copy_rows(module):
    """(dst, dst stride, src, src stride): 16 rows of 64 bytes (emulated tileloadd/tilestored)."""
    def body(b, args):
        dst, dstride, src, sstride = args
        vty = ir.VectorType(_i8, 64)
        with cgutils.for_range(b, _const(ROWS)) as lr:
            row = b.load(b.bitcast(b.gep(src, [b.mul(lr.index, sstride)]), vty.as_pointer()), align=1)
            b.store(row, b.bitcast(b.gep(dst, [b.mul(lr.index, dstride)]), vty.as_pointer()), align=1)
    p = _i8.as_pointer()
    return _emu_function(module, "ternet_emu_tile_copy", [p, _i64, p, _i64], body)


def _emu_tdpbusd(module):
    """(c, a, b) tiles in memory: C[m, n] += sum_k,j u8 A[m, 4k + j] * s8 B[k, 4n + j], int32
    wrapping; row m of C as one vector: 16 vpdpbusd of B's rows on A's broadcast dwords."""
    def body(b, args):
        c, a, w = args
        v16i32, v64i8 = ir.VectorType(_i32, 16), ir.VectorType(_i8, 64)
        with cgutils.for_range(b, _const(ROWS)) as lm:
            cp = b.bitcast(b.gep(c, [b.mul(lm.index, _const(64))]), v16i32.as_pointer())
            acc = cgutils.alloca_once_value(b, b.load(cp, align=1))
            with cgutils.for_range(b, _const(16)) as lk:
                ap = b.bitcast(b.gep(a, [b.add(b.mul(lm.index, _const(64)), b.mul(lk.index, _const(4)))]),
                               _i32.as_pointer())
                dword = _splat(b, b.load(ap, align=1), 16)
                row = b.load(b.bitcast(b.gep(w, [b.mul(lk.index, _const(64))]), v64i8.as_pointer()), align=1)
                b.store(dpbusd(b, b.load(acc), dword, row, native=False), acc)
            b.store(b.load(acc), cp, align=1)
    p = _i8.as_pointer()
    return _emu_function(module, "ternet_emu_tdpbusd", [p, p, p], body)


class _AmxEmitter(_Emitter):
    """A work chunk: rows [p0, p0 + 16 m) on AMX tiles, the remaining rows on VNNI (native) or
    the same with the tile instructions emulated and the tails on emu512 (native=False)."""

    def __init__(self, context, builder, sig, args, panel_bytes, native=True):
        super().__init__(context, builder, ISAS["avx512vnni" if native else "emu512"], sig, args,
                         panel_bytes)
        self.native = native
        buf = cgutils.alloca_once(self.b, ir.ArrayType(_i32, 2 * NTILES * ROWS * 16))
        buf.align = 64
        self.cbuf = self.b.bitcast(buf, _i8.as_pointer())
        if not native:              # the 8 tile registers, 1 KiB each
            tiles = cgutils.alloca_once(self.b, ir.ArrayType(_i8, 8 * ROWS * 64))
            tiles.align = 64
            self.tiles = self.b.bitcast(tiles, _i8.as_pointer())

    def _call(self, name, args, argtys):
        if not self.native:         # ldtilecfg / tilerelease: nothing to emulate
            return None
        return self.b.call(_x86(self.b, name, ir.VoidType(), argtys), args)

    def _tile_mem(self, tmm):
        return self.b.gep(self.tiles, [_const(tmm * ROWS * 64)])

    def _tileload(self, tmm, ptr, stride):
        if not self.native:
            self.b.call(_emu_copy_rows(self.b.module), [self._tile_mem(tmm), _const(64), ptr, stride])
            return
        self._call("llvm.x86.tileloadd64", [_const(tmm, _i8), ptr, stride], [_i8, _i8.as_pointer(), _i64])

    def _tilestore(self, tmm, ptr, stride):
        if not self.native:
            self.b.call(_emu_copy_rows(self.b.module), [ptr, stride, self._tile_mem(tmm), _const(64)])
            return
        self._call("llvm.x86.tilestored64", [_const(tmm, _i8), ptr, stride], [_i8, _i8.as_pointer(), _i64])

    def _tdpbusd(self, c, a, w):
        if not self.native:
            self.b.call(_emu_tdpbusd(self.b.module), [self._tile_mem(c), self._tile_mem(a), self._tile_mem(w)])
            return
        self._call("llvm.x86.tdpbusd", [_const(c, _i8), _const(a, _i8), _const(w, _i8)], [_i8, _i8, _i8])

    def chunk(self):
        b = self.b
        p_amx = b.add(self.p0, b.mul(b.udiv(b.sub(self.p1, self.p0), _const(ROWS)), _const(ROWS)))
        cfg = b.bitcast(_config(b.module), _i8.as_pointer())
        with b.if_then(b.icmp_unsigned(">", p_amx, self.p0)):
            self._call("llvm.x86.ldtilecfg", [cfg], [_i8.as_pointer()])
            # pixel panels as in the VNNI chunk, a multiple of 16 rows
            panel = b.udiv(_const(self.panel_bytes), b.add(self.xs, self.os))
            panel = b.mul(b.add(b.udiv(panel, _const(ROWS)), _const(1)), _const(ROWS))
            step = _const(16 * NTILES)
            o_main = b.add(self.o0, b.mul(b.udiv(b.sub(self.o1, self.o0), step), step))
            with cgutils.for_range_slice(b, self.p0, p_amx, panel) as (pp, _):
                pe = b.add(pp, panel)
                pe = b.select(b.icmp_unsigned("<", pe, p_amx), pe, p_amx)
                with cgutils.for_range_slice(b, self.o0, o_main, step) as (ob, _):
                    self._amx_rows(pp, pe, ob, NTILES)
                left = b.udiv(b.sub(self.o1, o_main), _const(16))       # 0..3 blocks of 16
                for nt in range(1, NTILES):
                    with b.if_then(b.icmp_unsigned("==", left, _const(nt))):
                        self._amx_rows(pp, pe, o_main, nt)
            self._call("llvm.x86.tilerelease", [], [])
        self.p0 = p_amx                           # the tail: the VNNI chunk over the rest
        super().chunk()

    def _amx_rows(self, p0, p1, ob, nt):
        """Rows [p0, p1) (a multiple of 16) x channels [ob, ob + 16 nt), software-pipelined: the
        sums of rows pt go to one half of the stack buffer while the epilogue requantizes the
        previous 16 rows from the other, so the tile stores have landed before they are read and
        the tile unit works during the vector epilogue."""
        b = self.b
        prev = cgutils.alloca_once_value(b, _const(-1))           # rows waiting for the epilogue
        with cgutils.for_range_slice(b, p0, p1, _const(ROWS)) as (pt, _):
            half = b.and_(b.udiv(b.sub(pt, p0), _const(ROWS)), _const(1))
            self._amx_sums(pt, ob, nt, self._half(half))
            last = b.load(prev)
            with b.if_then(b.icmp_signed(">=", last, _const(0))):
                self._amx_epilogue(last, ob, nt, self._half(b.xor(half, _const(1))))
            b.store(pt, prev)
        last = b.load(prev)
        with b.if_then(b.icmp_signed(">=", last, _const(0))):
            half = b.and_(b.udiv(b.sub(last, p0), _const(ROWS)), _const(1))
            self._amx_epilogue(last, ob, nt, self._half(half))

    def _half(self, k):
        return self.b.gep(self.cbuf, [self.b.mul(k, _const(NTILES * ROWS * 64))])

    def _amx_sums(self, pt, ob, nt, buf):
        """Rows [pt, pt + 16) x channels [ob, ob + 16 nt): sums in tmm0..nt-1, stored to buf."""
        b = self.b
        for j in range(nt):
            self._tileload(j, self._ptr(self.bias, b.mul(b.add(ob, _const(16 * j)), _const(4)), _i8),
                           _const(0))
        wblk = b.mul(b.udiv(ob, _const(16)), self.ws)
        xrow = b.mul(pt, self.xs)
        nkb = b.udiv(b.add(self.nkb, _const(KBLOCK // 4 - 1)), _const(KBLOCK // 4))
        with cgutils.for_range(b, nkb) as lk:
            kb = lk.index
            self._tileload(_A, self._ptr(self.x, b.add(xrow, b.mul(kb, _const(KBLOCK))), _i8), self.xs)
            for j in range(nt):
                wofs = b.add(b.add(wblk, b.mul(_const(j), self.ws)), b.mul(kb, _const(16 * 64)))
                self._tileload(_B[j % 2], self._ptr(self.w, wofs, _i8), _const(64))
                self._tdpbusd(j, _A, _B[j % 2])
        for j in range(nt):
            self._tilestore(j, b.gep(buf, [_const(j * ROWS * 64)]), _const(64))

    def _amx_epilogue(self, pt, ob, nt, buf):
        """Requantize (and add the residual to) the sums of rows [pt, pt + 16) from buf."""
        b = self.b
        chan = [b.add(ob, _const(16 * j)) for j in range(nt)]
        mult = self._multipliers(chan)
        for i in range(ROWS):
            accs = [b.load(self._ptr(buf, _const(j * ROWS * 64 + i * 64), self.vi), align=64)
                    for j in range(nt)]
            self._store_row(b.add(pt, _const(i)), chan, accs, mult)


def _chunk_intrinsic(fused: bool, native: bool = True):
    def typer(typingctx, *args):
        # Typing runs before code generation: a CPU (or numba target) without AMX gets an
        # exception here instead of an LLVM abort or an illegal instruction.
        if native and not cpu.can_compile("amx"):
            raise RuntimeError("ternet: this CPU (or numba's target) lacks amx")
        sig = types.void(*args)

        def codegen(context, builder, sig, args):
            _AmxEmitter(context, builder, sig, args, PANEL_BYTES, native).chunk()
            return context.get_dummy_value()

        return sig, codegen

    if fused:
        def chunk_add(typingctx, x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c, res, zr, mr, zq,
                      mq, zph2, lo2, hi2):
            return typer(typingctx, x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c, res, zr, mr,
                         zq, mq, zph2, lo2, hi2)
        return intrinsic(chunk_add)

    def chunk(typingctx, x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c):
        return typer(typingctx, x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)
    return intrinsic(chunk)


_chunk_amx = _chunk_intrinsic(False)
_chunk_add_amx = _chunk_intrinsic(True)
_chunk_emu = _chunk_intrinsic(False, native=False)
_chunk_add_emu = _chunk_intrinsic(True, native=False)


# Drivers: the arguments of vnni's drivers; w packed with the input channels padded to 64.

@kernel()
def pw_i8_u8_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks):
    """AMX-INT8 pointwise: u8[rows, Kp] x i8[Np/16, Kp64/4, 16, 4] -> u8[rows, Np], fused requant."""
    for c in range(chunks.shape[0]):
        _chunk_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)


@kernel(parallel=True)
def pw_i8_u8_amx_par(x, w, bias, mult, zph, lo, hi, out, nkb, chunks):
    """pw_i8_u8_amx with the chunks spread over numba's threads (each sets up its own tiles)."""
    for c in prange(chunks.shape[0]):
        _chunk_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)


@kernel()
def pw_i8_i32_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks):
    """AMX-INT8 pointwise accumulators: u8[rows, Kp] x i8[..] -> i32[rows, Np] (bias added)."""
    for c in range(chunks.shape[0]):
        _chunk_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)


@kernel()
def pw_i8_u8_amx_add(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, res, zr, mr, zq, mq, zph2, lo2,
                     hi2):
    """pw_i8_u8_amx + residual add fused (as vnni.pw_i8_u8_vnni_add): u8[rows, Kp] -> u8[rows, Np]."""
    for c in range(chunks.shape[0]):
        _chunk_add_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c, res, zr, mr, zq, mq, zph2,
                       lo2, hi2)


@kernel(parallel=True)
def pw_i8_u8_amx_add_par(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, res, zr, mr, zq, mq, zph2,
                         lo2, hi2):
    """pw_i8_u8_amx_add with the chunks spread over numba's threads."""
    for c in prange(chunks.shape[0]):
        _chunk_add_amx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c, res, zr, mr, zq, mq, zph2,
                       lo2, hi2)


@kernel()
def pw_i8_u8_emuamx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks):
    """pw_i8_u8_amx with the tile instructions emulated (any CPU; tests): u8[rows, Kp] -> u8."""
    for c in range(chunks.shape[0]):
        _chunk_emu(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)


@kernel()
def pw_i8_i32_emuamx(x, w, bias, mult, zph, lo, hi, out, nkb, chunks):
    """pw_i8_i32_amx emulated: u8[rows, Kp] -> i32[rows, Np] (bias added)."""
    for c in range(chunks.shape[0]):
        _chunk_emu(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c)


@kernel()
def pw_i8_u8_emuamx_add(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, res, zr, mr, zq, mq, zph2,
                        lo2, hi2):
    """pw_i8_u8_amx_add emulated: u8[rows, Kp] -> u8[rows, Np]."""
    for c in range(chunks.shape[0]):
        _chunk_add_emu(x, w, bias, mult, zph, lo, hi, out, nkb, chunks, c, res, zr, mr, zq, mq, zph2,
                       lo2, hi2)


# isa -> (serial u8, parallel u8, serial int32) and (serial, parallel) with the add fused;
# emuamx runs serially
DRIVERS = {"amx": (pw_i8_u8_amx, pw_i8_u8_amx_par, pw_i8_i32_amx),
           "emuamx": (pw_i8_u8_emuamx, pw_i8_u8_emuamx, pw_i8_i32_emuamx)}
ADD_DRIVERS = {"amx": (pw_i8_u8_amx_add, pw_i8_u8_amx_add_par),
               "emuamx": (pw_i8_u8_emuamx_add, pw_i8_u8_emuamx_add)}
