"""Elementwise ops of one uint8 value as a 256-entry table: hard-swish's reference and the table
kernel that runs it.

A function of one uint8 input has 256 possible outputs, so the prepared op is its reference
applied to 0..255 once, and the kernel is a gather: bit-exact by construction, whatever the
arithmetic inside the function.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._jit import U, kernel


def hard_swish_ref(x, zx, s_in, zp_out, s_out) -> np.ndarray:
    """u8[...] -> u8[...]: v = s_in * (x - zx), h = v * min(max(v + 3, 0), 6) / 6 (float64),
    out = clamp(floor(h / s_out + zp_out + 0.5), 0, 255)."""
    v = np.float64(s_in) * (np.asarray(x, np.int64) - int(zx))
    h = v * np.minimum(np.maximum(v + 3.0, 0.0), 6.0) / 6.0
    return np.clip(np.floor(h / np.float64(s_out) + (int(zp_out) + 0.5)), 0, 255).astype(np.uint8)


@kernel()
def lut_u8(x, lut, out, n):
    """out[:n] = lut[x[:n]] on flat u8 buffers; lut u8[256]."""
    for i in range(U(n)):
        out[i] = lut[x[i]]


@dataclasses.dataclass(frozen=True, eq=False)
class LutPlan:
    """A prepared table op; `plan(x, P, out)` runs it."""
    lut: np.ndarray          # u8[256]

    def __call__(self, x, P, out):
        """x, out u8[rows, Cp] (same Cp): rows [0, P) of out = lut[x], nothing else written."""
        cp = out.shape[1]
        if x.shape[1] != cp or min(x.shape[0], out.shape[0]) < P:
            raise ValueError(f"table op needs equal widths and >= {P} rows, got {x.shape}, {out.shape}")
        if x.dtype != np.uint8 or out.dtype != np.uint8:
            raise TypeError("table op operands must be uint8")
        lut_u8(x.reshape(-1), self.lut, out.reshape(-1), P * cp)


def make_hard_swish(zx, s_in, zp_out, s_out) -> LutPlan:
    """hard_swish_ref with these quantization parameters, as a table."""
    return LutPlan(hard_swish_ref(np.arange(256), zx, s_in, zp_out, s_out))
