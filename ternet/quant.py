"""The quantization rules of ternet, in one place.

Every number that crosses from float to integer goes through a function here, used by the
numpy references, the Numba kernels (which re-implement `requant_ref` bit for bit), the model
loader and the PyTorch exporter/fake-quant modules. Change a rule here and all of them change.

Conventions
-----------
* Activations are per-tensor asymmetric uint8: real = scale * (q - zero_point), q in [0, 255].
* Weights are per-output-channel symmetric: int8 in [-127, 127] (zero point 0), or ternary
  {-1, 0, +1}; real = scale[c] * q.
* Accumulators are int32: acc = bias + sum(w * (x - zx)). The input zero point is folded into
  the bias once, at load time (`fold_input_zero_point`), so kernels compute sum(w * x) + bias.
* **ternet's requantization rule** (the default; the contract every kernel meets
  bit-exactly, like the onnxruntime rule below), in float32, no FMA::

      y = clamp(floor(float32(acc) * m + float32(zp_out + 0.5)), lo, hi)

  i.e. round-half-up of acc*m + zp_out, with m = float32(s_in * s_w[c] / s_out) computed in
  float64 and rounded once to float32. `float32(acc)` rounds to nearest-even (exact below 2**24).
  The clamp bounds [lo, hi] fold the activation (ReLU / ReLU6) into the store.
* **The onnxruntime rule** (`rule="onnxruntime"`, a model file's `ternet.requant`; the rule of
  onnxruntime's MLAS QLinearConv, so converted ONNX QDQ models agree with it)::

      y = clamp(rint(float32(acc) * m) + zp_out, lo, hi)

  with m = (float32(s_in) * float32(s_w[c])) / float32(s_out) in float32 arithmetic and rint
  rounding half to even. Kernels run it as ((float32(acc) * m + RINT_MAGIC) + (zp_out - RINT_MAGIC)),
  two separate float32 adds: the first rounds to an integer half to even (|acc * m| < 2**22;
  beyond, the result still clamps to the right end), the second is exact (`round_constants`).
  Residual adds, the pool and the logits keep ternet's rule under both (docs/convert.md).
* Residual add: y = clamp(floor((f32(a - za) * ma + f32(b - zb) * mb) + f32(zo + 0.5)), lo, hi)
  with ma = s_a / s_out and mb = s_b / s_out as float32, evaluated in exactly that order.
* Logits: float32(acc) * (s_in * s_w[c]) as float32: one rounding, no output quantization.
"""
from __future__ import annotations

import numpy as np

QMIN, QMAX = 0, 255          # uint8 activations
WMAX = 127                   # int8 weights are symmetric in [-127, 127]
ACTIVATIONS = ("none", "relu", "relu6")
RULES = ("ternet", "onnxruntime")          # requantization rules (a model file's ternet.requant)
RINT_MAGIC = np.float32(1.5 * 2**23)       # x + RINT_MAGIC rounds x half to even, |x| < 2**22


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown requantization rule {rule!r}; expected one of {RULES}")
    return rule


def requant_multiplier(s_in, s_w, s_out, rule: str = "ternet") -> np.ndarray:
    """Per-channel float32 multiplier m = s_in * s_w / s_out, computed in float64, rounded once
    (rule "onnxruntime": requant_multiplier_onnxruntime)."""
    if check_rule(rule) == "onnxruntime":
        return requant_multiplier_onnxruntime(s_in, s_w, s_out)
    m = np.float64(s_in) * np.asarray(s_w, np.float64) / np.float64(s_out)
    return np.ascontiguousarray(m, dtype=np.float32)


def requant_multiplier_onnxruntime(s_in, s_w, s_out) -> np.ndarray:
    """scalars s_in, s_out, s_w (C,) -> float32 (C,): (s_in * s_w[c]) / s_out in float32 arithmetic."""
    m = (np.float32(s_in) * np.asarray(s_w, np.float32).reshape(-1)) / np.float32(s_out)
    return np.ascontiguousarray(m, dtype=np.float32)


def zp_bias(zp_out) -> np.float32:
    """The float32 constant added before floor: zp_out + 0.5 (round half up)."""
    return np.float32(np.float32(zp_out) + np.float32(0.5))


def round_constants(zp_out, rule: str = "ternet") -> tuple[np.float32, np.float32]:
    """(zph, zpc): the float32 constants kernels add, in this order and separately, to
    float32(acc) * m before clamping and truncating. ternet: (zp + 0.5, 0), i.e. floor(v + zp +
    0.5) (adding 0 changes no value that survives the clamp); onnxruntime: (RINT_MAGIC, zp -
    RINT_MAGIC), i.e. rint(v) + zp (module doc)."""
    if check_rule(rule) == "onnxruntime":
        return RINT_MAGIC, np.float32(np.float32(zp_out) - RINT_MAGIC)
    return zp_bias(zp_out), np.float32(0.0)


def requant_ref(acc, mult, zp_out, lo, hi, rule: str = "ternet") -> np.ndarray:
    """acc int32 (..., C), mult float32 (C,) or scalar -> uint8 (..., C) by the rule above
    (rule "onnxruntime": requant_ref_onnxruntime)."""
    if check_rule(rule) == "onnxruntime":
        return requant_ref_onnxruntime(acc, mult, zp_out, lo, hi)
    acc = np.asarray(acc)
    assert acc.dtype == np.int32, acc.dtype
    v = acc.astype(np.float32) * np.asarray(mult, np.float32)   # one float32 rounding
    v = v + zp_bias(zp_out)                                     # second rounding, separate add (no FMA)
    v = np.minimum(np.maximum(v, np.float32(lo)), np.float32(hi))
    return np.floor(v).astype(np.uint8)


