"""Depthwise k x k conv (int8 weights, uint8 NHWC activations): reference and kernels.

Definition (docs/kernels.md): taps outside the image contribute zero *real* value, i.e. the
input is padded with its zero point zx:

    acc[n, oy, ox, c] = bias[c] + sum_{ky,kx valid} w[ky, kx, c] * (x[n, iy, ix, c] - zx)
    iy = oy * stride - pad_top + ky,  ix = ox * stride - pad_left + kx

then `quant.requant_ref`. Padding (pad_top, pad_left) and the output size (Ho, Wo) come from
`quant.conv_padding` ("same" = TF SAME, extra row/column at the bottom/right; "symmetric").

Kernel (research/kernels.md 5 and 7): NHWC, vectorised over channels, which are contiguous.
The Numba driver (`_rows`) walks output rows; interior pixels read x directly without checks,
border pixels first copy their window into a patch padded with zx (exactly the definition).
The micro-kernel (`_tile`, LLVM IR through `numba.extending.intrinsic`, like `vnni.py`) computes
n consecutive outputs, 32 channels per step, with int32 accumulators kept in registers across
all k*k taps and the requantization fused; one call covers a whole row of interior pixels (its
setup is paid once per row), and k = 3 and 5 get copies with the taps unrolled. Taps are taken in pairs: the two taps' u8 inputs are
zero-extended to int16, interleaved, and multiplied with interleaved int16 weights by
`vpmaddwd` (AVX2), which yields w0*x0 + w1*x1 per int32 lane: half the multiply-adds of one
product per lane. Measured on this repo's 2-core Zen 3 box, 1 thread: 1.2-1.5x faster than the
same loop with int32 products and 1.3-2.4x faster than the best plain-Numba version (taps
unrolled in a vectorised channel loop), which is limited by the runtime alias checks LLVM puts
in front of every vectorised loop. Without AVX2 (or numba's target lacking it) the same lanes are
computed by portable vector IR.

`vpunpck{l,h}wd` interleave within 128-bit halves, so accumulator lane i holds channel PERM[i]
of its 16-channel group; prepared weights, bias and multipliers are stored in that order and
the bytes are put back in channel order (one shuffle) before the store.

Stride 1 with few channels: x[n, iy, ox:ox+m, :] is contiguous, so a run of m interior pixels is
computed as one vector of m*Cp "channels" with weights, bias and multipliers tiled m times; this
keeps the per-call overhead (tap table, loop setup) small for Cp = 16..128.

On AVX512-VNNI CPUs the same driver runs `dw_vnni`'s micro-kernel instead (impl "vnni": 64
channels per step with `vpdpbusd`, its own prepared layout; see that module), chosen by
`cpu.depthwise_kernel`. Its portable-IR twin "emu512" tests the layout and tiling on any CPU.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import quant
from . import cpu, dw_vnni
from . import irgen as ig
from ._jit import U, kernel, num_threads
from .conv import tap_windows
from .irgen import const, f32, i8, i16, i32, i64, shuffle, splat
from .layout import CH_ALIGN, aligned, pad_to
from .limits import DEPTHWISE_PAR_MIN_MACS as PAR_MIN_MACS
from .limits import I32_MAX, check_clamp, check_finite, check_headroom, check_int8
from .variants import variant as _variant

MAX_TAPS = 50                    # k*k rounded up to a pair, k <= 7
FLAT_LEN = 256                   # stride 1: interior pixels in runs of max(1, FLAT_LEN // Cp)
STEP_PIXELS = {16: 4, 32: 2}     # dw_vnni, stride 1: pixels per run that fill one 64-byte step


# ---------------------------------------------------------------------------------------------
# Reference

def depthwise_acc_ref(x, zx, w, bias, stride, pad_top, pad_left, Ho, Wo) -> np.ndarray:
    """int32 accumulators: x u8[N,H,W,C], w i8[k,k,C], bias i32[C] -> i32[N,Ho,Wo,C]."""
    x = np.asarray(x)
    N, H, W, C = x.shape
    k = w.shape[0]
    assert w.shape == (k, k, C) and np.asarray(bias).shape == (C,)
    acc = np.zeros((N, Ho, Wo, C), np.int64) + np.asarray(bias, np.int64)
    w64 = np.asarray(w, np.int64)
    for ky, kx, win in tap_windows(x, zx, k, stride, pad_top, pad_left, Ho, Wo):
        acc += w64[ky, kx] * win
    assert np.all(np.abs(acc) <= I32_MAX), "accumulator overflows int32"
    return acc.astype(np.int32)


def depthwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pad_top, pad_left, Ho, Wo,
                  rule="ternet"):
    """x u8[N,H,W,C], w i8[k,k,C], bias i32[C], mult f32[C] -> u8[N,Ho,Wo,C] (quant.RULES rule)."""
    acc = depthwise_acc_ref(x, zx, w, bias, stride, pad_top, pad_left, Ho, Wo)
    return quant.requant_ref(acc, mult, zp_out, lo, hi, rule)


# ---------------------------------------------------------------------------------------------
# Micro-kernel (LLVM IR)

PERM = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)   # lane i of a group <- channel PERM[i]
_INV = tuple(PERM.index(i) for i in range(16))
# word interleave of two 16-word vectors within 128-bit halves: vpunpcklwd, then vpunpckhwd
_ILV = ((0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27),
        (4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31))
_NV = 2                                                          # 16-channel vectors per step

_v8i32, _v16i16, _v16i32 = ir.VectorType(i32, 8), ir.VectorType(i16, 16), ir.VectorType(i32, 16)
_v16f32, _v16i8, _v32i16 = ir.VectorType(f32, 16), ir.VectorType(i8, 16), ir.VectorType(i16, 32)


def _madd(b, z, w, avx2):
    """<16 x i16> z, w -> <8 x i32>, lane i = z[2i]*w[2i] + z[2i+1]*w[2i+1] (exact: z >= 0)."""
    if avx2:
        fnty = ir.FunctionType(_v8i32, [_v16i16, _v16i16])
        fn = b.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=fnty)
        return b.call(fn, [z, w])
    ev, od = range(0, 16, 2), range(1, 16, 2)
    return b.add(b.mul(b.sext(shuffle(b, z, ev), _v8i32), b.sext(shuffle(b, w, ev), _v8i32)),
                 b.mul(b.sext(shuffle(b, z, od), _v8i32), b.sext(shuffle(b, w, od), _v8i32)))


def _emit_tile(ctx, b, layer, run, avx2):
    """See `_tile`. All offsets are element indices (i64)."""
    rs, cs, k, ws, lo, hi = run.rs, run.cs, layer.k, layer.ws, layer.lo, layer.hi
    xo, oo, n, npix, xstep, ostep = run.xo, run.oo, run.n, run.npix, run.xstep, run.ostep

    def data(rec, name):
        return ig.array(ctx, b, getattr(rec.types, name), getattr(rec, name))[0]

    def vload(base, off, vty, scale, align):
        return b.load(b.bitcast(b.gep(base, [b.mul(off, const(scale))]), vty.as_pointer()), align=align)

    xp, op = data(run, "x"), data(run, "out")
    wp, bp, mp = data(layer, "w"), data(layer, "bias"), data(layer, "mult")
    acc_out = run.types.out.dtype == types.int32
    zv, zcv = splat(b, layer.zph, 16), splat(b, layer.zpc, 16)
    lov, hiv = splat(b, lo, 16), splat(b, hi, 16)
    # tap table on the stack (generic k only; built in that branch, see the end): tab[ky*k + kx]
    # = ky*rs + kx*cs, an odd count padded with a copy of the last tap (its pair weight is 0), so
    # taps go in pairs (2p, 2p + 1)
    tab = b.gep(cgutils.alloca_once(b, ir.ArrayType(i64, MAX_TAPS)), [const(0, i32), const(0, i32)])
    kk = b.mul(k, k)
    npairs = b.udiv(b.add(kk, const(1)), const(2))

    def build_tab():
        with cgutils.for_range(b, k) as ly:
            with cgutils.for_range(b, k) as lx:
                b.store(b.add(b.mul(ly.index, rs), b.mul(lx.index, cs)),
                        b.gep(tab, [b.add(b.mul(ly.index, k), lx.index)]))
        b.store(b.load(b.gep(tab, [b.sub(kk, const(1))])), b.gep(tab, [kk]))

    accs = [[cgutils.alloca_once(b, _v8i32) for _ in range(2)] for _ in range(_NV)]   # -> registers

    def pair(xc, wc, o0, o1, wr, nv):
        for j in range(nv):
            x0 = b.zext(vload(xp, b.add(o0, const(16 * j)), _v16i8, 1, 1), _v16i16)
            x1 = b.zext(vload(xp, b.add(o1, const(16 * j)), _v16i8, 1, 1), _v16i16)
            wv = vload(wp, b.add(wr, const(16 * j)), _v32i16, 4, 4)    # 16 (w0, w1) pairs
            for h in range(2):
                z = shuffle(b, x0, _ILV[h], x1)
                prod = _madd(b, z, shuffle(b, wv, range(16 * h, 16 * h + 16)), avx2)
                b.store(b.add(b.load(accs[j][h]), prod), accs[j][h])

    def step(c, nv, offs, xo, oo):
        for j in range(nv):
            bv = vload(bp, b.add(c, const(16 * j)), _v16i32, 4, 4)
            b.store(shuffle(b, bv, range(8)), accs[j][0])
            b.store(shuffle(b, bv, range(8, 16)), accs[j][1])
        xc, wc = b.add(xo, c), c
        if offs is not None:       # k known: taps unrolled, offsets loop-invariant
            for p in range(len(offs) // 2):
                pair(xc, wc, b.add(xc, offs[2 * p]), b.add(xc, offs[2 * p + 1]),
                     b.add(b.mul(const(p), ws), wc), nv)
        else:
            with cgutils.for_range(b, npairs) as lp:
                t0 = b.mul(lp.index, const(2))
                o0 = b.add(xc, b.load(b.gep(tab, [t0])))
                o1 = b.add(xc, b.load(b.gep(tab, [b.add(t0, const(1))])))
                pair(xc, wc, o0, o1, b.add(b.mul(lp.index, ws), wc), nv)
        for j in range(nv):
            cj = b.add(c, const(16 * j))
            acc = shuffle(b, b.load(accs[j][0]), range(16), b.load(accs[j][1]))   # PERM order
            if acc_out:
                b.store(shuffle(b, acc, _INV), b.bitcast(b.gep(op, [b.mul(b.add(oo, cj), const(4))]),
                                                         _v16i32.as_pointer()), align=4)
                continue
            # quant.requant_ref: float32 mul, then the two adds of quant.round_constants
            # (separate, no contraction), clamp; v >= lo >= 0 so truncation is floor
            v = b.fadd(b.fadd(b.fmul(b.sitofp(acc, _v16f32), vload(mp, cj, _v16f32, 4, 4)), zv), zcv)
            v = b.select(b.fcmp_ordered("<", v, lov), lov, v)
            v = b.select(b.fcmp_ordered(">", v, hiv), hiv, v)
            q = shuffle(b, b.trunc(b.fptosi(v, _v16i32), _v16i8), _INV)
            b.store(q, b.bitcast(b.gep(op, [b.add(oo, cj)]), _v16i8.as_pointer()), align=1)

    full = b.mul(b.udiv(n, const(16 * _NV)), const(16 * _NV))

    def body(offs):
        # npix pixels in one call: the setup above (splats, tap offsets, branches) is paid once
        # per row of interior pixels instead of once per pixel
        with cgutils.for_range(b, npix) as lpix:
            xo_p = b.add(xo, b.mul(lpix.index, xstep))
            oo_p = b.add(oo, b.mul(lpix.index, ostep))
            with cgutils.for_range_slice(b, const(0), full, const(16 * _NV)) as (c, _):
                step(c, _NV, offs, xo_p, oo_p)
            with cgutils.for_range_slice(b, full, n, const(16)) as (c, _):
                step(c, 1, offs, xo_p, oo_p)

    def const_offsets(kk):
        offs = [b.add(b.mul(const(ky), rs), b.mul(const(kx), cs)) for ky in range(kk) for kx in range(kk)]
        return offs + offs[-1:] if len(offs) % 2 else offs

    # Lite0 / MobileNetV2 use k = 3 and 5: specialised copies with the tap loop unrolled (no tap
    # table loads, no loop control); other k take the generic loop.
    with b.if_else(b.icmp_unsigned("==", k, const(3))) as (k3, other):
        with k3:
            body(const_offsets(3))
        with other:
            with b.if_else(b.icmp_unsigned("==", k, const(5))) as (k5, generic):
                with k5:
                    body(const_offsets(5))
                with generic:
                    build_tab()
                    body(None)


# _tile variants (literal ints, one specialisation each): the pair layout on AVX2 (portable IR
# where numba's target lacks AVX2), the pair layout on portable IR (tests), the masked-weight
# layout of dw_vnni on AVX512-VNNI, and that layout on portable IR (emulation, tests)
PAIRS, PAIRS_PORTABLE, VNNI, EMU512 = 0, 1, 2, 3


class DwLayer(NamedTuple):
    """What every _tile call of a layer shares: prepared w (pair layout: i16 pairs
    [(k*k+1)//2, ws, 2], channels in PERM order within groups of 16; VNNI/EMU512: dw_vnni's layout,
    ws bytes per tap pair), its row stride ws, bias i32, mult f32, zph/zpc (quant.round_constants)
    /lo/hi f32, kernel size k."""
    w: object
    ws: object
    bias: object
    mult: object
    zph: object
    zpc: object
    lo: object
    hi: object
    k: object


class DwRun(NamedTuple):
    """One _tile call: npix pixels p of n outputs each (n % 16 == 0); pixel p's window starts at
    x[xo + p*xstep] with rows rs and columns cs apart, its outputs at out[oo + p*ostep]. x u8 (the
    image or a gathered patch), out u8 or i32 (raw accumulators in channel order); all flat."""
    x: object
    xo: object
    rs: object
    cs: object
    out: object
    oo: object
    n: object
    npix: object
    xstep: object
    ostep: object


@intrinsic
def _tile(typingctx, layer, run, variant):
    """out[oo + p*ostep + c] = requant(bias[c] + sum_t w[t, c] * x[xo + p*xstep + tab[t] + c]) for
    the pixels and channels of run (a DwRun) and layer (a DwLayer), tab[ky*k + kx] = ky*rs + kx*cs.
    variant: a literal int above."""
    if not isinstance(variant, types.IntegerLiteral) or variant.literal_value not in range(4):
        raise numba.errors.TypingError("_tile: variant must be a literal PAIRS..EMU512")
    v = variant.literal_value
    if v == VNNI and not cpu.can_compile("avx512vnni"):   # before any code generation
        raise RuntimeError("ternet: this CPU (or numba's target) lacks avx512vnni")
    sig = types.void(layer, run, variant)

    def codegen(context, builder, sig, args):
        lay = ig.Record(context, builder, sig.args[0], args[0], unsigned=True)
        rn = ig.Record(context, builder, sig.args[1], args[1], unsigned=True)
        if v in (VNNI, EMU512):
            dw_vnni.emit_tile(context, builder, lay, rn, native=v == VNNI)
        else:
            _emit_tile(context, builder, lay, rn, v == PAIRS and cpu.can_compile("avx2"))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Driver
#
# Prepared tensors (prepare_depthwise), impl "pairs": w i16[(k*k+1)//2, L, 2] (tap pairs, odd tap
# count padded with zero weights), folded bias i32[L], mult f32[L]; L = Cp * run, the channel axis
# tiled `run` times (run > 1 only for stride 1, see FLAT_LEN), channels in PERM order within
# 16-groups; padded channels have zero weight, bias and multiplier. Impl "vnni"/"emu512": the same
# tiled channel axis in dw_vnni's layout (w i8[k * (k+1)//2, 4*Lp], Lp = L rounded up to 64).
#
# Headroom: the final accumulator is bias + sum(w * (x - zx)) with the zero point folded, bounded by
# the factory through |folded bias| + 255 * sum|w| <= 2**31 - 1. vpmaddwd's pair sums are exact
# (|w0*x0 + w1*x1| <= 65280) and the int32 adds wrap, so partial sums cannot change the result.

@kernel()
def _gather(xf, nb, iy0, ix0, H, W, rs, cs, zx, patch, k):
    """The k x k x Cp window at signed input position (iy0, ix0) of the image at xf[nb:] ->
    patch u8[k, k, Cp], taps outside the image set to the zero point (the definition's padding)."""
    for ky in range(k):
        iy = iy0 + ky
        for kx in range(k):
            ix = ix0 + kx
            po = U(ky * k + kx) * cs
            if 0 <= iy < H and 0 <= ix < W:
                xo = nb + U(iy) * rs + U(ix) * cs
                for c in range(cs):
                    patch[po + c] = xf[xo + c]
            else:
                for c in range(cs):
                    patch[po + c] = zx


@kernel()
def _rows(r0, r1, x, zx, wq, bias, mult, zph, zpc, lo, hi, k, stride, pt, pl, run, out, patch, variant):
    """Output rows [r0, r1) of the batch (r = n * Ho + oy): all Wo pixels and Cp channels.
    out u8 (requantized) or i32 (accumulators). run: pixels per flat run (stride 1, see
    FLAT_LEN; the prepared channel axis holds run copies)."""
    N, H, W, Cp = x.shape
    Ho, Wo = out.shape[1], out.shape[2]
    run = run if stride == 1 else 1
    xf = x.reshape(-1)
    of = out.reshape(-1)
    rs, cs, pks = U(W * Cp), U(Cp), U(k * Cp)
    layer = DwLayer(wq.reshape(-1), U(wq.shape[1]), bias, mult, zph, zpc, lo, hi, U(k))
    # interior columns: ox*s - pl >= 0 and ox*s - pl + k <= W (floor division)
    cx_lo = min(Wo, (pl + stride - 1) // stride)
    cx_hi = max(cx_lo, min(Wo, (W - k + pl) // stride + 1))
    for r in range(r0, r1):
        n = r // Ho
        oy = r - n * Ho
        nb = U(n * H * W * Cp)
        orow = U(r * Wo * Cp)
        iy0 = oy * stride - pt
        a, b = cx_lo, cx_hi
        if iy0 < 0 or iy0 + k > H:
            a = b = Wo                  # the whole row is border
        xrow = nb + U(max(iy0, 0)) * rs
        if run == 1 and a < b:          # interior pixels of the row, one call
            _tile(layer, DwRun(xf, xrow + U(a * stride - pl) * cs, rs, cs, of, orow + U(a) * cs, cs,
                               U(b - a), U(stride) * cs, cs), variant)
        elif run > 1 and a < b:         # stride 1, few channels: runs of `run` pixels, one call
            full = (b - a) // run * run
            rl = U(run) * cs
            if full:
                _tile(layer, DwRun(xf, xrow + U(a - pl) * cs, rs, cs, of, orow + U(a) * cs, rl,
                                   U(full // run), rl, rl), variant)
            if full < b - a:            # the last, shorter run
                p = a + full
                _tile(layer, DwRun(xf, xrow + U(p - pl) * cs, rs, cs, of, orow + U(p) * cs,
                                   U(b - p) * cs, U(1), U(0), U(0)), variant)
        for ox in range(Wo):
            if a <= ox < b:
                continue
            _gather(xf, nb, iy0, ox * stride - pl, H, W, rs, cs, zx, patch, k)
            _tile(layer, DwRun(patch, U(0), pks, cs, of, orow + U(ox) * cs, cs, U(1), U(0), U(0)),
                  variant)


class DwDrivers(NamedTuple):
    """One layout's drivers: x u8[N,H,W,Cp] -> out u8[N,Ho,Wo,Cp] (or int32 accumulators, given
    an i32 out: a testing aid); prepared tensors (see above), zph/zpc/lo/hi f32, patch u8[>= 1, k*k*Cp]
    scratch (one row per chunk of rows)."""
    serial: object
    par: object         # the output rows split into patch.shape[0] chunks over numba's threads; None
    portable: object    # the layout on portable IR (what CPUs without the ISA run; tests)


def _driver(name: str, v: int, par: bool):
    """The driver `name` of _tile variant v, serial (one chunk, patch row 0) or parallel. Every
    output is computed by the same code whatever the split, so results do not depend on the
    thread count."""
    def drive(x, zx, wq, bias, mult, zph, zpc, lo, hi, k, stride, pt, pl, run, out, patch):
        nr = out.shape[0] * out.shape[1]
        nch = min(nr, patch.shape[0]) if par else 1
        for i in prange(nch):
            _rows(i * nr // nch, (i + 1) * nr // nch, x, zx, wq, bias, mult, zph, zpc, lo, hi, k,
                  stride, pt, pl, run, out, patch[i], v)
    return _variant(drive, name, __name__, parallel=par)


dw_i8_u8 = _driver("dw_i8_u8", PAIRS, False)
dw_i8_u8_par = _driver("dw_i8_u8_par", PAIRS, True)
dw_i8_u8_portable = _driver("dw_i8_u8_portable", PAIRS_PORTABLE, False)
dw_i8_u8_vnni = _driver("dw_i8_u8_vnni", VNNI, False)
dw_i8_u8_vnni_par = _driver("dw_i8_u8_vnni_par", VNNI, True)
dw_i8_u8_emu512 = _driver("dw_i8_u8_emu512", EMU512, False)

# impl -> drivers; "emu512" runs serially
DRIVERS = {
    "pairs": DwDrivers(dw_i8_u8, dw_i8_u8_par, dw_i8_u8_portable),
    "vnni": DwDrivers(dw_i8_u8_vnni, dw_i8_u8_vnni_par, dw_i8_u8_emu512),
    "emu512": DwDrivers(dw_i8_u8_emu512, None, dw_i8_u8_emu512),
}
IMPLS = tuple(DRIVERS)


@kernel()
def pad_u8(x, zx, pt, pl, xp):
    """x u8[N,H,W,Cp] -> xp u8[N,Hp,Wp,Cp]: x at rows [pt, pt+H), columns [pl, pl+W), the zero
    point everywhere else (the definition's padding made explicit). Unsigned indices (a signed
    one gets numba's negative-index fix-up) and the border fill and the row copies as separate
    loop nests: combined in one nest, LLVM left the copy scalar (8x slower, measured)."""
    N, H, W, Cp = x.shape
    Hp, Wp = xp.shape[1], xp.shape[2]
    zu = np.uint8(zx)
    rs, prs = U(W * Cp), U(Wp * Cp)
    left, right = U(pl * Cp), U((pl + W) * Cp)
    xf = x.reshape(-1)
    pf = xp.reshape(-1)
    for n in range(N):
        for y in range(Hp):
            d = U(n * Hp + y) * prs
            if y < pt or y >= pt + H:
                for j in range(prs):
                    pf[d + j] = zu
            else:
                for j in range(left):
                    pf[d + j] = zu
                for j in range(right, prs):
                    pf[d + j] = zu
        for iy in range(H):
            src = U(n * H + iy) * rs
            dst = U(n * Hp + iy + pt) * prs + left
            for j in range(rs):
                pf[dst + j] = xf[src + j]


# ---------------------------------------------------------------------------------------------
# Load-time preparation and the plan

def permute16(a):
    """Reorder the last (channel) axis within groups of 16 into PERM order."""
    a = np.asarray(a)
    g = a.reshape(a.shape[:-1] + (a.shape[-1] // 16, 16))
    return np.ascontiguousarray(g[..., list(PERM)].reshape(a.shape))


def prepare_depthwise(w, bias, zx, mult, stride, impl="pairs"):
    """Canonical w i8[k,k,C], raw bias i32[C], mult f32[C] -> kernel tensors (see Driver; for
    impl vnni/emu512 dw_vnni's layout): (w, folded bias, mult, run). Checks int32 headroom."""
    w = np.asarray(w)
    k, C = w.shape[0], w.shape[2]
    Cp = pad_to(C, CH_ALIGN)
    wc = w.reshape(k * k, C).T.astype(np.int64)                      # [C, k*k]
    folded = quant.fold_input_zero_point(np.asarray(bias, np.int32), wc, zx)
    check_headroom(wc, folded, "depthwise")
    run = max(1, FLAT_LEN // Cp) if stride == 1 else 1
    if impl != "pairs" and stride == 1:
        # one 64-byte step per run, so that neighbouring runs share their loads like stride-2
        # pixels do (dw_vnni's tiles): 32 channels at 112x112, 3x3, 1 thread: 121 us against
        # 145 us with 256-byte runs and 190 us with none; 16 channels: the same as 256-byte runs
        run = STEP_PIXELS.get(Cp, 1)
    if impl != "pairs":
        wt = np.zeros((k * k, Cp), np.int8)
        wt[:, :C] = w.reshape(k * k, C)
        bp = np.zeros(Cp, np.int32)
        bp[:C] = folded
        mp = np.zeros(Cp, np.float32)
        mp[:C] = np.asarray(mult, np.float32).reshape(-1)
        wq, bq, mq = dw_vnni.prepare(np.tile(wt, (1, run)).reshape(k, k, -1), np.tile(bp, run),
                                     np.tile(mp, run))
        return aligned(wq), bq, mq, run
    npairs = (k * k + 1) // 2
    wt = np.zeros((2 * npairs, Cp), np.int16)
    wt[:k * k, :C] = w.reshape(k * k, C)
    wt = permute16(np.tile(wt, (1, run)))                           # [2*npairs, L]
    wq = np.ascontiguousarray(wt.reshape(npairs, 2, -1).transpose(0, 2, 1))
    bp = np.zeros(Cp, np.int32)
    bp[:C] = folded
    mp = np.zeros(Cp, np.float32)
    mp[:C] = np.asarray(mult, np.float32).reshape(-1)
    return wq, permute16(np.tile(bp, run)), permute16(np.tile(mp, run)), run


@dataclasses.dataclass(frozen=True, eq=False)
class DepthwisePlan:
    """A prepared depthwise layer; `plan(x4d, out4d)` runs it (see make_depthwise).
    Holds a small scratch (one k*k*Cp patch per thread), so one call at a time per plan."""
    channels: int
    k: int
    stride: int
    pad_top: int
    pad_left: int
    H: int
    W: int
    Ho: int
    Wo: int
    cp: int
    zx: np.uint8 = dataclasses.field(repr=False)
    w: np.ndarray = dataclasses.field(repr=False)        # i16[(k*k+1)//2, L, 2] or dw_vnni's
    bias: np.ndarray = dataclasses.field(repr=False)     # i32[L], zero point folded
    mult: np.ndarray = dataclasses.field(repr=False)     # f32[L]
    zph: np.float32 = dataclasses.field(repr=False)      # quant.round_constants
    zpc: np.float32 = dataclasses.field(repr=False)
    lo: np.float32 = dataclasses.field(repr=False)
    hi: np.float32 = dataclasses.field(repr=False)
    patch: np.ndarray = dataclasses.field(repr=False)    # u8[max threads, k*k*Cp]
    padded: bool = False     # copy x into a zero-point-bordered buffer first (see make_depthwise)
    Hp: int = 0              # its height and width (padded only)
    Wp: int = 0
    run: int = 1             # pixels per flat run (stride 1): L = run * Cp
    impl: str = "pairs"      # a key of DRIVERS
    _scratch: dict = dataclasses.field(default_factory=dict, repr=False)

    def _check(self, x4d, out4d, odt):
        want_out = (x4d.shape[0], self.Ho, self.Wo, self.cp)
        if x4d.shape[1:] != (self.H, self.W, self.cp) or out4d.shape != want_out:
            raise ValueError(f"expected x[N, {self.H}, {self.W}, {self.cp}] and "
                             f"out[N, {self.Ho}, {self.Wo}, {self.cp}], got {x4d.shape} and {out4d.shape}")
        if x4d.dtype != np.uint8 or out4d.dtype != odt:
            raise TypeError(f"x must be uint8 and out {np.dtype(odt).name}")
        if not (x4d.flags.c_contiguous and out4d.flags.c_contiguous):
            raise ValueError("x and out must be C-contiguous views (buf[:P].reshape(N, H, W, Cp))")

    def _args(self, x4d):
        return (x4d, self.zx, self.w, self.bias, self.mult, self.zph, self.zpc, self.lo, self.hi, self.k,
                self.stride, self.pad_top, self.pad_left, self.run)

    def padded_bytes(self, n: int) -> int:
        """Bytes of the bordered input copy for a batch of n images (0 if not padded)."""
        return n * self.Hp * self.Wp * self.cp if self.padded else 0

    def __call__(self, x4d, out4d, scratch=None):
        """x4d u8[N,H,W,Cp] -> out4d u8[N,Ho,Wo,Cp]: all Cp channels written, nothing else.
        scratch: u8[>= padded_bytes(N)] for the bordered copy (a model shares one among its
        layers), else the plan keeps its own."""
        self._check(x4d, out4d, np.uint8)
        n = x4d.shape[0]
        if n == 0:
            return
        args = self._args(x4d)
        if self.padded:
            need = self.padded_bytes(n)
            if scratch is None or scratch.size < need or scratch.dtype != np.uint8:
                scratch = self._scratch.get("pad")
                if scratch is None or scratch.size < need:
                    scratch = self._scratch["pad"] = np.empty(need, np.uint8)
            xp = scratch[:need].reshape(n, self.Hp, self.Wp, self.cp)
            pad_u8(x4d, self.zx, self.pad_top, self.pad_left, xp)
            args = (xp,) + args[1:-3] + (0, 0, self.run)
        serial, par, _ = DRIVERS[self.impl]
        threads = num_threads()
        if (par is not None and threads > 1
                and n * self.Ho * self.Wo * self.cp * self.k * self.k >= PAR_MIN_MACS):
            par(*args, out4d, self.patch[:threads])
        else:
            serial(*args, out4d, self.patch)

    def portable(self, x4d, out4d):
        """Testing aid: __call__ on the portable code path of the plan's layout (what CPUs without
        AVX2, or without AVX512-VNNI, would run), single thread."""
        self._check(x4d, out4d, np.uint8)
        if x4d.shape[0]:
            DRIVERS[self.impl].portable(*self._args(x4d), out4d, self.patch)

    def accumulate(self, x4d, acc4d):
        """Testing aid: int32 accumulators of all Cp channels into acc4d i32[N,Ho,Wo,Cp]."""
        self._check(x4d, acc4d, np.int32)
        if x4d.shape[0]:
            DRIVERS[self.impl].serial(*self._args(x4d), acc4d, self.patch)


def _border_pixels(k, stride, pad, size, out):
    """Output positions along one axis whose window leaves the input (floor division)."""
    lo = min(out, (pad + stride - 1) // stride)
    hi = max(lo, min(out, (size - k + pad) // stride + 1))
    return out - (hi - lo)


# pads_input's threshold per layout: border * k*k >= PAD_RATIO * H*W
PAD_RATIO = {"pairs": 5, "vnni": 3, "emu512": 3}


def pads_input(k, stride, pad_top, pad_left, H, W, Ho, Wo, impl="pairs") -> bool:
    """Whether to copy the input into a zero-point-bordered buffer (one pass over H*W pixels, then
    every pixel takes the interior path) instead of gathering each border pixel's k*k window into
    a patch. Measured per Lite0 layer in sequence (1 thread), pair kernel: the copy won 7-20%
    where border * k*k >= 20 * H*W / 4 (the 5x5 stride-1 layers, most of whose pixels are border
    pixels: 7x7 has 40 of 49) and lost 7-21% on the 3x3 layers and the 5x5 stride-2 ones, where
    it is < 10 * H*W / 4; the threshold sits between. The AVX-512 kernel makes gathered pixels
    relatively dearer: the 5x5 stride-2 layer 14x14 -> 7x7 (ratio 3.06) ran 25 us with the copy,
    31 without; 3x3 layers: 14x14 (ratio 2.4) equal either way, 7x7 (4.4, now copied) equal
    or 2 us faster, the larger ones (< 1) within noise or slower with the copy (up to 1.6x: 96
    channels 112x112 -> 56x56)."""
    rows = Ho - _border_pixels(k, stride, pad_top, H, Ho)
    cols = Wo - _border_pixels(k, stride, pad_left, W, Wo)
    border = Ho * Wo - rows * cols
    return border * k * k >= PAD_RATIO[impl] * H * W


def make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, pad_top, pad_left, H, W, Ho, Wo,
                   pad_input=None, impl=None, rule="ternet"):
    """Prepare a depthwise layer from canonical tensors: w int8 [k,k,C], raw bias int32 [C],
    input zero point zx, mult float32 [C], output zero point, clamp bounds, requantization rule
    (quant.RULES); geometry from
    quant.conv_padding. Any batch size; nothing is allocated per call, except the bordered input
    copy when the caller passes no scratch (first call per larger batch, then kept).
    pad_input: copy the input into a zero-point-bordered buffer first, so every pixel takes the
    interior path (None: when pads_input says it is cheaper; True/False force it, for tests).
    impl: a key of DRIVERS, None for the fastest on this CPU (cpu.depthwise_kernel)."""
    impl = cpu.depthwise_kernel() if impl is None else impl
    if impl not in DRIVERS:
        raise ValueError(f"unknown depthwise impl {impl!r}; expected one of {IMPLS}")
    if impl == "vnni" and not cpu.can_run("avx512vnni"):
        raise RuntimeError("depthwise impl 'vnni' needs AVX512-VNNI; this CPU (or numba's target) lacks it")
    w = np.asarray(w)
    if w.ndim != 3 or w.shape[0] != w.shape[1] or w.dtype.kind not in "iu":
        raise ValueError(f"w must be an integer array [k, k, C], got {w.dtype} {w.shape}")
    k, C = w.shape[0], w.shape[2]
    if k % 2 == 0 or not 1 <= k <= 7:
        raise ValueError(f"kernel size {k} not supported; expected odd k in 1..7")
    check_int8(w)
    if stride < 1 or not (0 <= pad_top < k and 0 <= pad_left < k):
        raise ValueError(f"bad stride/padding {stride}, ({pad_top}, {pad_left}) for k={k}")
    if not 0 <= int(zx) <= 255:
        raise ValueError(f"zero point {zx} outside [0, 255]")
    check_clamp(lo, hi)
    check_finite(mult)
    if Ho < 1 or Wo < 1 or (Ho - 1) * stride - pad_top >= H or (Wo - 1) * stride - pad_left >= W:
        raise ValueError(f"output {Ho}x{Wo} does not fit input {H}x{W} with stride {stride}")
    wq, bp, mp, run = prepare_depthwise(w, bias, zx, mult, stride, impl)
    Cp = pad_to(C, CH_ALIGN)
    patch = np.zeros((numba.config.NUMBA_NUM_THREADS, k * k * Cp), np.uint8)
    if pad_input is None:
        pad_input = pads_input(k, stride, pad_top, pad_left, H, W, Ho, Wo, impl)
    Hp = max((Ho - 1) * stride + k, pad_top + H) if pad_input else 0
    Wp = max((Wo - 1) * stride + k, pad_left + W) if pad_input else 0
    return DepthwisePlan(C, k, int(stride), int(pad_top), int(pad_left), int(H), int(W), int(Ho),
                         int(Wo), Cp, np.uint8(zx), wq, bp, mp, *quant.round_constants(zp_out, rule),
                         np.float32(lo), np.float32(hi), patch, bool(pad_input), int(Hp), int(Wp),
                         run, impl)
