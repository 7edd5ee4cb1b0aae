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
from numba.core import cgutils

from .irgen import const, dpbusd, i8, i32, i64, internal_function, splat, x86
from .vnni import ISAS, _Emitter, make_drivers

ROWS = 16            # pixels per tile
KBLOCK = 64          # input channels per tdpbusd
NTILES = 4           # C tiles: 64 output channels per pass
_A, _B = 4, (5, 6)


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
    g = ir.GlobalVariable(module, ir.ArrayType(i8, 64), name)
    g.initializer = ir.Constant(ir.ArrayType(i8, 64), bytearray(cfg))
    g.global_constant = True
    g.linkage = "internal"
    g.align = 64
    return g


def _emu_function(module, name, argtys, body):
    """An internal noinline void function of the module, defined on first use by body(b, args)."""
    def define(b, fn):
        body(b, fn.args)
        b.ret_void()
    return internal_function(module, name, ir.VoidType(), argtys, define)


def _emu_copy_rows(module):
    """(dst, dst stride, src, src stride): 16 rows of 64 bytes (emulated tileloadd/tilestored)."""
    def body(b, args):
        dst, dstride, src, sstride = args
        vty = ir.VectorType(i8, 64)
        with cgutils.for_range(b, const(ROWS)) as lr:
            row = b.load(b.bitcast(b.gep(src, [b.mul(lr.index, sstride)]), vty.as_pointer()), align=1)
            b.store(row, b.bitcast(b.gep(dst, [b.mul(lr.index, dstride)]), vty.as_pointer()), align=1)
    p = i8.as_pointer()
    return _emu_function(module, "ternet_emu_tile_copy", [p, i64, p, i64], body)


def _emu_tdpbusd(module):
    """(c, a, b) tiles in memory: C[m, n] += sum_k,j u8 A[m, 4k + j] * s8 B[k, 4n + j], int32
    wrapping; row m of C as one vector: 16 vpdpbusd of B's rows on A's broadcast dwords."""
    def body(b, args):
        c, a, w = args
        v16i32, v64i8 = ir.VectorType(i32, 16), ir.VectorType(i8, 64)
        with cgutils.for_range(b, const(ROWS)) as lm:
            cp = b.bitcast(b.gep(c, [b.mul(lm.index, const(64))]), v16i32.as_pointer())
            acc = cgutils.alloca_once_value(b, b.load(cp, align=1))
            with cgutils.for_range(b, const(16)) as lk:
                ap = b.bitcast(b.gep(a, [b.add(b.mul(lm.index, const(64)), b.mul(lk.index, const(4)))]),
                               i32.as_pointer())
                dword = splat(b, b.load(ap, align=1), 16)
                row = b.load(b.bitcast(b.gep(w, [b.mul(lk.index, const(64))]), v64i8.as_pointer()), align=1)
                b.store(dpbusd(b, b.load(acc), dword, row, native=False), acc)
            b.store(b.load(acc), cp, align=1)
    p = i8.as_pointer()
    return _emu_function(module, "ternet_emu_tdpbusd", [p, p, p], body)


