"""Pointwise (1x1) conv: the numpy reference and the two portable plain-Numba kernels.

Buffers (docs/kernels.md): x u8[rows, cin_p] (NHWC pixels), out u8[rows, cout_p], rows >= P + ROW_SLACK.

* `pw_t2_u8_addonly`: the multiplication-free (PROM) formulation. Each output channel of a ternary
  layer is a list of activation rows to *add*: acc[o] = bias[o] + sum_{w=+1} x_c - sum_{w=-1} x_c,
  and -x_c = ~x_c - 255 with ~x_c = 255 - x_c (bitwise not), the -255s folded into the bias at
  load. So a layer is one list of rows per output (x rows and ~x rows), no signs, no multiplies.
  Non-ternary rows of a hybrid layer take the dense path below inside the same kernel.
* `pw_i8_u8_plain`: dense int8 weights, multiply-accumulate in int32 (int8 layers on CPUs without
  AVX512-VNNI (the AVX2 kernel takes ternary weights only), and the stem's im2col GEMM there).

Both vectorise across pixels, but NHWC stores a pixel's channels together, so both work on pixel
tiles: (1) transpose the tile into channel-major rows `xt[c, j]` (8x8 byte blocks transposed in
uint64 registers, SWAR); (2) per output channel, add (or multiply-add) whole rows, 8 rows per pass
over an accumulator row; (3) requantize the row; (4) every 8 output rows, transpose back to NHWC.
LLVM only vectorises innermost loops, so accumulators live in L1, not registers: a pass over 8
rows amortises one accumulator load/store (research/kernels.md 3.3, 7).

Importing compiles nothing; kernels compile on first call (tile sizes 128 and 64 are separate
specialisations: 7x7 layers would waste 62% of a 128-pixel tile).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from numba import prange

from .. import quant
from ._jit import U, kernel, num_threads
from .cpu import IMPLS
from .layout import CH_ALIGN, ROW_SLACK, check_pw_buffers, pad_to
from .limits import POINTWISE_PAR_MIN_MACS as PAR_MIN_MACS
from .limits import I32_MAX, check_clamp, check_finite, check_headroom, check_int8
from .variants import variant

TILE = 128          # pixels per tile and the row stride of the channel-major scratch
CHUNK = 128         # rows summed in int16 before widening: 128 * 255 = 32640 <= 32767
_U8 = np.dtype(np.uint8)

# SWAR masks for the 8x8 byte transpose (swap bytes, then 16-bit pairs, then 32-bit halves)
_M8 = U(0x00FF00FF00FF00FF)
_M16 = U(0x0000FFFF0000FFFF)
_M32 = U(0x00000000FFFFFFFF)


# ---------------------------------------------------------------------------------------------
# References (canonical tensors: unpadded, zero point explicit)

def pointwise_acc_ref(x, zx, w, bias) -> np.ndarray:
    """x u8[P, Cin], zx int, w i8[Cout, Cin], bias i32[Cout] -> i32[P, Cout] = bias + sum w*(x-zx)."""
    x = np.asarray(x)
    w = np.asarray(w)
    acc = (x.astype(np.int64) - np.int64(zx)) @ w.T.astype(np.int64) + np.asarray(bias, np.int64)
    assert acc.size == 0 or np.abs(acc).max() <= I32_MAX, "accumulator exceeds int32"
    return acc.astype(np.int32)


def pointwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, rule="ternet") -> np.ndarray:
    """x u8[P, Cin], w i8[Cout, Cin], bias i32[Cout], mult f32[Cout] -> u8[P, Cout] (quant.py rule)."""
    return quant.requant_ref(pointwise_acc_ref(x, zx, w, bias), mult, zp_out, lo, hi, rule)


# ---------------------------------------------------------------------------------------------
# Kernels

@kernel(inline="always")
def _tr8(a0, a1, a2, a3, a4, a5, a6, a7):
    """Transpose the 8x8 byte matrix held in 8 uint64 (byte b of word i -> byte i of word b)."""
    t = ((a0 >> U(8)) ^ a1) & _M8
    a1 ^= t
    a0 ^= t << U(8)
    t = ((a2 >> U(8)) ^ a3) & _M8
    a3 ^= t
    a2 ^= t << U(8)
    t = ((a4 >> U(8)) ^ a5) & _M8
    a5 ^= t
    a4 ^= t << U(8)
    t = ((a6 >> U(8)) ^ a7) & _M8
    a7 ^= t
    a6 ^= t << U(8)
    t = ((a0 >> U(16)) ^ a2) & _M16
    a2 ^= t
    a0 ^= t << U(16)
    t = ((a1 >> U(16)) ^ a3) & _M16
    a3 ^= t
    a1 ^= t << U(16)
    t = ((a4 >> U(16)) ^ a6) & _M16
    a6 ^= t
    a4 ^= t << U(16)
    t = ((a5 >> U(16)) ^ a7) & _M16
    a7 ^= t
    a5 ^= t << U(16)
    t = ((a0 >> U(32)) ^ a4) & _M32
    a4 ^= t
    a0 ^= t << U(32)
    t = ((a1 >> U(32)) ^ a5) & _M32
    a5 ^= t
    a1 ^= t << U(32)
    t = ((a2 >> U(32)) ^ a6) & _M32
    a6 ^= t
    a2 ^= t << U(32)
    t = ((a3 >> U(32)) ^ a7) & _M32
    a7 ^= t
    a3 ^= t << U(32)
    return a0, a1, a2, a3, a4, a5, a6, a7


class Lists(NamedTuple):
    """A layer's weights as index lists (see _lists_ternary, _lists_dense). Per output o: dense list
    dptr[o]:dptr[o+1] of (row drows, weight dw) in groups of 4, else ternary chunks
    tptr[o]:tptr[o+1], each a range tchunks[k] of trows (<= CHUNK real rows, padded to 4 with the
    zero row); compl: some ternary row has a -1 (the ~x rows are needed)."""
    tptr: object
    tchunks: object
    trows: object
    dptr: object
    drows: object
    dw: object
    compl: object


class Requant(NamedTuple):
    """The epilogue's parameters: bias i32[cout_p] (zero point folded), mult f32[cout_p], zph, zpc
    (quant.round_constants), lo, hi f32 (quant.requant_ref)."""
    bias: object
    mult: object
    zph: object
    zpc: object
    lo: object
    hi: object


class Scratch(NamedTuple):
    """One thread's scratch: xt u8[(2*cin_p + 1) * TILE] rows of TL bytes: x_c (c < cin_p), ~x_c
    (cin_p + c), a zero row (2*cin_p, cleared by _pw_tiles); acc16 i16[TILE]; acc32 i32[TILE];
    yt u8[8 * TILE] (8 output rows of TL bytes)."""
    xt: object
    acc16: object
    acc32: object
    yt: object


@kernel(inline="always")
def _store8(a, d, s, words):
    """a[d + i*s] = words[i] for the 8 words (all loaded before: the transposes run in place)."""
    b0, b1, b2, b3, b4, b5, b6, b7 = words
    a[d] = b0
    a[d + s] = b1
    a[d + U(2) * s] = b2
    a[d + U(3) * s] = b3
    a[d + U(4) * s] = b4
    a[d + U(5) * s] = b5
    a[d + U(6) * s] = b6
    a[d + U(7) * s] = b7


@kernel(inline="always")
def _offsets8(rows, a, rs):
    """Scratch offsets of the 8 rows rows[a:a+8], rs bytes apart."""
    return (U(rows[a]) * rs, U(rows[a + U(1)]) * rs, U(rows[a + U(2)]) * rs, U(rows[a + U(3)]) * rs,
            U(rows[a + U(4)]) * rs, U(rows[a + U(5)]) * rs, U(rows[a + U(6)]) * rs,
            U(rows[a + U(7)]) * rs)


@kernel()
def _pw_tiles(x, P, p_start, ntiles, lists, rq, out, out32, scratch, TL):
    """Pixel tiles [p_start + t*TL, +TL), t < ntiles, clipped to the 8-pixel groups that hold rows < P,
    of the layer `lists` (Lists), `rq` (Requant), with `scratch` (Scratch). Results go to out
    u8[rows, cout_p] or, if out32 has rows (tests), to out32 i32[rows, cout_p] as int32
    accumulators. TL (tile length) is a compile-time literal; every other flag is a runtime value
    so that all drivers share the two compiled specialisations."""
    tptr, tchunks, trows, dptr, drows, dw, compl = lists
    bias, mult, zph, zpc, lo, hi = rq
    xt, acc16, acc32, yt = scratch
    I32 = out32.shape[0] > 0
    x64 = x.view(np.uint64)         # [rows, cin_p/8]: 8 channels of one pixel per word
    xt64 = xt.view(np.uint64)       # rows of TL/8 words: 8 pixels of one channel per word
    yt64 = yt.view(np.uint64)       # 8 rows of TL/8 words
    out64 = out.view(np.uint64)     # [rows, cout_p/8] (u8 output)
    kw = U(x64.shape[1])
    cin_p = U(8) * kw
    ngo = U(bias.shape[0] // 8)     # 8-channel output groups
    tl = U(TL)                      # unsigned loop bounds: j indexes without sign checks
    rs = U(TL)                      # scratch row stride (bytes): compact rows for small tiles
    ws = U(TL // 8)                 # scratch row stride (words)
    tw = U(TL // 8)                 # yt row stride (words)
    u1, u2, u3, u4, u5, u6, u7, u8 = U(1), U(2), U(3), U(4), U(5), U(6), U(7), U(8)
    flo = np.float32(lo)
    fhi = np.float32(hi)
    z = U(2) * cin_p * rs           # the zero row: rows of another TL may have overlapped it
    for j in range(tl):
        xt[z + j] = 0
    for tile in range(U(ntiles)):
        p0 = U(p_start) + tile * tl
        nvalid = min(tl, U(P) - p0)
        ngrp = (nvalid + u7) // u8      # rows up to ceil8(P) <= P + 7: inside ROW_SLACK
        # (1) NHWC tile -> channel-major rows
        for g in range(ngrp):
            r = p0 + u8 * g
            for k in range(kw):
                _store8(xt64, u8 * k * ws + g, ws, _tr8(
                    x64[r, k], x64[r + u1, k], x64[r + u2, k], x64[r + u3, k],
                    x64[r + u4, k], x64[r + u5, k], x64[r + u6, k], x64[r + u7, k]))
        if compl:       # ~x rows: subtracting x_c becomes adding ~x_c (the -255 is in the bias)
            for c in range(cin_p):
                s = c * rs
                d = (cin_p + c) * rs
                for j in range(tl):
                    xt[d + j] = xt[s + j] ^ np.uint8(255)
        for og in range(ngo):
            for oo in range(u8):
                o = u8 * og + oo
                bo = bias[o]
                src = 2         # where the result is: 0 bias only, 1 bias + acc16, 2 acc32
                a = dptr[o]
                e = dptr[o + u1]
                if a < e:       # dense row: int32 multiply-accumulate, 4 rows per pass
                    for j in range(tl):     # (8 rows per pass measured slower here)
                        acc32[j] = bo
                    while a < e:
                        r0 = U(drows[a]) * rs
                        r1 = U(drows[a + u1]) * rs
                        r2 = U(drows[a + u2]) * rs
                        r3 = U(drows[a + u3]) * rs
                        # int16 weights: LLVM sees 16-bit factors and uses vpmaddwd
                        w0 = np.int32(dw[a])
                        w1 = np.int32(dw[a + u1])
                        w2 = np.int32(dw[a + u2])
                        w3 = np.int32(dw[a + u3])
                        for j in range(tl):     # |acc| < 2**31: the loader checks the bound
                            acc32[j] = np.int32(acc32[j] + ((np.int32(xt[r0 + j]) * w0
                                                             + np.int32(xt[r1 + j]) * w1)
                                                            + (np.int32(xt[r2 + j]) * w2
                                                               + np.int32(xt[r3 + j]) * w3)))
                        a += u4
                else:
                    k0 = tptr[o]
                    k1 = tptr[o + u1]
                    src = 0 if k1 == k0 else (1 if k1 == k0 + u1 and not I32 else 2)
                    for k in range(k0, k1):
                        a = tchunks[k, 0]
                        e = tchunks[k, 1]
                        # int16 partial sum of <= CHUNK rows of u8: 0 <= acc16 <= 128*255 = 32640
                        # (LLVM narrows the u8 sums to 16-bit lanes: the store truncates them)
                        if a + u8 <= e:     # the first pass stores instead of adding
                            r0, r1, r2, r3, r4, r5, r6, r7 = _offsets8(trows, a, rs)
                            for j in range(tl):
                                acc16[j] = np.int16(((xt[r0 + j] + xt[r1 + j]) + (xt[r2 + j] + xt[r3 + j]))
                                                    + ((xt[r4 + j] + xt[r5 + j]) + (xt[r6 + j] + xt[r7 + j])))
                            a += u8
                        else:
                            for j in range(tl):
                                acc16[j] = 0
                        while a + u8 <= e:
                            r0, r1, r2, r3, r4, r5, r6, r7 = _offsets8(trows, a, rs)
                            for j in range(tl):
                                acc16[j] = np.int16(acc16[j] + (((xt[r0 + j] + xt[r1 + j]) + (xt[r2 + j] + xt[r3 + j]))
                                                                + ((xt[r4 + j] + xt[r5 + j]) + (xt[r6 + j] + xt[r7 + j]))))
                            a += u8
                        if a < e:           # chunks are padded to a multiple of 4 rows
                            r0 = U(trows[a]) * rs
                            r1 = U(trows[a + u1]) * rs
                            r2 = U(trows[a + u2]) * rs
                            r3 = U(trows[a + u3]) * rs
                            for j in range(tl):
                                acc16[j] = np.int16(acc16[j] + ((xt[r0 + j] + xt[r1 + j]) + (xt[r2 + j] + xt[r3 + j])))
                        if src == 2:    # widen: acc32 = bias + sum of chunks (int32 wraps mod 2**32
                            if k == k0:  # like any int32 sum; the final value fits: loader check)
                                for j in range(tl):
                                    acc32[j] = np.int32(bo + acc16[j])
                            else:
                                for j in range(tl):
                                    acc32[j] = np.int32(acc32[j] + acc16[j])
                    if src == 0 and I32:
                        for j in range(tl):
                            acc32[j] = bo
                        src = 2
                if I32:
                    for j in range(nvalid):
                        out32[p0 + j, o] = acc32[j]
                    continue
                # (3) requantize (quant.py rule: float32 mul, then the two adds of
                # quant.round_constants, no FMA; clamp; floor == trunc because the clamped value
                # is >= lo >= 0)
                m = mult[o]
                yo = oo * tl
                if src == 1:
                    for j in range(tl):
                        v = (np.float32(np.int32(bo + acc16[j])) * m + zph) + zpc
                        yt[yo + j] = np.uint8(min(max(v, flo), fhi))
                elif src == 2:
                    for j in range(tl):
                        v = (np.float32(acc32[j]) * m + zph) + zpc
                        yt[yo + j] = np.uint8(min(max(v, flo), fhi))
                else:
                    v = min(max((np.float32(bo) * m + zph) + zpc, flo), fhi)
                    for j in range(tl):
                        yt[yo + j] = np.uint8(v)
            if I32:
                continue
            # (4) 8 requantized rows -> NHWC. The 8x8 transposes run in place in yt (word g of
            # each row holds pixel group g), a loop LLVM vectorises across g; then each word
            # (8 channels of a pixel) is stored to its output row.
            for g in range(ngrp):
                _store8(yt64, g, tw, _tr8(
                    yt64[g], yt64[g + tw], yt64[g + u2 * tw], yt64[g + u3 * tw],
                    yt64[g + u4 * tw], yt64[g + u5 * tw], yt64[g + u6 * tw], yt64[g + u7 * tw]))
            for g in range(ngrp):
                r = p0 + u8 * g
                out64[r, og] = yt64[g]
                out64[r + u1, og] = yt64[g + tw]
                out64[r + u2, og] = yt64[g + u2 * tw]
                out64[r + u3, og] = yt64[g + u3 * tw]
                out64[r + u4, og] = yt64[g + u4 * tw]
                out64[r + u5, og] = yt64[g + u5 * tw]
                out64[r + u6, og] = yt64[g + u6 * tw]
                out64[r + u7, og] = yt64[g + u7 * tw]


@kernel()
def _pw_range(x, P, p0, p1, lists, rq, out, out32, scratch):
    """Pixels [p0, p1), p0 a multiple of TILE, p1 a multiple of TILE or P: 128-pixel tiles, but
    a tail of <= 64 pixels (e.g. 7x7 = 49) takes a 64-pixel tile (a 128 one would waste 62%)."""
    n = (p1 - p0) // TILE
    r = p1 - p0 - n * TILE
    if r > 64:
        n += 1
        r = 0
    if n > 0:
        _pw_tiles(x, P, p0, n, lists, rq, out, out32, scratch, 128)
    if r > 0:       # ntiles = 1 as a runtime value: a literal 1 would compile another copy
        _pw_tiles(x, P, p0 + n * TILE, (r + 63) // 64, lists, rq, out, out32, scratch, 64)


@kernel(inline="always")
def _dense_lists(dptr, drows, dw, work):
    """Lists of a layer without ternary rows."""
    compl = work.shape[0] < 0       # False, but not a literal (that would compile its own copy)
    return Lists(np.zeros(dptr.shape[0], np.uint64), np.zeros((1, 2), np.uint64),
                 np.zeros(1, np.uint16), dptr, drows, dw, compl)


def _drivers(out: str, par: bool):
    """The add-only and plain drivers `pw_t2_<out>_addonly[_par]`, `pw_i8_<out>_plain[_par]`:
    x u8[rows, cin_p] -> out u8[rows, cout_p] (out="i32": the int32 accumulators, bias included,
    a testing aid) over the pixel ranges work i64[n, 2] (starts multiples of TILE). The arguments
    after x and P: the fields of Lists (plain: only the dense ones), of Requant, out, of Scratch
    (1-D; par: [threads, ...], range t on a thread of its own with scratch row t), work."""
    i32 = out == "i32"
    sfx = "_par" if par else ""

    def addonly(x, P, tptr, tchunks, trows, dptr, drows, dw, bias, mult, zph, zpc, lo, hi, compl, out, xt,
                acc16, acc32, yt, work):
        lists = Lists(tptr, tchunks, trows, dptr, drows, dw, compl)
        outs = (np.zeros((0, 8), np.uint8), out) if i32 else (out, np.zeros((0, 1), np.int32))
        for t in prange(work.shape[0]):
            scratch = Scratch(xt[t], acc16[t], acc32[t], yt[t]) if par else Scratch(xt, acc16, acc32, yt)
            _pw_range(x, P, work[t, 0], work[t, 1], lists, Requant(bias, mult, zph, zpc, lo, hi), outs[0],
                      outs[1], scratch)

    def plain(x, P, dptr, drows, dw, bias, mult, zph, zpc, lo, hi, out, xt, acc16, acc32, yt, work):
        lists = _dense_lists(dptr, drows, dw, work)
        outs = (np.zeros((0, 8), np.uint8), out) if i32 else (out, np.zeros((0, 1), np.int32))
        for t in prange(work.shape[0]):
            scratch = Scratch(xt[t], acc16[t], acc32[t], yt[t]) if par else Scratch(xt, acc16, acc32, yt)
            _pw_range(x, P, work[t, 0], work[t, 1], lists, Requant(bias, mult, zph, zpc, lo, hi), outs[0],
                      outs[1], scratch)

    return (variant(addonly, f"pw_t2_{out}_addonly{sfx}", __name__, parallel=par),
            variant(plain, f"pw_i8_{out}_plain{sfx}", __name__, parallel=par))


pw_t2_u8_addonly, pw_i8_u8_plain = _drivers("u8", False)
pw_t2_u8_addonly_par, pw_i8_u8_plain_par = _drivers("u8", True)
pw_t2_i32_addonly, pw_i8_i32_plain = _drivers("i32", False)
# impl -> (serial, parallel, int32-output serial)
DRIVERS = {"addonly": (pw_t2_u8_addonly, pw_t2_u8_addonly_par, pw_t2_i32_addonly),
           "plain": (pw_i8_u8_plain, pw_i8_u8_plain_par, pw_i8_i32_plain)}


# ---------------------------------------------------------------------------------------------
# Load-time preparation and the plans

def _lists_dense(w, rows_of, zero_row, sel):
    """(ptr u64[Cout_p+1], rows u16, weights i16) of the nonzero weights of rows `sel`, 4 per group."""
    cout_p = len(sel)
    ptr = np.zeros(cout_p + 1, np.uint64)
    rows, wts = [], []
    for o in range(cout_p):
        if sel[o]:
            cs = np.flatnonzero(w[o])
            pad = -len(cs) % 4
            rows.append(np.concatenate([rows_of[cs], np.full(pad, zero_row)]))
            wts.append(np.concatenate([w[o, cs], np.zeros(pad, np.int64)]))
            ptr[o + 1] = ptr[o] + len(cs) + pad
        else:
            ptr[o + 1] = ptr[o]
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    return ptr, cat(rows, np.uint16), cat(wts, np.int16)


def _lists_ternary(w, cin_p, sel):
    """Index lists of the ternary rows `sel`: (ptr u64[Cout_p+1] into chunks, chunks u64[n, 2]
    ranges of rows u16 (x_c = c, ~x_c = cin_p + c, zero row 2*cin_p), n_minus i64[Cout_p])."""
    cout_p = len(sel)
    zero_row = 2 * cin_p
    ptr = np.zeros(cout_p + 1, np.uint64)
    nminus = np.zeros(cout_p, np.int64)
    chunks, rows = [], []
    n = 0
    for o in range(cout_p):
        if sel[o]:
            plus, minus = np.flatnonzero(w[o] == 1), np.flatnonzero(w[o] == -1)
            nminus[o] = len(minus)
            # sorted by channel: x_c before ~x_c; the chunking keeps each partial sum <= CHUNK rows
            r = np.concatenate([plus, cin_p + minus])
            for s in range(0, len(r), CHUNK):
                part = r[s:s + CHUNK]
                part = np.concatenate([part, np.full(-len(part) % 4, zero_row)])
                chunks.append((n, n + len(part)))
                rows.append(part)
                n += len(part)
        ptr[o + 1] = len(chunks)
    chunks = np.array(chunks, np.uint64).reshape(-1, 2)
    rows = np.concatenate(rows).astype(np.uint16) if rows else np.zeros(0, np.uint16)
    return ptr, chunks, rows, nminus


def _check_layer(w, mult, lo, hi):
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind not in "iu":
        raise ValueError(f"w must be a 2-D integer array [Cout, Cin], got {w.dtype} {w.shape}")
    check_int8(w)
    check_finite(mult)
    check_clamp(lo, hi)
    cout, cin = w.shape
    if 2 * pad_to(cin, CH_ALIGN) + 1 > np.iinfo(np.uint16).max:
        raise ValueError(f"Cin={cin} too large for 16-bit row indices")
    return w.astype(np.int64)


def _folded_bias(w, bias, zx):
    """Zero point folded into the bias; the final accumulator is checked to fit int32."""
    bias_f = quant.fold_input_zero_point(np.asarray(bias, np.int32), w, zx)
    check_headroom(w, bias_f, "pointwise")
    return bias_f.astype(np.int64)


def _alloc_scratch(cin_p: int, threads: int) -> tuple:
    """Per-thread scratch (xt, acc16, acc32, yt), [threads, ...] (layout: _pw_tiles)."""
    return (np.zeros((threads, (2 * cin_p + 1) * TILE), np.uint8),
            np.zeros((threads, TILE), np.int16),
            np.zeros((threads, TILE), np.int32),
            np.zeros((threads, 8 * TILE), np.uint8))


def split_work(P: int, threads: int) -> np.ndarray:
    """Pixel ranges i64[n, 2], n <= threads, starts multiples of TILE (only the last has a tail)."""
    tiles = -(-P // TILE)
    n = max(1, min(threads, tiles))
    edges = [TILE * (tiles * i // n) for i in range(n)] + [P]
    return np.array([(edges[i], min(P, edges[i + 1])) for i in range(n)], np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class PwPlainPlan:
    """A prepared pointwise layer for the plain-Numba kernels; `plan(x, P, out)` runs it.

    impl "addonly": ternary rows as index lists (hybrid layers: non-ternary rows dense);
    impl "plain": every row dense. Owns per-thread scratch (allocated by the factory for the
    current numba thread count, grown once if a later call uses more threads), so one plan must
    not run in two Python threads at once."""
    cin: int
    cout: int
    cin_p: int
    cout_p: int
    impl: str
    tptr: np.ndarray = dataclasses.field(repr=False)      # ternary rows: chunk ranges per output
    tchunks: np.ndarray = dataclasses.field(repr=False)   # u64[n, 2] ranges of trows
    trows: np.ndarray = dataclasses.field(repr=False)     # u16 scratch rows to add
    dptr: np.ndarray = dataclasses.field(repr=False)      # dense rows: ranges of drows/dw per output
    drows: np.ndarray = dataclasses.field(repr=False)     # u16
    dw: np.ndarray = dataclasses.field(repr=False)        # i16 weights
    bias: np.ndarray = dataclasses.field(repr=False)      # i32, zero point (and -255s) folded, padded
    mult: np.ndarray = dataclasses.field(repr=False)      # f32, padded with 0
    zph: np.float32 = dataclasses.field(repr=False)      # quant.round_constants
    zpc: np.float32 = dataclasses.field(repr=False)
    lo: np.float32 = dataclasses.field(repr=False)
    hi: np.float32 = dataclasses.field(repr=False)
    compl: bool = dataclasses.field(repr=False)           # some ternary row has a -1
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)   # scratch, work ranges

    def scratch(self, threads: int = 1) -> tuple:
        """(xt, acc16, acc32, yt) with >= `threads` rows each (see Scratch)."""
        s = self._cache.get("scratch")
        if s is None or s[0].shape[0] < threads:
            s = self._cache["scratch"] = _alloc_scratch(self.cin_p, threads)
        return s

    def _check(self, x, P, out, out_dtype):
        check_pw_buffers(x, P, out, self.cin_p, self.cout_p, out_dtype)

    def _args(self) -> tuple:
        """The drivers' arguments between P and out (see _drivers), built once."""
        args = self._cache.get("args")
        if args is None:
            rq = (self.bias, self.mult, self.zph, self.zpc, self.lo, self.hi)
            args = self._cache["args"] = (
                (self.tptr, self.tchunks, self.trows, self.dptr, self.drows, self.dw, *rq, self.compl)
                if self.impl == "addonly" else (self.dptr, self.drows, self.dw, *rq))
        return args

    def _work(self, P, parallel=True):
        """Pixel ranges for P pixels. Small layers never ask for the thread count (1 us)."""
        threads = 1
        if parallel and P * self.cin_p * self.cout_p >= PAR_MIN_MACS:
            threads = num_threads()
        key = (P, threads)
        work = self._cache.get(key)
        if work is None:
            work = self._cache[key] = split_work(P, threads)
        return work

    def __call__(self, x, P, out):
        """x u8[rows, cin_p], out u8[rows, cout_p], rows >= P + ROW_SLACK: requantized rows [0, P)."""
        check_pw_buffers(x, P, out, self.cin_p, self.cout_p, _U8)
        if not P:
            return
        work = self._work(P)
        serial, par, _ = DRIVERS[self.impl]
        xt, a16, a32, yt = self.scratch(len(work))
        if len(work) == 1:
            serial(x, P, *self._args(), out, xt[0], a16[0], a32[0], yt[0], work)
        else:
            par(x, P, *self._args(), out, xt, a16, a32, yt, work)

    def accumulate(self, x, P, acc):
        """Testing aid: int32 accumulators (bias included) of rows [0, P) into acc i32[rows, cout_p]
        (the add-only kernel's -255 offsets and ~x rows cancel: these are the true accumulators)."""
        self._check(x, P, acc, np.dtype(np.int32))
        if not P:
            return
        work = self._work(P, parallel=False)
        xt, a16, a32, yt = self.scratch()
        DRIVERS[self.impl][2](x, P, *self._args(), acc, xt[0], a16[0], a32[0], yt[0], work)


