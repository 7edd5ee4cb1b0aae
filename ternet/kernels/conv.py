"""Dense k x k conv (the stem: 3x3 stride 2, Cin = 3), reference and im2col + pointwise GEMM.

Definition: acc[n, oy, ox, o] = bias[o] + sum_{ky,kx,ci valid} w[o, ky, kx, ci] * (x[n, iy, ix, ci] - zx),
iy = oy * stride - pad_top + ky, ix = ox * stride - pad_left + kx; taps outside the image contribute
zero real value (padding with zx), then `quant.requant_ref`.

Kernel: `im2col_u8` writes one row of k*k*Cin bytes per output pixel, in (ky, kx, ci) order (that
of `w.reshape(Cout, -1)`), filling out-of-image taps with zx. The conv is then exactly a pointwise
layer over those rows with the zero point folded into the bias as usual, so the pointwise kernels
(VNNI etc.) do the arithmetic.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import prange

from .. import quant
from ._jit import U, kernel, num_threads
from .layout import CH_ALIGN, ROW_SLACK, pad_to
from .limits import IM2COL_PAR_MIN_BYTES as PAR_MIN_BYTES
from .limits import I32_MAX


# ---------------------------------------------------------------------------------------------
# Reference

def tap_windows(x, zx, k, stride, pad_top, pad_left, Ho, Wo):
    """Yield (ky, kx, int64 [N,Ho,Wo,C] window of x - zx) for every tap of a k x k conv: x is padded
    explicitly with its zero point (real value 0); rows/cols the output never reaches are cropped."""
    N, H, W, C = x.shape
    Hn, Wn = (Ho - 1) * stride + k, (Wo - 1) * stride + k
    xp = np.full((N, max(Hn, pad_top + H), max(Wn, pad_left + W), C), zx, np.int64)
    xp[:, pad_top:pad_top + H, pad_left:pad_left + W] = x
    xp -= np.int64(zx)
    for ky in range(k):
        for kx in range(k):
            yield ky, kx, xp[:, ky:ky + stride * (Ho - 1) + 1:stride, kx:kx + stride * (Wo - 1) + 1:stride]


def conv_acc_ref(x, zx, w, bias, stride, pad_top, pad_left, Ho, Wo) -> np.ndarray:
    """int32 accumulators: x u8[N,H,W,Cin], w i8[Cout,k,k,Cin], bias i32[Cout] -> i32[N,Ho,Wo,Cout]."""
    x = np.asarray(x)
    N, H, W, Cin = x.shape
    Cout, k = w.shape[0], w.shape[1]
    assert w.shape == (Cout, k, k, Cin)
    acc = np.zeros((N, Ho, Wo, Cout), np.int64) + np.asarray(bias, np.int64)
    w64 = np.asarray(w, np.int64)
    for ky, kx, win in tap_windows(x, zx, k, stride, pad_top, pad_left, Ho, Wo):
        acc += win @ w64[:, ky, kx, :].T
    assert np.all(np.abs(acc) <= I32_MAX), "accumulator overflows int32"
    return acc.astype(np.int32)


def conv_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pad_top, pad_left, Ho, Wo,
             rule="ternet"):
    """x u8[N,H,W,Cin], w i8[Cout,k,k,Cin], bias i32[Cout], mult f32[Cout] -> u8[N,Ho,Wo,Cout]
    (quant.RULES rule)."""
    acc = conv_acc_ref(x, zx, w, bias, stride, pad_top, pad_left, Ho, Wo)
    return quant.requant_ref(acc, mult, zp_out, lo, hi, rule)


# ---------------------------------------------------------------------------------------------
# im2col

@kernel(inline="always")
def _copy16(src, so, dst, do):
    """dst[do:do+16] = src[so:so+16]: all loads before all stores, so LLVM's SLP vectoriser makes it
    one 16-byte load and one 16-byte store (a byte loop would stay scalar: numba arrays may alias)."""
    a0, a1, a2, a3 = src[so], src[so + U(1)], src[so + U(2)], src[so + U(3)]
    a4, a5, a6, a7 = src[so + U(4)], src[so + U(5)], src[so + U(6)], src[so + U(7)]
    a8, a9, a10, a11 = src[so + U(8)], src[so + U(9)], src[so + U(10)], src[so + U(11)]
    a12, a13, a14, a15 = src[so + U(12)], src[so + U(13)], src[so + U(14)], src[so + U(15)]
    dst[do], dst[do + U(1)], dst[do + U(2)], dst[do + U(3)] = a0, a1, a2, a3
    dst[do + U(4)], dst[do + U(5)], dst[do + U(6)], dst[do + U(7)] = a4, a5, a6, a7
    dst[do + U(8)], dst[do + U(9)], dst[do + U(10)], dst[do + U(11)] = a8, a9, a10, a11
    dst[do + U(12)], dst[do + U(13)], dst[do + U(14)], dst[do + U(15)] = a12, a13, a14, a15


@kernel(inline="always")
def _zero16(dst, do):
    """dst[do:do+16] = 0 (one 16-byte store after SLP vectorisation)."""
    z = np.uint8(0)
    dst[do], dst[do + U(1)], dst[do + U(2)], dst[do + U(3)] = z, z, z, z
    dst[do + U(4)], dst[do + U(5)], dst[do + U(6)], dst[do + U(7)] = z, z, z, z
    dst[do + U(8)], dst[do + U(9)], dst[do + U(10)], dst[do + U(11)] = z, z, z, z
    dst[do + U(12)], dst[do + U(13)], dst[do + U(14)], dst[do + U(15)] = z, z, z, z


@kernel(inline="always")
def _im2col_px(xf, n, iy0, ix0, H, W, Cin, k, zu, cf, co, Kp):
    """One cols row, tap by tap (exact: writes columns [0, Kp) of this row only)."""
    for ky in range(k):
        iy = iy0 + ky
        for kx in range(k):
            ix = ix0 + kx
            cb = co + U((ky * k + kx) * Cin)
            if 0 <= iy < H and 0 <= ix < W:
                xt = U(((n * H + iy) * W + ix) * Cin)
                for ci in range(U(Cin)):
                    cf[cb + ci] = xf[xt + ci]
            else:
                for ci in range(U(Cin)):
                    cf[cb + ci] = zu
    for j in range(U(k * k * Cin), U(Kp)):
        cf[co + j] = 0


@kernel(inline="always")
def _fast_run(xf, xo, xs, rs, cf, co, kpu, kc, npx, k):
    """npx consecutive interior pixels of one output row (see im2col_u8's fast path)."""
    for i in range(npx):
        xi, ci = xo + i * xs, co + i * kpu
        for ky in range(k):
            _copy16(xf, xi + U(ky) * rs, cf, ci + U(ky) * kc)
        _zero16(cf, ci + U(k) * kc)


@kernel(inline="always")
def _im2col_rows(x, zx, k, stride, pad_top, pad_left, Ho, Wo, cols, g0, g1, limit):
    """im2col_u8 for output rows g = n * Ho + oy in [g0, g1); fast-path stores never spill into
    cols rows >= limit (each pixel's row spills at most into the next pixel's, see im2col_u8)."""
    N, H, W, Cin = x.shape
    Kp = cols.shape[1]
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    kc = k * Cin
    zu = np.uint8(zx)
    fast = kc <= 16 and Kp >= 16 and Kp - k * kc <= 16
    rs, xs, kpu = U(W * Cin), U(stride * Cin), U(Kp)
    # columns whose windows lie inside the image horizontally: ox*s - pl >= 0, ox*s - pl + k <= W
    ox_lo = min(Wo, (pad_left + stride - 1) // stride)
    ox_hi = max(ox_lo, min(Wo, (W - k + pad_left) // stride + 1))
    for g in range(g0, g1):
        n, oy = g // Ho, g % Ho
        iy0 = oy * stride - pad_top
        r0 = g * Wo
        a, b = Wo, Wo                                      # fast-path columns [a, b)
        if fast and iy0 >= 0 and iy0 + k <= H:
            a, b = ox_lo, ox_hi
            # the last pixel may neither read past x nor spill past row limit - 1
            last = (n * H + iy0 + k - 1) * W - pad_left            # tap (k-1, 0) of column 0
            while b > a and (last + (b - 1) * stride) * Cin + 16 > xf.size:
                b -= 1
            if b > a and r0 + b >= limit:
                b -= 1
        for ox in range(a):
            _im2col_px(xf, n, iy0, ox * stride - pad_left, H, W, Cin, k, zu, cf, U((r0 + ox) * Kp), Kp)
        if b > a:
            xo = U(((n * H + iy0) * W + a * stride - pad_left) * Cin)
            co = U((r0 + a) * Kp)
            if k == 3:      # the stem: taps unrolled (k constant after inlining)
                _fast_run(xf, xo, xs, rs, cf, co, kpu, U(kc), U(b - a), 3)
            else:
                _fast_run(xf, xo, xs, rs, cf, co, kpu, U(kc), U(b - a), k)
        for ox in range(max(a, b), Wo):
            _im2col_px(xf, n, iy0, ox * stride - pad_left, H, W, Cin, k, zu, cf, U((r0 + ox) * Kp), Kp)


@kernel()
def im2col_u8(x, zx, k, stride, pad_top, pad_left, Ho, Wo, cols):
    """x u8[N,H,W,Cin] -> cols u8[rows >= N*Ho*Wo, Kp]: row n*Ho*Wo + oy*Wo + ox holds the k x k x Cin
    window in (ky, kx, ci) order, zx outside the image, 0 in columns [k*k*Cin, Kp). May write up to
    15 bytes of row N*Ho*Wo if it exists (the ROW_SLACK rows); nothing else past the last real row.

    Fast path (window inside the image, k*Cin <= 16 <= Kp <= k*k*Cin + 16): each kernel row is
    k*Cin contiguous bytes of x, copied as 16 bytes, then 16 zero bytes at column k*k*Cin. The extra
    bytes of each store land where a later store overwrites them (the next kernel row, the zero
    tail, or the next pixel's row: pixels go in ascending order), so only row N*Ho*Wo can keep
    stray bytes. Never reads past the end of x."""
    _im2col_rows(x, zx, k, stride, pad_top, pad_left, Ho, Wo, cols, 0, x.shape[0] * Ho, cols.shape[0])


@kernel(parallel=True)
def im2col_u8_par(x, zx, k, stride, pad_top, pad_left, Ho, Wo, cols, nchunks):
    """im2col_u8 with the output rows split into nchunks blocks over numba's threads (the same
    bytes: a block's last pixel never spills into the next block's rows, only the last block's
    may spill into row N*Ho*Wo). Splitting by rows like the GEMM after it keeps each thread's
    cols rows in its own core's cache."""
    G = x.shape[0] * Ho
    for c in prange(nchunks):
        g0, g1 = c * G // nchunks, (c + 1) * G // nchunks
        limit = g1 * Wo if c < nchunks - 1 else cols.shape[0]
        _im2col_rows(x, zx, k, stride, pad_top, pad_left, Ho, Wo, cols, g0, g1, limit)


# ---------------------------------------------------------------------------------------------
# Plan

@dataclasses.dataclass(frozen=True, eq=False)
class RefPointwise:
    """Stand-in pointwise plan (impl="ref"): numpy GEMM with the pointwise contract. For tests and
    for running without the optimised kernels; slow."""
    w: np.ndarray
    bias: np.ndarray
    zx: int
    mult: np.ndarray
    zp_out: int
    lo: int
    hi: int
    cin_p: int
    cout_p: int
    rule: str = "ternet"

    def __call__(self, x, P, out):
        cout, cin = self.w.shape
        acc = (x[:P, :cin].astype(np.int64) - self.zx) @ self.w.T.astype(np.int64) + self.bias
        out[:P, :cout] = quant.requant_ref(acc.astype(np.int32), self.mult, self.zp_out, self.lo,
                                           self.hi, self.rule)
        out[:P, cout:] = quant.requant_ref(np.zeros((P, self.cout_p - cout), np.int32), 0, self.zp_out,
                                           self.lo, self.hi, self.rule)


def _pointwise_plan(w2, bias, zx, mult, zp_out, lo, hi, impl, rule):
    if impl == "ref":
        cout, cin = w2.shape
        return RefPointwise(np.asarray(w2, np.int8), np.asarray(bias, np.int32), int(zx),
                            np.asarray(mult, np.float32), int(zp_out), int(lo), int(hi),
                            pad_to(cin, CH_ALIGN), pad_to(cout, CH_ALIGN), rule)
    from .pointwise import make_pointwise     # noqa: PLC0415 (pointwise imports numba kernels lazily)
    if impl is None:
        from .cpu import pointwise_kernel   # noqa: PLC0415
        impl = pointwise_kernel(ternary=False)
    return make_pointwise(w2, bias, zx, mult, zp_out, lo, hi, impl, rule)


@dataclasses.dataclass(frozen=True, eq=False)
class ConvPlan:
    """A prepared k x k conv; `plan(x4d, out2d)` runs it (see make_conv).

    Scratch: the im2col buffer u8[N*Ho*Wo + ROW_SLACK, Kp] is allocated on the first call with a
    batch of N images and kept; a later call with a larger batch replaces it by a larger one (never
    shrinks), so steady-state calls allocate nothing. One call at a time per plan."""
    cin: int
    cout: int
    k: int
    stride: int
    pad_top: int
    pad_left: int
    H: int
    W: int
    Ho: int
    Wo: int
    kp: int
    zx: int
    pw: object = dataclasses.field(repr=False)
    _scratch: dict = dataclasses.field(default_factory=dict, repr=False)

    def cols(self, n):
        """The im2col buffer for a batch of n images (rows >= n*Ho*Wo + ROW_SLACK)."""
        rows = n * self.Ho * self.Wo + ROW_SLACK
        buf = self._scratch.get("cols")
        if buf is None or buf.shape[0] < rows:
            buf = self._scratch["cols"] = np.zeros((rows, self.kp), np.uint8)
        return buf

    def __call__(self, x4d, out2d):
        """x4d u8[N,H,W,Cin] (contiguous; Cin unpadded) -> rows [0, N*Ho*Wo) of
        out2d u8[rows >= N*Ho*Wo + ROW_SLACK, Cout_p]; rows past that may get pointwise slack bytes."""
        if x4d.shape[1:] != (self.H, self.W, self.cin) or x4d.dtype != np.uint8:
            raise ValueError(f"expected x u8[N, {self.H}, {self.W}, {self.cin}], got {x4d.dtype} {x4d.shape}")
        if not x4d.flags.c_contiguous:
            raise ValueError("x must be C-contiguous")
        n = x4d.shape[0]
        P = n * self.Ho * self.Wo
        cols = self.cols(n)
        if P:
            threads = num_threads() if P * self.kp >= PAR_MIN_BYTES else 1
            if threads > 1:
                im2col_u8_par(x4d, self.zx, self.k, self.stride, self.pad_top, self.pad_left,
                              self.Ho, self.Wo, cols, min(threads, n * self.Ho))
            else:
                im2col_u8(x4d, self.zx, self.k, self.stride, self.pad_top, self.pad_left, self.Ho,
                          self.Wo, cols)
        self.pw(cols, P, out2d)


def make_conv(w, bias, zx, mult, zp_out, lo, hi, stride, pad_top, pad_left, H, W, Ho, Wo,
              impl=None, rule="ternet") -> ConvPlan:
    """Prepare a k x k conv from canonical tensors: w int8 [Cout,k,k,Cin], raw bias int32 [Cout],
    input zero point, mult float32 [Cout], output zero point and clamp bounds, requantization
    rule (quant.RULES); geometry from
    quant.conv_padding. impl: a pointwise impl (vnni|avx2|addonly|plain), None for the best one for
    int8 weights on this CPU, or "ref" (numpy)."""
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[1] != w.shape[2] or w.dtype.kind not in "iu":
        raise ValueError(f"w must be an integer array [Cout, k, k, Cin], got {w.dtype} {w.shape}")
    cout, k, _, cin = w.shape
    if stride < 1 or not (0 <= pad_top < k and 0 <= pad_left < k):
        raise ValueError(f"bad stride/padding {stride}, ({pad_top}, {pad_left}) for k={k}")
    if not 0 <= int(zx) <= 255:
        raise ValueError(f"zero point {zx} outside [0, 255]")
    pw = _pointwise_plan(w.reshape(cout, -1), bias, zx, mult, zp_out, lo, hi, impl, rule)
    return ConvPlan(cin, cout, k, int(stride), int(pad_top), int(pad_left), int(H), int(W), int(Ho),
                    int(Wo), pad_to(k * k * cin, CH_ALIGN), int(zx), pw)