class AmxEmitter(_Emitter):
    """A work chunk: rows [p0, p0 + 16 m) on AMX tiles, the remaining rows on VNNI (native) or
    the same with the tile instructions emulated and the tails on emu512 (native=False)."""

    def __init__(self, context, builder, layer, add, c, panel_bytes, native=True):
        super().__init__(context, builder, ISAS["avx512vnni" if native else "emu512"], layer, add, c,
                         panel_bytes)
        self.native = native
        buf = cgutils.alloca_once(self.b, ir.ArrayType(i32, 2 * NTILES * ROWS * 16))
        buf.align = 64
        self.cbuf = self.b.bitcast(buf, i8.as_pointer())
        if not native:              # the 8 tile registers, 1 KiB each
            tiles = cgutils.alloca_once(self.b, ir.ArrayType(i8, 8 * ROWS * 64))
            tiles.align = 64
            self.tiles = self.b.bitcast(tiles, i8.as_pointer())

    def _call(self, name, args, argtys):
        if not self.native:         # ldtilecfg / tilerelease: nothing to emulate
            return None
        return self.b.call(x86(self.b, name, ir.VoidType(), argtys), args)

    def _tile_mem(self, tmm):
        return self.b.gep(self.tiles, [const(tmm * ROWS * 64)])

    def _tileload(self, tmm, ptr, stride):
        if not self.native:
            self.b.call(_emu_copy_rows(self.b.module), [self._tile_mem(tmm), const(64), ptr, stride])
            return
        self._call("llvm.x86.tileloadd64", [const(tmm, i8), ptr, stride], [i8, i8.as_pointer(), i64])

    def _tilestore(self, tmm, ptr, stride):
        if not self.native:
            self.b.call(_emu_copy_rows(self.b.module), [ptr, stride, self._tile_mem(tmm), const(64)])
            return
        self._call("llvm.x86.tilestored64", [const(tmm, i8), ptr, stride], [i8, i8.as_pointer(), i64])

    def _tdpbusd(self, c, a, w):
        if not self.native:
            self.b.call(_emu_tdpbusd(self.b.module), [self._tile_mem(c), self._tile_mem(a), self._tile_mem(w)])
            return
        self._call("llvm.x86.tdpbusd", [const(c, i8), const(a, i8), const(w, i8)], [i8, i8, i8])

    def chunk(self):
        b = self.b
        p_amx = b.add(self.p0, b.mul(b.udiv(b.sub(self.p1, self.p0), const(ROWS)), const(ROWS)))
        cfg = b.bitcast(_config(b.module), i8.as_pointer())
        with b.if_then(b.icmp_unsigned(">", p_amx, self.p0)):
            self._call("llvm.x86.ldtilecfg", [cfg], [i8.as_pointer()])
            # pixel panels as in the VNNI chunk, a multiple of 16 rows
            panel = b.udiv(const(self.panel_bytes), b.add(self.xs, self.os))
            panel = b.mul(b.add(b.udiv(panel, const(ROWS)), const(1)), const(ROWS))
            step = const(16 * NTILES)
            o_main = b.add(self.o0, b.mul(b.udiv(b.sub(self.o1, self.o0), step), step))
            with cgutils.for_range_slice(b, self.p0, p_amx, panel) as (pp, _):
                pe = b.add(pp, panel)
                pe = b.select(b.icmp_unsigned("<", pe, p_amx), pe, p_amx)
                with cgutils.for_range_slice(b, self.o0, o_main, step) as (ob, _):
                    self._amx_rows(pp, pe, ob, NTILES)
                left = b.udiv(b.sub(self.o1, o_main), const(16))       # 0..3 blocks of 16
                for nt in range(1, NTILES):
                    with b.if_then(b.icmp_unsigned("==", left, const(nt))):
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
        prev = cgutils.alloca_once_value(b, const(-1))           # rows waiting for the epilogue
        with cgutils.for_range_slice(b, p0, p1, const(ROWS)) as (pt, _):
            half = b.and_(b.udiv(b.sub(pt, p0), const(ROWS)), const(1))
            self._amx_sums(pt, ob, nt, self._half(half))
            last = b.load(prev)
            with b.if_then(b.icmp_signed(">=", last, const(0))):
                self._amx_epilogue(last, ob, nt, self._half(b.xor(half, const(1))))
            b.store(pt, prev)
        last = b.load(prev)
        with b.if_then(b.icmp_signed(">=", last, const(0))):
            half = b.and_(b.udiv(b.sub(last, p0), const(ROWS)), const(1))
            self._amx_epilogue(last, ob, nt, self._half(half))

    def _half(self, k):
        return self.b.gep(self.cbuf, [self.b.mul(k, const(NTILES * ROWS * 64))])

    def _amx_sums(self, pt, ob, nt, buf):
        """Rows [pt, pt + 16) x channels [ob, ob + 16 nt): sums in tmm0..nt-1, stored to buf."""
        b = self.b
        for j in range(nt):
            self._tileload(j, self._ptr(self.bias, b.mul(b.add(ob, const(16 * j)), const(4)), i8),
                           const(0))
        wblk = b.mul(b.udiv(ob, const(16)), self.ws)
        xrow = b.mul(pt, self.xs)
        nkb = b.udiv(b.add(self.nkb, const(KBLOCK // 4 - 1)), const(KBLOCK // 4))
        with cgutils.for_range(b, nkb) as lk:
            kb = lk.index
            self._tileload(_A, self._ptr(self.x, b.add(xrow, b.mul(kb, const(KBLOCK))), i8), self.xs)
            for j in range(nt):
                wofs = b.add(b.add(wblk, b.mul(const(j), self.ws)), b.mul(kb, const(16 * 64)))
                self._tileload(_B[j % 2], self._ptr(self.w, wofs, i8), const(64))
                self._tdpbusd(j, _A, _B[j % 2])
        for j in range(nt):
            self._tilestore(j, b.gep(buf, [const(j * ROWS * 64)]), const(64))

    def _amx_epilogue(self, pt, ob, nt, buf):
        """Requantize (and add the residual to) the sums of rows [pt, pt + 16) from buf."""
        b = self.b
        chan = [b.add(ob, const(16 * j)) for j in range(nt)]
        mult = self._multipliers(chan)
        for i in range(ROWS):
            accs = [b.load(self._ptr(buf, const(j * ROWS * 64 + i * 64), self.vi), align=64)
                    for j in range(nt)]
            self._store_row(b.add(pt, const(i)), chan, accs, mult)


# Drivers: those of vnni.py (see there) on the AMX kernels; emuamx runs serially (its parallel
# drivers would only double a long compile)
DRIVERS = {"amx": make_drivers("amx", __name__), "emuamx": make_drivers("emuamx", __name__, parallel=False)}
pw_i8_u8_amx, pw_i8_u8_amx_par, pw_i8_u8_amx_add, pw_i8_u8_amx_add_par = DRIVERS["amx"]
pw_i8_u8_emuamx, _, pw_i8_u8_emuamx_add, _ = DRIVERS["emuamx"]