def _make_plain_plan(w, bias, zx, mult, zp_out, lo, hi, impl, rule) -> PwPlainPlan:
    w = _check_layer(w, mult, lo, hi)
    cout, cin = w.shape
    cin_p, cout_p = pad_to(cin, CH_ALIGN), pad_to(cout, CH_ALIGN)
    wp = np.zeros((cout_p, cin_p), np.int64)
    wp[:cout, :cin] = w
    bias_p = np.zeros(cout_p, np.int64)
    bias_p[:cout] = _folded_bias(w, bias, zx)
    ternary = np.all((wp >= -1) & (wp <= 1), axis=1) if impl == "addonly" else np.zeros(cout_p, bool)
    tptr, tchunks, trows, nminus = _lists_ternary(wp, cin_p, ternary)
    dptr, drows, dw = _lists_dense(wp, np.arange(cin_p), 2 * cin_p, ~ternary)
    # -x_c = ~x_c - 255 for every -1 (module doc); stored mod 2**32 like the kernel's int32 sums
    bias_k = ((bias_p - 255 * nminus + 2**31) % 2**32 - 2**31).astype(np.int32)
    mult_p = np.zeros(cout_p, np.float32)
    mult_p[:cout] = np.asarray(mult, np.float32).reshape(-1)
    plan = PwPlainPlan(cin, cout, cin_p, cout_p, impl, tptr, tchunks, trows, dptr, drows, dw,
                       bias_k, mult_p, *quant.round_constants(zp_out, rule), np.float32(lo),
                       np.float32(hi),
                       bool(nminus.any()))
    plan.scratch(num_threads())
    return plan


