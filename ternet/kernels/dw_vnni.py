"""Depthwise micro-kernel for AVX-512 VNNI: 64 channels per step, `vpdpbusd` on interleaved tap pairs.

`vpdpbusd` sums, per int32 lane, the 4 products of u8 activation bytes and s8 weight bytes. In
NHWC the 4 bytes of a lane are 4 neighbouring channels of one tap, which a depthwise conv must not
mix. So the taps go in pairs (a, b): `vpunpcklbw` / `vpunpckhbw` of the two taps' 64 input bytes
give dwords (a[c], b[c], a[c+1], b[c+1]), and the weights are prepared as dwords
(wa[c], wb[c], 0, 0) for one accumulator and (0, 0, wa[c+1], wb[c+1]) for another: 2 useful
products per lane, 4 accumulators per 64 channels, 2 shuffles and 4 `vpdpbusd` per tap pair and
pixel (the 256-bit pair kernel needs 4 shuffles per 32 products; one tap per `vpdpbusd` with
byte-masked weights needs no shuffle but twice the `vpdpbusd`, measured slower). The 4 weight
vectors of a pair are shared by a tile of TILE_PX output pixels. Products are exact
(|u8 * s8| <= 32640) and the int32 sums wrap, never saturate: only the final value matters, which
the factory bounds like the pair kernel's. An odd tap count ends with a pair whose second tap
repeats the first with zero weights.

Epilogue, per accumulator: quant.requant_ref's float32 product and the two separate adds of
`quant.round_constants`, then min(v, hi)
and truncation to int32; the saturating packs `vpackusdw` + `vpackuswb` make negative values 0
(so truncation equals floor where it matters) and `vpmaxub` applies lo: max(lo, sat(trunc(min(v,
hi)))) == clamp(floor(v), lo, hi) for integer 0 <= lo <= hi <= 255 and finite v. The unpacks and
packs stay within 128-bit lanes, so one `vpshufb` puts the 64 bytes back in channel order. A
channel count that is not a multiple of 64 ends with a masked step (masked loads and stores:
nothing outside the n channels is read or written).

Prepared tensors (`prepare`), per 64-channel block: accumulator r = 2h + e (h: unpack low/high,
e: first/second channel of the dword) lane i = 4l + m holds channel 16l + 8h + 2m + e (`LANE_CH`).
w i8[npairs, 4*Lp]: per pair and block, 4 vectors r of 64 bytes, byte 4i + 2e + t = weight of tap t
of the pair for channel LANE_CH[r, i] (bytes of the other e are 0); bias i32[Lp] and mult f32[Lp]:
position 16r + i holds channel LANE_CH[r, i]. Lp = L rounded up to 64, the padding all zeros.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from . import irgen as ig
from .irgen import const, dpbusd, f32, i8, i16, i32, i64, internal_function, lanes, splat

STEP = 64       # channels per vector step: one zmm of u8 activations
TILE_PX = 4     # output pixels per register tile: 16 accumulators, loads shared by neighbours

# accumulator r = 2h + e, lane i = 4l + m -> channel within the 64-channel block
LANE_CH = np.array([[16 * (i // 4) + 8 * (r // 2) + 2 * (i % 4) + r % 2 for i in range(16)]
                    for r in range(4)])
# after vpackusdw(acc0, acc1), vpackusdw(acc2, acc3), vpackuswb: byte j of 128-bit lane l holds
# channel 16l + PACKED[j]; _UNPACK (vpshufb) puts it back in channel order
PACKED = (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
_UNPACK = [16 * l + PACKED.index(c) for l in range(4) for c in range(16)]

_v16i32, _v16f32, _v64i8 = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(i8, 64)
_v32i16, _v64i32, _v64i1 = ir.VectorType(i16, 32), ir.VectorType(i32, 64), ir.VectorType(ir.IntType(1), 64)


# ---------------------------------------------------------------------------------------------
# Load-time layout

def to_lanes(a) -> np.ndarray:
    """Last axis (a multiple of 64 long) into accumulator order: position 16r + i of each
    64-channel block <- channel LANE_CH[r, i]."""
    a = np.asarray(a)
    g = a.reshape(a.shape[:-1] + (a.shape[-1] // STEP, STEP))
    return np.ascontiguousarray(g[..., LANE_CH.reshape(-1)].reshape(a.shape))


def pairs_per_row(k: int) -> int:
    return (k + 1) // 2


def pair_columns(k: int) -> list:
    """Columns (a, b) of the tap pairs of one kernel row: (0, 1), (2, 3), ..., and last
    (k - 2, k - 1) whose tap a has weight 0 (for k = 1: (0, 0), tap a weight 0). Pairs stay in a
    row so that neighbouring output pixels (stride 1) share whole unpacked pairs."""
    return [(2 * i, 2 * i + 1) for i in range((k - 1) // 2)] + [(max(k - 2, 0), k - 1)]


def pair_weights(w) -> np.ndarray:
    """w [k, k, Lp] (Lp a multiple of 64) -> i8[k * pairs_per_row(k), 4*Lp]: row ky's pairs in
    pair_columns order (see the module docstring)."""
    k, _, Lp = w.shape
    cols = pair_columns(k)
    taps = np.zeros((k, len(cols), 2, Lp), np.int8)                    # [row, pair, t, channel]
    for i, (ca, cb) in enumerate(cols):
        if i < len(cols) - 1:
            taps[:, i, 0] = w[:, ca]
        taps[:, i, 1] = w[:, cb]
    lanes = to_lanes(taps).reshape(-1, 2, Lp // STEP, 4, 16)         # [pair, t, block, r, i]
    out = np.zeros((lanes.shape[0], Lp // STEP, 4, 16, 2, 2), np.int8)  # [.., r, i, e, t]
    for r in range(4):
        out[:, :, r, :, r % 2, :] = lanes[:, :, :, r].transpose(0, 2, 3, 1)
    return np.ascontiguousarray(out.reshape(lanes.shape[0], 4 * Lp))


def prepare(w, bias, mult):
    """w int [k, k, L], bias i32[L] (zero point folded), mult f32[L] ->
    (w i8[k * pairs_per_row(k), 4*Lp], bias i32[Lp], mult f32[Lp]) in this kernel's layout."""
    L = w.shape[2]
    Lp = -(-L // STEP) * STEP
    wp = np.zeros(w.shape[:2] + (Lp,), np.int8)
    wp[..., :L] = w
    bp = np.zeros(Lp, np.int32)
    bp[:L] = bias
    mp = np.zeros(Lp, np.float32)
    mp[:L] = mult
    return pair_weights(wp), to_lanes(bp), to_lanes(mp)


# ---------------------------------------------------------------------------------------------
# IR

def _unpack_bytes(b, x0, x1, high):
    """vpunpck{l,h}bw: per 128-bit lane, bytes 0-7 (or 8-15) of x0 and x1 interleaved."""
    half = 8 if high else 0
    idx = [16 * l + half + j // 2 + (64 if j % 2 else 0) for l in range(4) for j in range(16)]
    return b.shuffle_vector(x0, x1, lanes(idx))


def _pack_sat(b, lo_half, hi_half, native):
    """vpackusdw (<16 x i32> pair -> <32 x i16>) or vpackuswb (<32 x i16> pair -> <64 x i8>):
    signed values saturated to the unsigned narrow range, per 128-bit lane the first operand's
    4 (8) elements then the second's."""
    n = lo_half.type.count
    wide = lo_half.type.element
    narrow = i16 if wide == i32 else i8
    nty = ir.VectorType(narrow, 2 * n)
    if native:
        name = "llvm.x86.avx512.packusdw.512" if narrow == i16 else "llvm.x86.avx512.packuswb.512"
        fn = b.module.declare_intrinsic(name, fnty=ir.FunctionType(nty, [lo_half.type, lo_half.type]))
        return b.call(fn, [lo_half, hi_half])
    per = n // 4                         # elements of one operand in a 128-bit lane
    cat = b.shuffle_vector(lo_half, hi_half, lanes([
        (n if h else 0) + per * l + j for l in range(4) for h in range(2) for j in range(per)]))
    top = ir.Constant(cat.type, [(1 << narrow.width) - 1] * 2 * n)
    zero = ir.Constant(cat.type, [0] * 2 * n)
    cat = b.select(b.icmp_signed("<", cat, zero), zero, cat)
    cat = b.select(b.icmp_signed(">", cat, top), top, cat)
    return b.trunc(cat, nty)


def _emu_masked_load(module):
    """(i8* p, i64 mask) -> <64 x i8>: byte j = p[j] if bit j of mask, else 0."""
    def body(b, fn):
        p, mask = fn.args
        v = cgutils.alloca_once_value(b, ir.Constant(_v64i8, None))
        vp = b.bitcast(v, i8.as_pointer())
        with cgutils.for_range(b, const(STEP)) as lj:
            j = lj.index
            with b.if_then(b.trunc(b.lshr(mask, j), ir.IntType(1))):
                b.store(b.load(b.gep(p, [j])), b.gep(vp, [j]))
        b.ret(b.load(v))
    return internal_function(module, "ternet_emu_masked_load", _v64i8, [i8.as_pointer(), i64], body)


def _emu_masked_store(module, vty):
    """(<64 x T> v, <64 x T>* p, i64 mask): p[j] = v[j] where bit j of mask."""
    def body(b, fn):
        val, p, mask = fn.args
        v = cgutils.alloca_once_value(b, val)
        ep = b.bitcast(p, vty.element.as_pointer())
        vp = b.bitcast(v, vty.element.as_pointer())
        with cgutils.for_range(b, const(STEP)) as lj:
            j = lj.index
            with b.if_then(b.trunc(b.lshr(mask, j), ir.IntType(1))):
                b.store(b.load(b.gep(vp, [j])), b.gep(ep, [j]))
        b.ret_void()
    return internal_function(module, f"ternet_emu_masked_store_{vty.element}", ir.VoidType(),
                         [vty, vty.as_pointer(), i64], body)


class _Tile:
    """Emits `depthwise._tile` for this layout (see the module docstring)."""

    def __init__(self, ctx, b, layer, run, native):
        """layer, run: `Record`s of depthwise.DwLayer and DwRun (integers as uint64)."""
        self.b, self.native = b, native
        self.rs, self.cs, self.k, self.ws = run.rs, run.cs, layer.k, layer.ws

        def data(rec, name):
            return ig.array(ctx, b, getattr(rec.types, name), getattr(rec, name))[0]

        self.xp, self.op = data(run, "x"), data(run, "out")
        self.wp, self.bp, self.mp = data(layer, "w"), data(layer, "bias"), data(layer, "mult")
        self.acc_out = run.types.out.dtype == types.int32
        self.zv, self.zcv = splat(b, layer.zph, 16), splat(b, layer.zpc, 16)
        self.hiv = splat(b, layer.hi, 16)
        self.lob = splat(b, b.fptoui(layer.lo, i8), 64)     # 0 <= lo <= 255, integer-valued
        self.accs = [[cgutils.alloca_once(b, _v16i32) for _ in range(4)] for _ in range(TILE_PX)]
        self.xo, self.oo, self.n, self.npix = run.xo, run.oo, run.n, run.npix
        self.xstep, self.ostep = run.xstep, run.ostep

    # -- memory (offsets in bytes, i64)
    def _ptr(self, base, off, vty):
        return self.b.bitcast(self.b.gep(base, [off]), vty.as_pointer())

    def load_x(self, off, mask):
        """64 input bytes at xf + off; mask (i64, bit j: byte j) None for all of them, else the
        others read as 0 and their memory is not touched."""
        b = self.b
        p = self._ptr(self.xp, off, _v64i8)
        if mask is None:
            return b.load(p, align=1)
        if not self.native:
            return b.call(_emu_masked_load(b.module), [b.bitcast(p, i8.as_pointer()), mask])
        fnty = ir.FunctionType(_v64i8, [_v64i8.as_pointer(), i32, _v64i1, _v64i8])
        fn = b.module.declare_intrinsic("llvm.masked.load.v64i8.p0", fnty=fnty)
        return b.call(fn, [p, const(1, i32), b.bitcast(mask, _v64i1), ir.Constant(_v64i8, None)])

    def store(self, val, off, mask):
        """Store the 64-element vector val at out + off (bytes), only the elements in mask."""
        b = self.b
        p = self._ptr(self.op, off, val.type)
        if mask is None:
            b.store(val, p, align=1)
        elif not self.native:
            b.call(_emu_masked_store(b.module, val.type), [val, p, mask])
        else:
            fnty = ir.FunctionType(ir.VoidType(), [val.type, val.type.as_pointer(), i32, _v64i1])
            fn = b.module.declare_intrinsic(f"llvm.masked.store.v64{val.type.element}.p0", fnty=fnty)
            b.call(fn, [val, p, const(1, i32), b.bitcast(mask, _v64i1)])

    # -- the tile
    def emit(self, k):
        """All npix pixels: for stride 1 and 2 (xstep = cs, 2 cs) TILE_PX at a time sharing their
        loads, the rest one at a time. k: the kernel size as a Python int (taps unrolled) or None
        (the generic pair loop, one pixel at a time)."""
        b = self.b
        full = b.and_(self.n, const(~(STEP - 1)))
        rem = b.sub(self.n, full)
        mask = b.sub(b.shl(const(1), rem), const(1))          # i64, bit j: byte j; used only if rem > 0

        def pixels(first, count, s):
            with cgutils.for_range_slice(b, const(0), full, const(STEP)) as (c, _):
                self.step(first, count, s, c, k, None)
            with b.if_then(b.icmp_unsigned("!=", rem, const(0))):
                self.step(first, count, s, full, k, mask)

        def tiles(s):
            with cgutils.for_range(b, ntile) as lt:
                pixels(b.mul(lt.index, const(TILE_PX)), TILE_PX, s)

        ntile = const(0)
        if k is not None:
            ntile = b.udiv(self.npix, const(TILE_PX))
            with b.if_else(b.icmp_unsigned("==", self.xstep, self.cs)) as (s1, other):
                with s1:
                    tiles(1)
                with other:
                    with b.if_then(b.icmp_unsigned("==", self.xstep, b.add(self.cs, self.cs))):
                        tiles(2)
            other_stride = b.and_(b.icmp_unsigned("!=", self.xstep, self.cs),
                                  b.icmp_unsigned("!=", self.xstep, b.add(self.cs, self.cs)))
            ntile = b.select(other_stride, const(0), ntile)
        with cgutils.for_range_slice(b, b.mul(ntile, const(TILE_PX)), self.npix, const(1)) as (p, _):
            pixels(p, 1, 0)

    def step(self, first, count, s, c, k, mask):
        """Pixels [first, first + count) x channels [c, c + 64) (masked: the n - c that exist);
        pixel p's input starts s columns after pixel p - 1's (count > 1)."""
        b = self.b
        x0 = b.add(b.add(self.xo, b.mul(first, self.xstep)), c)
        cw = c
        for r in range(4):
            bv = b.load(self._ptr(self.bp, b.mul(b.add(cw, const(16 * r)), const(4)), _v16i32), align=4)
            for p in range(count):
                b.store(bv, self.accs[p][r])
        wcol = b.mul(cw, const(4))

        def pair(row, widx, pixels):
            """A tap pair of input row `row`; pixels: [(p, column of tap a, of tap b)], columns
            Python ints (unrolled: equal columns share their loads) or IR values."""
            wbase = b.add(b.mul(widx, self.ws), wcol)
            wv = [b.load(self._ptr(self.wp, b.add(wbase, const(STEP * r)), _v64i8), align=1)
                  for r in range(4)]
            for p, ca, cb in pixels:
                z = self._unpacked(x0, row, ca, cb, mask)
                for r in range(4):
                    acc = self.accs[p][r]
                    b.store(dpbusd(b, b.load(acc), z[r // 2], wv[r], self.native), acc)

        self._cache = {}
        if k is not None:
            npr = pairs_per_row(k)
            for ky in range(k):
                for i, (ca, cb) in enumerate(pair_columns(k)):
                    pair(ky, const(ky * npr + i), [(p, ca + p * s, cb + p * s) for p in range(count)])
                self._cache = {}        # rows share nothing: keep register pressure down
        else:
            npr = b.udiv(b.add(self.k, const(1)), const(2))
            with cgutils.for_range(b, b.mul(self.k, npr)) as lp:
                ky, i = b.udiv(lp.index, npr), b.urem(lp.index, npr)
                last = b.icmp_unsigned("==", i, b.sub(npr, const(1)))
                two_i = b.add(i, i)
                ca = b.select(last, b.select(b.icmp_unsigned(">", self.k, const(1)),
                                             b.sub(self.k, const(2)), const(0)), two_i)
                cb = b.select(last, b.sub(self.k, const(1)), b.add(two_i, const(1)))
                self._cache = {}
                pair(ky, lp.index, [(0, ca, cb)])
        self.epilogue(first, count, c, cw, mask)

    def _unpacked(self, x0, row, ca, cb, mask):
        """(low, high) byte interleave of the input vectors at (row, ca) and (row, cb), each
        loaded and unpacked once per step and row (adjacent pixels share columns)."""
        b = self.b

        def key(v):
            return v if isinstance(v, int) else id(v)

        def ir_int(v):
            return const(v) if isinstance(v, int) else v

        def vec(col):
            k = ("x", key(row), key(col))
            if k not in self._cache:
                off = b.add(x0, b.add(b.mul(ir_int(row), self.rs), b.mul(ir_int(col), self.cs)))
                self._cache[k] = self.load_x(off, mask)
            return self._cache[k]

        k = ("z", key(row), key(ca), key(cb))
        if k not in self._cache:
            xa, xb = vec(ca), vec(cb)
            self._cache[k] = (_unpack_bytes(b, xa, xb, False), _unpack_bytes(b, xa, xb, True))
        return self._cache[k]

    def epilogue(self, first, count, c, cw, mask):
        b = self.b
        oo = b.add(b.add(self.oo, b.mul(first, self.ostep)), c)
        oos = [b.add(oo, b.mul(const(p), self.ostep)) for p in range(count)]
        if self.acc_out:        # testing aid: raw accumulators in channel order
            order = [16 * r + i for ch in range(STEP) for r, i in zip(*np.nonzero(LANE_CH == ch))]
            for p in range(count):
                a = [b.load(self.accs[p][r]) for r in range(4)]
                cat = lanes(range(32))
                v = b.shuffle_vector(b.shuffle_vector(a[0], a[1], cat), b.shuffle_vector(a[2], a[3], cat),
                                     lanes(order))
                self.store(v, b.mul(oos[p], const(4)), mask)
            return
        mv = [b.load(self._ptr(self.mp, b.mul(b.add(cw, const(16 * r)), const(4)), _v16f32), align=4)
              for r in range(4)]
        for p in range(count):
            q = []
            for r in range(4):
                # quant.requant_ref: float32 product, then + zph and + zpc as separate adds (no
                # contraction); min with hi here, lo and the floor of negatives after the packs
                v = b.fadd(b.fmul(b.sitofp(b.load(self.accs[p][r]), _v16f32), mv[r]), self.zv)
                v = b.fadd(v, self.zcv)
                v = b.select(b.fcmp_ordered(">", v, self.hiv), self.hiv, v)
                q.append(b.fptosi(v, _v16i32))
            words = [_pack_sat(b, q[0], q[1], self.native), _pack_sat(b, q[2], q[3], self.native)]
            packed = _pack_sat(b, words[0], words[1], self.native)
            packed = b.select(b.icmp_unsigned("<", packed, self.lob), self.lob, packed)
            self.store(b.shuffle_vector(packed, ir.Constant(_v64i8, ir.Undefined), lanes(_UNPACK)),
                       oos[p], mask)

def emit_tile(ctx, b, layer, run, native: bool) -> None:
    """`depthwise._tile` for this layout: k = 3 and 5 with the tap pairs unrolled, other k through
    a pair loop. native: AVX512-VNNI/BW instructions, else portable IR with the same semantics
    (emulation)."""
    t = _Tile(ctx, b, layer, run, native)
    with b.if_else(b.icmp_unsigned("==", t.k, const(3))) as (k3, other):
        with k3:
            t.emit(3)
        with other:
            with b.if_else(b.icmp_unsigned("==", t.k, const(5))) as (k5, generic):
                with k5:
                    t.emit(5)
                with generic:
                    t.emit(None)
