"""Residual add, global average pool and the fully connected classifier: references and kernels.

Buffers follow docs/kernels.md: 2-D u8[rows, Cp] activations (rows >= P + ROW_SLACK), channels
padded to CH_ALIGN. These ops are small (memory-bound or one GEMV), so the kernels are plain
vectorised loops, serial. Except the classifier on CPUs with an IR GEMM kernel (VNNI, AVX2): its
int32 sums come from the pointwise micro-kernel (vnni.py), then `scale_i32_f32` makes the logits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import quant
from numba import prange

from ._jit import U, kernel, num_threads
from .layout import CH_ALIGN, ROW_SLACK, pad_to
from .limits import LINEAR_PAR_MIN_MACS as PAR_MIN_MACS
from .limits import I32_MAX, check_clamp, check_headroom


# ---------------------------------------------------------------------------------------------
# Residual add: quant.add_ref is the reference.

@kernel()
def add_u8(a, za, ma, b, zb, mb, zph, lo, hi, out, n):
    """out[:n] = quant.add_ref(a[:n], ..., b[:n], ...) on flat u8 buffers; ma, mb, zph = zp_bias(zp_out),
    lo, hi float32."""
    for i in range(U(n)):
        fa = np.float32(np.int32(np.int32(a[i]) - za)) * ma     # |x - z| <= 255: exact in float32
        fb = np.float32(np.int32(np.int32(b[i]) - zb)) * mb
        v = (fa + fb) + zph                              # this order, no FMA (quant.add_ref)
        v = min(max(v, lo), hi)
        out[i] = np.uint8(v)                             # v >= lo >= 0: truncation is floor


@dataclasses.dataclass(frozen=True, eq=False)
class AddPlan:
    """A prepared residual add; `plan(a, b, P, out)` runs it (see make_add)."""
    za: np.int32
    ma: np.float32
    zb: np.int32
    mb: np.float32
    zph: np.float32
    lo: np.float32
    hi: np.float32

    def __call__(self, a, b, P, out):
        """a, b, out u8[rows, Cp] (same Cp): rows [0, P) of out = a (+) b, nothing else written."""
        cp = out.shape[1]
        if a.shape[1] != cp or b.shape[1] != cp or min(a.shape[0], b.shape[0], out.shape[0]) < P:
            raise ValueError(f"add needs equal widths and >= {P} rows, got {a.shape}, {b.shape}, {out.shape}")
        if a.dtype != np.uint8 or b.dtype != np.uint8 or out.dtype != np.uint8:
            raise TypeError("add operands must be uint8")
        add_u8(a.reshape(-1), self.za, self.ma, b.reshape(-1), self.zb, self.mb, self.zph, self.lo,
               self.hi, out.reshape(-1), P * cp)


def make_add(za, ma, zb, mb, zp_out, lo, hi) -> AddPlan:
    """Residual add with multipliers ma = s_a / s_out, mb = s_b / s_out (quant.add_multipliers)."""
    check_clamp(lo, hi)
    return AddPlan(np.int32(za), np.float32(ma), np.int32(zb), np.float32(mb),
                   quant.zp_bias(zp_out), np.float32(lo), np.float32(hi))


# ---------------------------------------------------------------------------------------------
# Global average pool

pool_multiplier = quant.pool_multiplier     # the rule lives in quant.py


def gap_ref(x, zx, mult, zp_out) -> np.ndarray:
    """x u8[N, HW, C] -> u8[N, C]: acc = sum(x) - HW * zx (int32), requant with scalar mult, no clamp
    beyond [0, 255]."""
    x = np.asarray(x)
    hw = x.shape[1]
    acc = x.astype(np.int64).sum(axis=1) - np.int64(hw) * np.int64(zx)
    assert np.all(np.abs(acc) <= I32_MAX)
    return quant.requant_ref(acc.astype(np.int32), np.float32(mult), zp_out, quant.QMIN, quant.QMAX)


@kernel()
def gap_u8(x, zx, mult, zph, out, acc):
    """x u8[N, HW, Cp] -> out u8[N, Cp] (rows [0, N) written); acc i32[Cp] scratch.
    Headroom: |acc| <= 255 * HW."""
    N, HW, Cp = x.shape
    lo, hi = np.float32(0), np.float32(255)
    bias = np.int32(-HW * np.int32(zx))
    for n in range(N):
        for c in range(U(Cp)):
            acc[c] = bias
        for p in range(HW):
            for c in range(U(Cp)):                       # channels innermost: contiguous, vectorised
                acc[c] += np.int32(x[n, p, c])
        for c in range(U(Cp)):
            v = np.float32(acc[c]) * mult
            v = v + zph
            v = min(max(v, lo), hi)
            out[n, c] = np.uint8(v)


@dataclasses.dataclass(frozen=True, eq=False)
class GapPlan:
    """A prepared global average pool; `plan(x3d, out)` runs it. Holds an int32[Cp] scratch,
    so one call at a time per plan."""
    hw: int
    cp: int
    zx: np.uint8
    mult: np.float32
    zph: np.float32
    acc: np.ndarray = dataclasses.field(repr=False)

    def __call__(self, x3d, out):
        """x3d u8[N, HW, Cp] (view buf[:N*HW].reshape(N, HW, Cp)) -> out u8[rows >= N, Cp]."""
        if x3d.shape[1:] != (self.hw, self.cp) or out.shape[1] != self.cp or out.shape[0] < x3d.shape[0]:
            raise ValueError(f"expected x[N, {self.hw}, {self.cp}], out[>=N, {self.cp}], "
                             f"got {x3d.shape}, {out.shape}")
        if x3d.dtype != np.uint8 or out.dtype != np.uint8:
            raise TypeError("x and out must be uint8")
        gap_u8(x3d, self.zx, self.mult, self.zph, out, self.acc)


def make_gap(channels, hw, zx, mult, zp_out) -> GapPlan:
    """Global average pool over hw pixels of `channels` channels; mult from pool_multiplier."""
    cp = pad_to(channels, CH_ALIGN)
    return GapPlan(int(hw), cp, np.uint8(zx), np.float32(mult), quant.zp_bias(zp_out),
                   np.zeros(cp, np.int32))


# ---------------------------------------------------------------------------------------------
# Fully connected classifier -> float32 logits

linear_scale = quant.logit_scale            # the rule lives in quant.py


def linear_acc_ref(x, zx, w, bias) -> np.ndarray:
    """int32 accumulators: x u8[N, Cin], w i8[Cout, Cin], bias i32[Cout] -> i32[N, Cout]."""
    acc = (np.asarray(x, np.int64) - np.int64(zx)) @ np.asarray(w, np.int64).T + np.asarray(bias, np.int64)
    assert np.all(np.abs(acc) <= I32_MAX)
    return acc.astype(np.int32)


def linear_ref(x, zx, w, bias, scale) -> np.ndarray:
    """x u8[N, Cin], w i8[Cout, Cin], bias i32[Cout], scale f32[Cout] -> f32[N, Cout] logits
    = float32(acc) * scale (one rounding)."""
    return linear_acc_ref(x, zx, w, bias).astype(np.float32) * np.asarray(scale, np.float32)


@kernel(inline="always")
def _linear_outputs(x, w, bias, scale, out, n, o0, o1):
    """Outputs [o0, o1) of linear_i8_u8 (the one loop both drivers run)."""
    Kp = w.shape[1]
    for o in range(o0, o1):
        for i in range(n):
            a = np.int32(0)
            for k in range(U(Kp)):
                a += np.int32(w[o, k]) * np.int32(x[i, k])
            out[i, o] = np.float32(np.int32(a + bias[o])) * scale[o]


@kernel()
def linear_i8_u8(x, w, bias, scale, out, n):
    """x u8[rows >= n, Kp] @ w i8[Cout, Kp]^T + folded bias -> out f32[rows >= n, Cout] (rows [0, n)).
    The k loop is an int32 dot product (a vectorised vpmaddwd reduction); output-major order keeps
    a weight row in L1 for all samples. Padded columns of w are 0. (Four samples per pass were
    measured slower: 360 vs 262 us for n = 4.)
    Headroom: |acc| <= |folded bias| + 255 * sum|w| <= 2**31 - 1 (checked by make_linear)."""
    _linear_outputs(x, w, bias, scale, out, n, 0, w.shape[0])


@kernel(parallel=True)
def linear_i8_u8_par(x, w, bias, scale, out, n):
    """linear_i8_u8 with blocks of 64 outputs spread over numba's threads (each output computed
    by the same loop, so results do not depend on the thread count)."""
    nblk = (w.shape[0] + 63) // 64
    for ob in prange(nblk):
        _linear_outputs(x, w, bias, scale, out, n, ob * 64, min(w.shape[0], ob * 64 + 64))


@kernel()
def scale_i32_f32(acc, scale, out, n):
    """out f32[rows >= n, Cout] rows [0, n) = float32(acc[i, o]) * scale[o], acc i32[rows, >= Cout]
    (the classifier's logits from GEMM sums, bias included: linear_ref's one rounding)."""
    for i in range(n):
        for o in range(U(out.shape[1])):
            out[i, o] = np.float32(acc[i, o]) * scale[o]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearPlan:
    """A prepared classifier; `plan(x, N, out)` runs it (see make_linear)."""
    cin: int
    cout: int
    cin_p: int
    w: np.ndarray = dataclasses.field(repr=False)       # i8[Cout, Kp], zero-padded columns
    bias: np.ndarray = dataclasses.field(repr=False)    # zero point folded
    scale: np.ndarray = dataclasses.field(repr=False)
    gemm: object = dataclasses.field(default=None, repr=False)   # a vnni.PwVnniPlan, or None
    _acc: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def impl(self) -> str:
        return self.gemm.impl if self.gemm is not None else "plain"

    def _sums(self, x, N):
        """int32 sums (bias included) of rows [0, N) by the GEMM kernel: a scratch kept per N."""
        acc = self._acc.get(N)
        if acc is None:
            acc = self._acc[N] = np.zeros((N + ROW_SLACK, self.gemm.cout_p), np.int32)
        self.gemm.accumulate(x, N, acc)
        return acc

    def __call__(self, x, N, out):
        """x u8[rows >= N, cin_p] -> out f32[rows >= N, cout] (rows [0, N) written)."""
        if x.shape[1] != self.cin_p or out.shape[1] != self.cout or min(x.shape[0], out.shape[0]) < N:
            raise ValueError(f"expected x[>={N}, {self.cin_p}], out[>={N}, {self.cout}], "
                             f"got {x.shape}, {out.shape}")
        if x.dtype != np.uint8 or out.dtype != np.float32:
            raise TypeError("x must be uint8 and out float32")
        if self.gemm is not None and x.shape[0] >= N + ROW_SLACK and x.flags.c_contiguous:
            # Lite0's 1280 -> 1000 at batch 1: 22 us instead of the loop's 95 (VNNI, 1 thread)
            scale_i32_f32(self._sums(x, N), self.scale, out, N)
        elif N * self.cout * self.cin_p >= PAR_MIN_MACS and num_threads() > 1:
            linear_i8_u8_par(x, self.w, self.bias, self.scale, out, N)
        else:
            linear_i8_u8(x, self.w, self.bias, self.scale, out, N)


def make_linear(w, bias, zx, s_in, s_w, impl: str = "plain") -> LinearPlan:
    """Classifier from canonical tensors: w int8 [Cout, Cin], raw bias int32 [Cout], input zero
    point and scale, weight scales f32 [Cout]. impl: "vnni" / "avx2" for the sums by that IR GEMM
    kernel (for inputs with ROW_SLACK rows, as in a model's arena), "plain" for the loop only."""
    if impl not in ("vnni", "avx2", "plain"):
        raise ValueError(f"unknown classifier impl {impl!r}; expected vnni, avx2 or plain")
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind not in "iu" or (w.size and (w.min() < -128 or w.max() > 127)):
        raise ValueError(f"w must be an int8 array [Cout, Cin], got {w.dtype} {w.shape}")
    cout, cin = w.shape
    folded = quant.fold_input_zero_point(np.asarray(bias, np.int32), w, zx)
    check_headroom(w, folded, "linear")
    cin_p = pad_to(cin, CH_ALIGN)
    wp = np.zeros((cout, cin_p), np.int8)
    wp[:, :cin] = w
    gemm = None
    if impl != "plain":
        from .vnni import make_pw_vnni     # noqa: PLC0415 (LLVM-IR kernels: only when asked for)
        gemm = make_pw_vnni(w, bias, zx, np.ones(cout, np.float32), 0, 0, 255,
                            isa="avx512vnni" if impl == "vnni" else "avx2i8")
    return LinearPlan(cin, cout, cin_p, wp, folded, linear_scale(s_in, s_w), gemm)