def make_pw_addonly(w, bias, zx, mult, zp_out, lo, hi, rule="ternet") -> PwPlainPlan:
    """Plan for pw_t2_u8_addonly from canonical tensors: w int8 [Cout, Cin] (ternary rows become
    index lists; other rows, if any, run dense), raw bias int32 [Cout], input zero point zx,
    mult float32 [Cout], output zero point and clamp bounds, requantization rule (see quant.py)."""
    return _make_plain_plan(w, bias, zx, mult, zp_out, lo, hi, "addonly", rule)


def make_pw_plain(w, bias, zx, mult, zp_out, lo, hi, rule="ternet") -> PwPlainPlan:
    """Plan for pw_i8_u8_plain (dense int8) from canonical tensors, arguments as make_pw_addonly."""
    return _make_plain_plan(w, bias, zx, mult, zp_out, lo, hi, "plain", rule)


def make_pointwise(w, bias, zx, mult, zp_out, lo, hi, impl, rule="ternet"):
    """Prepared pointwise layer for kernel family impl in IMPLS (see cpu.pointwise_kernel)."""
    if impl in ("vnni", "avx2", "amx"):
        from .vnni import kernel_isa, make_pw_vnni   # noqa: PLC0415 (LLVM-IR kernels: when asked for)
        return make_pw_vnni(w, bias, zx, mult, zp_out, lo, hi, isa=kernel_isa(impl, np.asarray(w)),
                            rule=rule)
    if impl == "addonly":
        return make_pw_addonly(w, bias, zx, mult, zp_out, lo, hi, rule)
    if impl == "plain":
        return make_pw_plain(w, bias, zx, mult, zp_out, lo, hi, rule)
    raise ValueError(f"unknown pointwise impl {impl!r}; expected one of {IMPLS}")
