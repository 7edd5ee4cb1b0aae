"""Pointwise 1x1 conv as a register-tiled u8 x s8 GEMM micro-kernel in LLVM IR, requant fused.

Buffers (docs/kernels.md): x u8[rows, Kp] (NHWC pixels), out u8[rows, Np], rows >= P + ROW_SLACK.
Prepared weights w i8[Np/16, Kp/4, 16, 4]: one 64-byte vector holds 16 output channels x 4 input
channels, so one K step broadcasts a pixel's activation dword (4 input channels) and multiplies
it into 16 output channels at once (the XNNPACK/MLAS "c4" scheme). Within a pixel panel, tiles
walk all pixels for one block of output channels, so the block's weight stripe stays in L1.
avx2i8 widens the weights once, at load, to w i16[Np/16, Kp/4, 2, 16, 2] (see pack_weights).

The tile loops, the K loop and the epilogue are LLVM IR emitted through `numba.extending.intrinsic`
and inlined into tiny drivers, made per ISA by `make_drivers` (serial, parallel, fused add): plain Numba never produces `vpdpbusd` nor keeps a 2-D
register tile (research/kernels.md 3.3). Accumulators live in entry-block allocas, which LLVM
promotes to registers. ISAs:

* avx512vnni: zmm, `vpdpbusd` (4 u8*s8 products summed into int32, not saturating); 6 px x 32 oc.
* avx2: ymm, `vpmaddubsw` -> `vpmaddwd(1)` -> add; 4 px x 16 oc. `vpmaddubsw` saturates an int16
  pair sum at 32767, which ternary weights cannot reach (|pair| <= 2 * 255), so: ternary only.
* avx2i8: ymm, full-range int8 weights (int8 layers, hybrid layers, the stem's GEMM). The dword
  of 4 activations is split into two int16 pairs (x0, x2) = dword & 0x00FF00FF and (x1, x3) =
  dword >> 8 per 16-bit lane, each `vpmaddwd`-ed against int16 weight pairs: |pair| <= 2*255*128,
  exact in int32, no saturation anywhere; 4 px x 16 oc. The "avx2" family runs ternary layers on
  avx2 and other layers on avx2i8 (`kernel_isa`, `FAMILY_ISAS`).
* emu512: portable IR with vpdpbusd's exact semantics and the avx512vnni tiling, so the tiling
  and epilogue are tested on CPUs without AVX-512. Slow; never chosen for inference.

A projection followed by a residual add can run with the add fused into the epilogue
(`make_pw_add`, the `*_add` drivers): requantize, floor, then quant.add_ref with the residual row.

Importing compiles nothing; drivers compile on first call (a CPU lacking the ISA raises
RuntimeError at that point, before any code is generated).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .. import quant
from . import cpu
from . import irgen as ig
from ._jit import num_threads
from .irgen import const, dpbusd, f32, i8, i16, i32, i64, splat, x86
from .layout import CH_ALIGN, ROW_SLACK, aligned, check_pw_buffers, pad_to
from .limits import POINTWISE_PAR_MIN_MACS as PAR_MIN_MACS
from .limits import check_clamp, check_finite, check_headroom, check_int8
from .variants import variant

PANEL_BYTES = 1 << 15      # input + output bytes of a pixel panel (see _Emitter.chunk)
_U8 = np.dtype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Isa:
    name: str
    impl: str             # its kernel family: a cpu.IMPLS name (or a test-only emulation)
    driver: str           # its drivers' name; _par, _add, _add_par for the other variants
    lanes: int            # int32 lanes per vector register
    npix: int             # pixels per main tile
    nblk: int             # 16-channel blocks per main tile
    heights: tuple        # tile heights for the pixel tail, ascending, last == npix
    kgroup: int = 0       # K steps summed in int16 before widening (0: products go to int32)
    wbytes: int = 1       # bytes per prepared weight (2: avx2i8's int16 pairs)
    ternary_only: bool = False    # its kernel is exact for weights in {-1, 0, 1} only


# Register budget: avx512 12 zmm accumulators + 2 weight + 1 broadcast of 32; avx2 8 ymm int16
# accumulators + 2 weight + broadcast + product = 12 of 16 in the inner loop; avx2i8 8 int32
# accumulators + 4 weight + 2 activation pairs + product + the 0x00FF mask = all 16. Measured on
# Zen 3 over the 14 MobileNetV2 shapes, avx2i8's 4 px x 16 oc beat 6x16, 5x16, 3x32 and 4x32 by
# 2-6% and 2x32 by 20%.
ISAS = {
    "avx512vnni": Isa("avx512vnni", "vnni", "pw_i8_u8_vnni", 16, 6, 2, (2, 4, 6)),
    "avx2": Isa("avx2", "avx2", "pw_t2_u8_avx2", 8, 4, 1, (2, 4), kgroup=64, ternary_only=True),
    "avx2i8": Isa("avx2i8", "avx2", "pw_i8_u8_avx2", 8, 4, 1, (2, 4), wbytes=2),
    "emu512": Isa("emu512", "emu512", "pw_i8_u8_emu512", 16, 6, 2, (2, 4, 6)),
    # AMX-INT8 (amx.py): 16-pixel x 64-channel tiles; its chunks' tail pixels run avx512vnni
    "amx": Isa("amx", "amx", "pw_i8_u8_amx", 16, 16, 4, (16,)),
    "emuamx": Isa("emuamx", "emuamx", "pw_i8_u8_emuamx", 16, 16, 4, (16,)),   # amx emulated (tests)
}
_VARIANT = {name: i for i, name in enumerate(ISAS)}     # the literal the drivers pass to _chunk
# kernel family (cpu.IMPLS) -> (ISA for ternary weights, ISA for int8 weights)
FAMILY_ISAS = {"vnni": ("avx512vnni", "avx512vnni"), "avx2": ("avx2", "avx2i8"), "amx": ("amx", "amx")}


def kernel_isa(name: str, w) -> str:
    """The ISA that runs weights w (int [Cout, Cin]) when `name` is asked for: a kernel family of
    FAMILY_ISAS (vnni, avx2, amx) by the weights' kind; an ISA whose kernel is ternary-only (avx2:
    `vpmaddubsw` would saturate int16 pair sums of int8 weights) its family's int8 ISA (avx2i8)
    for other weights; any other ISA itself."""
    ternary = w.size == 0 or (w.min() >= -1 and w.max() <= 1)
    if name in FAMILY_ISAS:
        return FAMILY_ISAS[name][0 if ternary else 1]
    if name in ISAS and ISAS[name].ternary_only and not ternary:
        return FAMILY_ISAS[ISAS[name].impl][1]
    return name


# ---------------------------------------------------------------------------------------------
# IR emission

class _Emitter:
    """Emits one work chunk, row c of chunks: pixels [p0, p1) x output channels [o0, o1) (multiples
    of 16)."""

    def __init__(self, context, builder, isa: Isa, layer, add, c, panel_bytes):
        """layer: the driver's arguments (a PwLayer `Record`), add: the fused residual add's (a PwAdd
        `Record`) or None, c: the chunk's row."""
        self.b, self.isa, self.ctx, self.panel_bytes = builder, isa, context, panel_bytes
        t = layer.types
        self.x, self.xs = ig.array(context, builder, t.x, layer.x)
        self.w, self.ws = ig.array(context, builder, t.w, layer.w)      # ws: bytes between 16-channel blocks
        self.bias, _ = ig.array(context, builder, t.bias, layer.bias)
        self.mult, _ = ig.array(context, builder, t.mult, layer.mult)
        self.out, self.os = ig.array(context, builder, t.out, layer.out)
        self.acc_out = t.out.dtype == types.int32       # int32 accumulators (tests) instead of u8
        ch, ch_stride = ig.array(context, builder, t.chunks, layer.chunks)  # row c = (p0, p1, o0, o1)
        row = builder.gep(ch, [builder.mul(c, ch_stride)])
        self.p0, self.p1, self.o0, self.o1 = (builder.load(self._ptr(row, const(8 * k), i64))
                                              for k in range(4))
        self.nkb = layer.nkb
        n = isa.lanes
        self.vi, self.vf = ig.vec(i32, n), ig.vec(f32, n)
        self.vnarrow = ig.vec(i16, 2 * n)       # avx2's int16 partial sums
        self.zph, self.zpc, self.lo, self.hi = (splat(builder, v, n) for v in (
            layer.zph, layer.zpc, layer.lo, layer.hi))
        # fused residual add (quant.add_ref) after the requantization, see _add_residual
        self.fused = add is not None
        if self.fused:
            self.res, self.rstride = ig.array(context, builder, add.types.res, add.res)
            self.zr = splat(builder, add.zr, n)
            self.mr, self.zq, self.mq, self.zph2, self.lo2, self.hi2 = (
                splat(builder, v, n) for v in (add.mr, add.zq, add.mq, add.zph, add.lo, add.hi))

    def _ptr(self, base, off, ty):
        return ig.ptr(self.b, base, off, ty)

    def chunk(self):
        # Pixel panels sized so a panel's input and output rows stay in L1/L2 across the passes
        # over output-channel blocks (each pass writes only a 16-32 byte strip of every out row;
        # without panels a 112x112 layer re-fetches its 1.2 MB output once per block). No
        # measurable effect on Zen 3's 512 KiB L2 at these shapes; it bounds the worst case.
        b, npix, step = self.b, self.isa.npix, 16 * self.isa.nblk
        panel = b.udiv(const(self.panel_bytes), b.add(self.xs, self.os))
        panel = b.mul(b.udiv(b.add(panel, const(npix)), const(npix)), const(npix))  # >= npix
        o_main = b.add(self.o0, b.mul(b.udiv(b.sub(self.o1, self.o0), const(step)), const(step)))
        with cgutils.for_range_slice(b, self.p0, self.p1, panel) as (pp, _):
            pe = b.add(pp, panel)
            pe = b.select(b.icmp_unsigned("<", pe, self.p1), pe, self.p1)
            with cgutils.for_range_slice(b, self.o0, o_main, const(step)) as (ob, _):
                self._rows(ob, self.isa.nblk, pp, pe)
            with cgutils.for_range_slice(b, o_main, self.o1, const(16)) as (ob, _):  # < nblk left
                self._rows(ob, 1, pp, pe)

    def _rows(self, ob, nb, p0, p1):
        b, npix = self.b, self.isa.npix
        p_main = b.add(p0, b.mul(b.udiv(b.sub(p1, p0), const(npix)), const(npix)))
        with cgutils.for_range_slice(b, p0, p_main, const(npix)) as (pt, _):
            self._tile(pt, ob, npix, nb)
        # Tail of r < npix pixels: the smallest tile >= r; it computes at most one row past P,
        # which the ROW_SLACK contract allows (reads and garbage writes in [P, P + 8)).
        r = b.sub(p1, p_main)

        def tail(hs):
            if len(hs) == 1:
                return self._tile(p_main, ob, hs[0], nb)
            with b.if_else(b.icmp_unsigned("<=", r, const(hs[0]))) as (small, big):
                with small:
                    self._tile(p_main, ob, hs[0], nb)
                with big:
                    tail(hs[1:])

        with b.if_then(b.icmp_unsigned(">", r, const(0))):
            tail(self.isa.heights)

    def _tile(self, pt, ob, h, nb):
        """h pixels x nb*16 output channels: K loop into int32 registers, then the epilogue."""
        b, n = self.b, self.isa.lanes
        nvec = nb * 16 // n
        chan = [b.add(ob, const(j * n)) for j in range(nvec)]            # first channel of vector j
        wblk = b.mul(b.udiv(ob, const(16)), self.ws)
        wofs = [b.add(wblk, b.add(b.mul(const(j * n // 16), self.ws), const(j % (16 // n) * 4 * n)))
                for j in range(nvec)]
        i8 = self.isa.name == "avx2i8"
        kbytes = 64 * self.isa.wbytes                 # weight bytes of one K step of a 16-oc block
        xrow = b.mul(pt, self.xs)
        bias = [b.load(self._ptr(self.bias, b.mul(c, const(4)), self.vi), align=1) for c in chan]

        def k_steps(start, stop, acc):      # acc[i][j] += products of K steps [start, stop)
            with cgutils.for_range_slice(b, start, stop, const(1)) as (kb, _):
                kb4 = b.mul(kb, const(4))
                wk = b.mul(kb, const(kbytes))
                wv = [b.load(self._ptr(self.w, b.add(wo, wk), self.vi), align=1) for wo in wofs]
                if i8:     # second vector of each j: the (x1, x3) weight pairs, 64 bytes on
                    wv = [(v, b.load(self._ptr(self.w, b.add(b.add(wo, wk), const(64)), self.vi),
                                     align=1)) for v, wo in zip(wv, wofs)]
                xk = b.add(xrow, kb4)
                for i in range(h):
                    dword = b.load(self._ptr(self.x, b.add(xk, b.mul(const(i), self.xs)), i32), align=1)
                    av = splat(b, dword, n)
                    if i8:
                        av = self._pairs(av)
                    for j in range(nvec):
                        b.store(self._mac(b.load(acc[i][j]), av, wv[j]), acc[i][j])

        # Headroom: |sum w*x| <= 255 * sum|w|, checked to fit int32 by the factory; vpdpbusd and the
        # int32 adds wrap, never saturate. avx2 (ternary): a vpmaddubsw lane is a pair sum of
        # magnitude <= 2*255 = 510, so 64 K steps fit int16 (64*510 = 32640 <= 32767); widening
        # with vpmaddwd(1) once per 64 steps instead of every step halves the inner-loop work.
        # The first group is peeled and starts the int32 accumulators at bias + its widened sums:
        # in a loop over all groups the int32 accumulators would be live (loop-carried) during
        # every K loop, 8 int32 + 8 int16 accumulators > 16 ymm, and LLVM spilled them to the
        # stack around every widening; now the K loop of a layer with <= 256 input channels (one
        # group: all expand layers) holds only the int16 ones.
        if self.isa.kgroup:
            g = const(self.isa.kgroup)
            accs = [[cgutils.alloca_once(b, self.vi) for _ in range(nvec)] for _ in range(h)]

            def group(k0, first):
                k1 = b.add(k0, g)
                k1 = b.select(b.icmp_unsigned("<", k1, self.nkb), k1, self.nkb)
                narrow = self._accumulators(self.vnarrow, h, [ir.Constant(self.vnarrow, None)] * nvec)
                k_steps(k0, k1, narrow)
                for i in range(h):
                    for j in range(nvec):
                        base = bias[j] if first else b.load(accs[i][j])
                        b.store(self._widen(base, b.load(narrow[i][j])), accs[i][j])

            group(const(0), True)
            with cgutils.for_range_slice(b, g, self.nkb, g) as (k0, _):
                group(k0, False)
        else:
            # The int32 accumulators start at the bias (saves an add per output vector).
            accs = self._accumulators(self.vi, h, bias)
            k_steps(const(0), self.nkb, accs)
        # Epilogue, per quant.requant_ref: float32(acc) * m, then + zph and + zpc as separate adds
        # (quant.round_constants; no contraction flags: an FMA would round once and differ),
        # clamp to [lo, hi], floor.
        # After the clamp 0 <= lo <= v <= hi <= 255, so floor + narrowing is exactly fptoui to i8,
        # which LLVM lowers to cvttps2dq + pack (vpmovdb) with no rounding or masking steps.
        mult = self._multipliers(chan)
        for i in range(h):
            self._store_row(b.add(pt, const(i)), chan, [b.load(a) for a in accs[i]], mult)

    def _multipliers(self, chan):
        return [self.b.load(self._ptr(self.mult, self.b.mul(c, const(4)), self.vf), align=1)
                for c in chan]

    def _store_row(self, row, chan, accs, mult):
        """Output row `row`, channels chan[j] .. chan[j] + lanes: the int32 accumulators accs[j]
        requantized (and added to the residual when fused), or stored raw (int32 output)."""
        b, n = self.b, self.isa.lanes
        orow = b.mul(row, self.os)
        if self.acc_out:
            for acc, c in zip(accs, chan):
                b.store(acc, self._ptr(self.out, b.add(orow, b.mul(c, const(4))), self.vi), align=1)
            return
        vals = [self._clamp(b.fadd(b.fadd(b.fmul(b.sitofp(acc, self.vf), m), self.zph), self.zpc))
                for acc, m in zip(accs, mult)]
        if self.fused:
            vals = [self._add_residual(v, row, c) for v, c in zip(vals, chan)]
        qs = [b.fptoui(v, ir.VectorType(i8, n)) for v in vals]
        sub = 16 // n
        for j in range(0, len(qs), sub):       # one 16-byte store per 16 channels
            q = qs[j] if sub == 1 else b.shuffle_vector(
                qs[j], qs[j + 1], ir.Constant(ir.VectorType(i32, 16), list(range(16))))
            b.store(q, self._ptr(self.out, b.add(orow, chan[j]), q.type), align=1)

    def _clamp(self, v, lo=None, hi=None):
        """min(max(v, lo), hi) for finite v, as vmaxps/vminps. Plain selects would do, but for
        avx2 LLVM merges them across the 16-channel concatenation into compare+blend pairs."""
        b = self.b
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        if self.isa.name in ("avx2", "avx2i8"):
            vmax = x86(b, "llvm.x86.avx.max.ps.256", self.vf, [self.vf, self.vf])
            vmin = x86(b, "llvm.x86.avx.min.ps.256", self.vf, [self.vf, self.vf])
            return b.call(vmin, [b.call(vmax, [v, lo]), hi])
        v = b.select(b.fcmp_ordered("<", v, lo), lo, v)
        return b.select(b.fcmp_ordered(">", v, hi), hi, v)

    def _add_residual(self, v, row, chan):
        """The requantized conv output v (float, clamped to [lo, hi] >= 0, so floor = truncation)
        added to the residual row's uint8 values exactly as quant.add_ref does: each side
        float32(int - zero point) * multiplier, summed, + zp_bias, clamped, floored later."""
        b, n = self.b, self.isa.lanes
        q = b.sitofp(b.fptosi(v, self.vi), self.vf)                 # exact: 0 <= q <= 255
        fq = b.fmul(b.fsub(q, self.zq), self.mq)                    # q - zq exact in float32
        ofs = b.add(b.mul(row, self.rstride), chan)
        r = b.load(self._ptr(self.res, ofs, ir.VectorType(i8, n)), align=1)
        fr = b.fmul(b.sitofp(b.sub(b.zext(r, self.vi), self.zr), self.vf), self.mr)
        return self._clamp(b.fadd(b.fadd(fr, fq), self.zph2), self.lo2, self.hi2)

    def _accumulators(self, vty, h, init):
        """h x len(init) accumulators set to init[j]: entry-block allocas, so LLVM keeps them in
        registers."""
        accs = [[cgutils.alloca_once(self.b, vty) for _ in init] for _ in range(h)]
        for row in accs:
            for a, v in zip(row, init):
                self.b.store(v, a)
        return accs

    def _pairs(self, av):
        """Splat activation dwords (x0, x1, x2, x3) -> int16 pairs ((x0, x2), (x1, x3)) per int32
        lane, zero-extended: a vpand and a vpsrlw, cheaper than shuffling bytes into place."""
        b, v16 = self.b, ir.VectorType(i16, 2 * self.isa.lanes)
        a = b.bitcast(av, v16)
        return (b.and_(a, ir.Constant(v16, [0xFF] * v16.count)),
                b.lshr(a, ir.Constant(v16, [8] * v16.count)))

    def _mac(self, acc, a, w):
        """acc + the products u8(a) * s8(w) summed per lane: 4 per int32 lane (vnni, emu512),
        2 per int16 lane (avx2; widened now into int32 acc, or later by _widen into int16 acc);
        avx2i8: a and w are (even, odd) pairs of int16 vectors, 4 products per int32 lane."""
        b, name = self.b, self.isa.name
        if name == "avx2i8":
            # |x0*w0 + x2*w2| <= 2*255*128 = 65280 per vpmaddwd lane: exact in int32 (vpmaddwd
            # saturates only for two (-32768)*(-32768) products); the adds wrap like vpdpbusd's.
            madd_wd = x86(b, "llvm.x86.avx2.pmadd.wd", self.vi, [self.vnarrow, self.vnarrow])
            p0, p1 = (b.call(madd_wd, [x, b.bitcast(wv, self.vnarrow)]) for x, wv in zip(a, w))
            return b.add(acc, b.add(p0, p1))
        if name in ("avx512vnni", "emu512"):
            return dpbusd(b, acc, a, w, native=name == "avx512vnni")
        if name == "avx2":
            v32i8 = ir.VectorType(i8, 32)
            madd_ub = x86(b, "llvm.x86.avx2.pmadd.ub.sw", self.vnarrow, [v32i8, v32i8])  # u8 first
            pairs = b.call(madd_ub, [b.bitcast(a, v32i8), b.bitcast(w, v32i8)])
            return self._widen(acc, pairs) if acc.type == self.vi else b.add(acc, pairs)
        raise ValueError(f"no multiply-accumulate for isa {name!r}")

    def _widen(self, acc, narrow):
        """acc (int32) + adjacent int16 lane pairs of `narrow` (vpmaddwd with ones)."""
        madd_wd = x86(self.b, "llvm.x86.avx2.pmadd.wd", self.vi, [self.vnarrow, self.vnarrow])
        return self.b.add(acc, self.b.call(madd_wd, [narrow, ir.Constant(self.vnarrow, [1] * 16)]))




# ---------------------------------------------------------------------------------------------
# The chunk intrinsics and the drivers
#
# Driver arguments: x u8[rows, Kp], w i8[Np/16, Kp/4, 16, 4] (avx2i8: i16[Np/16, Kp/4, 2, 16, 2];
# amx: Kp rounded up to 64), bias i32[Np], mult f32[Np], zph/zpc/lo/hi f32, out u8[rows, Np] (or i32:
# bias-added accumulators, a testing aid), nkb = K steps of 4 channels, chunks i64[n, 4] =
# (p0, p1, o0, o1) work items, each output written by exactly one of them. The *_add drivers add
# res u8[rows, Np], zr i32, mr, zq, mq, zph2, lo2, hi2 f32: out = add_ref(res, zr, mr,
# requant(acc), zq, mq, zph2, lo2, hi2).

class PwLayer(NamedTuple):
    """The drivers' arguments, as one record for the chunk intrinsics."""
    x: object
    w: object
    bias: object
    mult: object
    zph: object
    zpc: object
    lo: object
    hi: object
    out: object
    nkb: object
    chunks: object


class PwAdd(NamedTuple):
    """The fused residual add's arguments (see make_pw_add)."""
    res: object
    zr: object
    mr: object
    zq: object
    mq: object
    zph: object
    lo: object
    hi: object


def _chunk_typer(variant_ty, args):
    """Signature of a chunk intrinsic call. Typing runs before any code generation: refuse an ISA
    numba's target lacks, so a CPU without it gets an exception instead of an LLVM abort or an
    illegal instruction."""
    if not isinstance(variant_ty, types.IntegerLiteral):
        raise TypingError("_chunk: the variant must be a literal ISA number")
    name = list(ISAS)[variant_ty.literal_value]
    if name in cpu.ISA_FEATURES and not cpu.can_compile(name):
        raise RuntimeError(f"ternet: this CPU (or numba's target) lacks {name}")
    sig = types.void(*args, variant_ty)

    def codegen(context, builder, sig, args):
        layer = ig.Record(context, builder, sig.args[0], args[0])
        add = ig.Record(context, builder, sig.args[1], args[1]) if len(args) == 4 else None
        c = args[-2]
        if name in ("amx", "emuamx"):
            from .amx import AmxEmitter     # noqa: PLC0415 (imports this module)
            AmxEmitter(context, builder, layer, add, c, PANEL_BYTES, native=name == "amx").chunk()
        else:
            _Emitter(context, builder, ISAS[name], layer, add, c, PANEL_BYTES).chunk()
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _chunk(typingctx, layer, c, variant_ty):
    """Work chunk c of the layer (a PwLayer) on the kernel of ISA number variant (literal)."""
    return _chunk_typer(variant_ty, (layer, c))


@intrinsic
def _chunk_add(typingctx, layer, add, c, variant_ty):
    """_chunk with the residual add (a PwAdd) fused into the epilogue."""
    return _chunk_typer(variant_ty, (layer, add, c))


class Drivers(NamedTuple):
    """One ISA's drivers. `serial` also writes int32 accumulators when given an int32 out (numba
    compiles that specialisation separately)."""
    serial: object
    par: object
    add: object
    add_par: object


def make_drivers(isa: str, module: str = __name__, parallel: bool = True) -> Drivers:
    """The drivers of isa (named after ISAS[isa].driver, in `module`): each runs the chunks of its
    work array, serially or over numba's threads (parallel=False: the parallel ones are the
    serial ones, for ISAs too slow to compile twice)."""
    v = _VARIANT[isa]
    base = ISAS[isa].driver

    def make(par):
        def run(x, w, bias, mult, zph, zpc, lo, hi, out, nkb, chunks):
            for c in prange(chunks.shape[0]):
                _chunk(PwLayer(x, w, bias, mult, zph, zpc, lo, hi, out, nkb, chunks), c, v)

        def run_add(x, w, bias, mult, zph, zpc, lo, hi, out, nkb, chunks, res, zr, mr, zq, mq, zph2,
                    lo2, hi2):
            for c in prange(chunks.shape[0]):
                _chunk_add(PwLayer(x, w, bias, mult, zph, zpc, lo, hi, out, nkb, chunks),
                           PwAdd(res, zr, mr, zq, mq, zph2, lo2, hi2), c, v)

        sfx = "_par" if par else ""
        return (variant(run, base + sfx, module, parallel=par),
                variant(run_add, base + "_add" + sfx, module, parallel=par))

    serial, add = make(False)
    par, add_par = make(True) if parallel else (serial, add)
    return Drivers(serial, par, add, add_par)


DRIVERS = {isa: make_drivers(isa) for isa in ("avx512vnni", "avx2", "avx2i8", "emu512")}
# the drivers by name (tests, cross-compilation checks)
pw_i8_u8_vnni, pw_i8_u8_vnni_par, pw_i8_u8_vnni_add, pw_i8_u8_vnni_add_par = DRIVERS["avx512vnni"]
pw_t2_u8_avx2, pw_t2_u8_avx2_par, pw_t2_u8_avx2_add, pw_t2_u8_avx2_add_par = DRIVERS["avx2"]
pw_i8_u8_avx2, pw_i8_u8_avx2_par, pw_i8_u8_avx2_add, pw_i8_u8_avx2_add_par = DRIVERS["avx2i8"]
pw_i8_u8_emu512, pw_i8_u8_emu512_par, pw_i8_u8_emu512_add, pw_i8_u8_emu512_add_par = DRIVERS["emu512"]


def drivers(isa: str) -> Drivers:
    """The drivers of isa; AMX's are in amx.py, imported on first use."""
    if isa in ("amx", "emuamx"):
        from . import amx     # noqa: PLC0415
        return amx.DRIVERS[isa]
    return DRIVERS[isa]


def _drivers(isa: str) -> tuple:
    """(serial u8, parallel u8, serial int32) drivers of isa: the int32 one is the serial one."""
    d = drivers(isa)
    return d.serial, d.par, d.serial


# ---------------------------------------------------------------------------------------------
# Load-time preparation and the plan

def split_work(P: int, cout_p: int, cin_p: int, isa: Isa, threads: int) -> np.ndarray:
    """Work chunks i64[n, 4] = (p0, p1, o0, o1) for `threads` threads, split along pixels or output
    channels (whichever balances better). Interior pixel edges are multiples of the tile height so
    only the last chunk has a tail tile (whose garbage row, if any, is row P)."""
    whole = np.array([[0, P, 0, cout_p]], np.int64)
    if threads <= 1 or P * cin_p * cout_p < PAR_MIN_MACS:
        return whole
    ostep = 16 * isa.nblk
    tiles, oblks = -(-P // isa.npix), -(-cout_p // ostep)
    per_t, per_o = -(-tiles // min(threads, tiles)), -(-oblks // min(threads, oblks))
    if per_t * oblks <= tiles * per_o:
        edges = range(0, P, per_t * isa.npix)
        rows = [(a, min(P, a + per_t * isa.npix), 0, cout_p) for a in edges]
    else:
        edges = range(0, cout_p, per_o * ostep)
        rows = [(0, P, a, min(cout_p, a + per_o * ostep)) for a in edges]
    return np.array(rows, np.int64)


def pack_weights(w: np.ndarray, cin_p: int, cout_p: int, wide: bool = False) -> np.ndarray:
    """Canonical i8[Cout, Cin] -> zero-padded i8[Np/16, Kp/4, 16, 4] (16 oc x 4 ic per 64 bytes),
    or for avx2i8 (wide) i16[Np/16, Kp/4, 2, 16, 2]: [blk, k, e, o, h] = w[16 blk + o, 4k + e + 2h],
    i.e. per K step 16 (w0, w2) pairs then 16 (w1, w3) pairs, matching _Emitter._pairs."""
    wp = np.zeros((cout_p, cin_p), np.int8)
    wp[:w.shape[0], :w.shape[1]] = w
    if wide:
        return aligned(wp.astype(np.int16).reshape(cout_p // 16, 16, cin_p // 4, 2, 2)
                        .transpose(0, 2, 4, 1, 3))
    return aligned(wp.reshape(cout_p // 16, 16, cin_p // 4, 4).transpose(0, 2, 1, 3))


@dataclasses.dataclass(frozen=True, eq=False)
class PwVnniPlan:
    """A prepared pointwise layer; `plan(x, P, out)` runs it (see make_pw_vnni)."""
    cin: int
    cout: int
    cin_p: int
    cout_p: int
    impl: str
    isa: str = dataclasses.field(repr=False)
    w: np.ndarray = dataclasses.field(repr=False)
    bias: np.ndarray = dataclasses.field(repr=False)     # zero point folded, padded
    mult: np.ndarray = dataclasses.field(repr=False)     # padded with 0
    zph: np.float32 = dataclasses.field(repr=False)      # quant.round_constants
    zpc: np.float32 = dataclasses.field(repr=False)
    lo: np.float32 = dataclasses.field(repr=False)
    hi: np.float32 = dataclasses.field(repr=False)
    nkb: int = dataclasses.field(repr=False)             # K steps: ceil(cin / 4), padding skipped
    by_size: bool = dataclasses.field(default=True, repr=False)   # amx: VNNI where AMX does not pay
    _chunks: dict = dataclasses.field(default_factory=dict, repr=False)

    def _check(self, x, P, out, out_dtype):
        check_pw_buffers(x, P, out, self.cin_p, self.cout_p, out_dtype)

    def _work(self, P):
        """(isa, driver, chunks) for P pixels: an AMX plan runs the layer on VNNI where
        cpu.pointwise_isa says AMX does not pay at this size. Small layers never ask for the
        thread count (1 us)."""
        threads = 1 if P * self.cin_p * self.cout_p < PAR_MIN_MACS else num_threads()
        key = (P, threads)
        work = self._chunks.get(key)
        if work is None:
            isa = self.isa
            if isa == "amx" and self.by_size:
                isa = cpu.pointwise_isa(self.cin, self.cout, P)
            chunks = split_work(P, self.cout_p, self.cin_p, ISAS[isa], threads)
            d = drivers(isa)
            work = self._chunks[key] = isa, (d.par if len(chunks) > 1 else d.serial), chunks
        return work

    def __call__(self, x, P, out):
        """x u8[rows, cin_p], out u8[rows, cout_p], rows >= P + ROW_SLACK: requantized rows [0, P)."""
        check_pw_buffers(x, P, out, self.cin_p, self.cout_p, _U8)
        if P:
            _, driver, chunks = self._work(P)
            driver(x, self.w, self.bias, self.mult, self.zph, self.zpc, self.lo, self.hi, out,
                   self.nkb, chunks)

    def accumulate(self, x, P, acc):
        """Testing aid: int32 accumulators (bias included) of rows [0, P) into acc i32[rows, cout_p]."""
        self._check(x, P, acc, np.dtype(np.int32))
        if P:
            whole = self._chunks.get(("whole", P))
            if whole is None:       # kept: a recorded replay keeps its memory like any argument
                whole = self._chunks["whole", P] = np.array([[0, P, 0, self.cout_p]], np.int64)
            drivers(self.isa).serial(x, self.w, self.bias, self.mult, self.zph, self.zpc, self.lo,
                                     self.hi, acc, self.nkb, whole)


def make_pw_vnni(w, bias, zx, mult, zp_out, lo, hi, isa: str = "avx512vnni",
                 by_size: bool = True, rule: str = "ternet") -> PwVnniPlan:
    """Prepare a pointwise layer for the VNNI/AVX2/AMX micro-kernels from canonical tensors:
    w int8 [Cout, Cin] (ternary = -1/0/1), raw bias int32 [Cout], input zero point zx,
    mult float32 [Cout], output zero point and clamp bounds, requantization rule (see quant.py). isa: a key of ISAS or
    a family of FAMILY_ISAS, resolved for the weights by kernel_isa (avx2: the ternary vpmaddubsw
    kernel when every weight is in {-1, 0, 1}, else avx2i8; hybrid layers run all rows int8; the
    plan's `isa` says which). isa="amx": AMX-INT8 where
    cpu.pointwise_isa chooses it for the call's pixel count, else VNNI (by_size=False: always
    AMX, for tests and benchmarks)."""
    if isa not in ISAS and isa not in FAMILY_ISAS:
        raise ValueError(f"unknown isa {isa!r}; expected one of {tuple(ISAS)}")
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind not in "iu":
        raise ValueError(f"w must be a 2-D integer array [Cout, Cin], got {w.dtype} {w.shape}")
    check_int8(w)
    isa = kernel_isa(isa, w)
    check_finite(mult)
    check_clamp(lo, hi)
    if isa in cpu.ISA_FEATURES and not cpu.can_run(isa):
        raise RuntimeError(f"this CPU (or numba's target) lacks {isa}; see cpu.pointwise_kernel")
    if isa == "amx" and not cpu.amx_permission():
        raise RuntimeError("Linux refused this process the AMX tile state (arch_prctl); use vnni")
    cout, cin = w.shape
    w = w.astype(np.int8)
    bias_f = quant.fold_input_zero_point(np.asarray(bias, np.int32), w, zx)
    check_headroom(w, bias_f, "pointwise")
    cin_p, cout_p = pad_to(cin, CH_ALIGN), pad_to(cout, CH_ALIGN)
    biasp = np.zeros(cout_p, np.int32)
    biasp[:cout] = bias_f
    multp = np.zeros(cout_p, np.float32)
    multp[:cout] = np.asarray(mult, np.float32).reshape(-1)
    # AMX reads whole 64-channel blocks of weights (VNNI reads only the first cin_p of them)
    wp = pack_weights(w, pad_to(cin, 64) if isa in ("amx", "emuamx") else cin_p, cout_p,
                      wide=ISAS[isa].wbytes == 2)
    return PwVnniPlan(cin, cout, cin_p, cout_p, ISAS[isa].impl, isa, wp,
                      biasp, multp, *quant.round_constants(zp_out, rule), np.float32(lo),
                      np.float32(hi), -(-cin // 4), by_size)


@dataclasses.dataclass(frozen=True, eq=False)
class PwAddPlan:
    """A pointwise layer with the residual add after it fused into its epilogue:
    `plan(x, P, out, res)` writes rows [0, P) of out = quant.add_ref(res, zr, mr, q, zq, mq, zp_out,
    lo, hi) where q = the pointwise layer's requantized output (see make_pw_add). Saves the add's
    pass over memory and the intermediate buffer."""
    pw: PwVnniPlan
    zr: np.int32
    mr: np.float32
    zq: np.float32
    mq: np.float32
    zph: np.float32
    lo: np.float32
    hi: np.float32

    def __call__(self, x, P, out, res):
        """x u8[rows, cin_p]; out, res u8[rows, cout_p]; rows >= P + ROW_SLACK."""
        pw = self.pw
        check_pw_buffers(x, P, out, pw.cin_p, pw.cout_p, _U8)
        if res.shape[0] < P + ROW_SLACK or res.shape[1] != pw.cout_p or res.dtype != _U8 \
                or not res.flags.c_contiguous:
            raise ValueError(f"residual must be C-contiguous u8[>= {P + ROW_SLACK}, {pw.cout_p}], "
                             f"got {res.dtype} {res.shape}")
        if P:
            isa, _, chunks = pw._work(P)
            d = drivers(isa)
            (d.add_par if len(chunks) > 1 else d.add)(
                x, pw.w, pw.bias, pw.mult, pw.zph, pw.zpc, pw.lo, pw.hi, out, pw.nkb, chunks,
                res, self.zr, self.mr, self.zq, self.mq, self.zph, self.lo, self.hi)


def make_pw_add(pw: PwVnniPlan, zr, mr, zq, mq, zp_out, lo, hi) -> PwAddPlan:
    """Fuse `out = quant.add_ref(res, zr, mr, pw(x), zq, mq, zp_out, lo, hi)` (the residual as
    either operand: the float sum is commutative) into the pointwise plan pw."""
    check_clamp(lo, hi)
    return PwAddPlan(pw, np.int32(zr), np.float32(mr), np.float32(zq), np.float32(mq),
                     quant.zp_bias(zp_out), np.float32(lo), np.float32(hi))