def requant_ref_onnxruntime(acc, mult, zp_out, lo, hi) -> np.ndarray:
    """acc int32 (..., C), mult float32 (C,) or scalar -> uint8 (..., C): clamp(rint(f32(acc) * m) + zp)."""
    acc = np.asarray(acc)
    assert acc.dtype == np.int32, acc.dtype
    v = acc.astype(np.float32) * np.asarray(mult, np.float32)   # one float32 rounding
    v = np.minimum(np.maximum(v, np.float32(int(lo) - int(zp_out))), np.float32(int(hi) - int(zp_out)))
    return (np.rint(v).astype(np.int32) + np.int32(zp_out)).astype(np.uint8)


def add_ref(a, za, ma, b, zb, mb, zp_out, lo, hi) -> np.ndarray:
    """Residual add of two uint8 tensors of the same shape with different scales -> uint8."""
    fa = (a.astype(np.int32) - np.int32(za)).astype(np.float32) * np.float32(ma)
    fb = (b.astype(np.int32) - np.int32(zb)).astype(np.float32) * np.float32(mb)
    v = (fa + fb) + zp_bias(zp_out)
    v = np.minimum(np.maximum(v, np.float32(lo)), np.float32(hi))
    return np.floor(v).astype(np.uint8)


def add_multipliers(s_a, s_b, s_out) -> tuple[np.float32, np.float32]:
    return (np.float32(np.float64(s_a) / np.float64(s_out)),
            np.float32(np.float64(s_b) / np.float64(s_out)))


def activation_bounds(act: str, scale: float, zp: int) -> tuple[int, int]:
    """Clamp bounds [lo, hi] in the output's quantized domain that implement the activation."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    lo, hi = QMIN, QMAX
    if act in ("relu", "relu6"):
        lo = max(lo, int(zp))
    if act == "relu6":
        hi = min(hi, int(zp) + int(np.floor(6.0 / float(scale) + 0.5)))
    return lo, hi


def choose_activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero_point) covering [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / (QMAX - QMIN)
    zp = int(np.clip(np.floor(QMIN - lo / scale + 0.5), QMIN, QMAX))
    return float(np.float32(scale)), zp


def quantize_activation(x, scale, zp) -> np.ndarray:
    """float -> uint8: clamp(floor(x / scale + (zp + 0.5))), float32 arithmetic."""
    v = np.asarray(x, np.float32) / np.float32(scale) + zp_bias(zp)
    return np.floor(np.minimum(np.maximum(v, np.float32(QMIN)), np.float32(QMAX))).astype(np.uint8)


def quantize_weights_int8(w, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 (round half to even): returns (q int8, scale float32[C])."""
    w = np.asarray(w, np.float64)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red) if red else np.abs(w)
    scale = np.where(amax > 0, amax / WMAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -WMAX, WMAX).astype(np.int8)
    return q, scale


def quantize_bias(b, s_in, s_w) -> np.ndarray:
    """float bias -> int32 in units of s_in * s_w[c] (round half to even)."""
    q = np.rint(np.asarray(b, np.float64) / (np.float64(s_in) * np.asarray(s_w, np.float64)))
    if np.any(np.abs(q) > 2**31 - 1):
        raise OverflowError("bias does not fit in int32 at this scale")
    return q.astype(np.int32)


def fold_input_zero_point(bias, w, zx) -> np.ndarray:
    """bias - zx * sum(w) per output channel (w: (Cout, ...) int), checked to fit int32."""
    w = np.asarray(w)
    s = w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
    out = np.asarray(bias, np.int64) - np.int64(zx) * s
    if np.any(np.abs(out) > 2**31 - 1):
        raise OverflowError("zero-point-folded bias does not fit in int32")
    return out.astype(np.int32)


def same_padding(size: int, k: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME': (out, pad_before, pad_after); the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


def symmetric_padding(size: int, k: int, stride: int) -> tuple[int, int, int]:
    """PyTorch-style padding (k-1)//2 on both sides: (out, pad_before, pad_after)."""
    p = (k - 1) // 2
    return (size + 2 * p - k) // stride + 1, p, p


def conv_padding(mode: str, size: int, k: int, stride: int) -> tuple[int, int, int]:
    if mode == "same":
        return same_padding(size, k, stride)
    if mode == "symmetric":
        return symmetric_padding(size, k, stride)
    raise ValueError(f"unknown padding {mode!r}; expected 'same' or 'symmetric'")


def conv_geometry(mode: str, h: int, w: int, k: int, stride: int) -> tuple[int, int, int, int]:
    """(pad_top, pad_left, Ho, Wo) of a k x k conv with `mode` padding on an h x w input."""
    ho, pt, _ = conv_padding(mode, h, k, stride)
    wo, pl, _ = conv_padding(mode, w, k, stride)
    return pt, pl, ho, wo


def logit_scale(s_in, s_w) -> np.ndarray:
    """Per-class float32 factor turning the classifier's int32 accumulator into logits."""
    return np.ascontiguousarray(np.float64(s_in) * np.asarray(s_w, np.float64), dtype=np.float32)


def pool_multiplier(s_in, s_out, hw: int) -> np.float32:
    """Global average pool: mean = sum / hw, requantized with m = s_in / (s_out * hw)."""
    return np.float32(np.float64(s_in) / (np.float64(s_out) * np.float64(hw)))
