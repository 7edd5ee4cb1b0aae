"""Numeric limits and thresholds shared by the kernels, each defined once.

Importing this module imports numpy only.
"""
from __future__ import annotations

import numpy as np

I32_MAX = 2**31 - 1          # the int32 accumulators' bound (references assert it, factories check it)

# Work (multiply-accumulates per call) below which a layer runs serially because a parallel region
# (~tens of us to wake and join numba's threads) costs more than it saves. The values differ because
# the kernels' speed per MAC differs:
# - pointwise (VNNI/AVX2/AMX IR kernels and the plain-Numba ones): a MAC costs least there, so
#   only large layers pay for the region;
# - depthwise: ~10x more time per MAC (k*k taps per output, no reuse across output channels);
#   2**19 MACs is ~35 us serial;
# - the classifier's plain loop: between the two (the 1.3 M MACs per image of Lite0's 1280 -> 1000
#   are split above one image's worth).
POINTWISE_PAR_MIN_MACS = 1 << 22
DEPTHWISE_PAR_MIN_MACS = 1 << 19
LINEAR_PAR_MIN_MACS = 1 << 20
IM2COL_PAR_MIN_BYTES = 1 << 17   # im2col output above which it is split over threads (the stem: 392 KiB)


def check_clamp(lo, hi) -> None:
    """The activation range [lo, hi] every requantizing kernel clamps to: uint8 bounds, lo <= hi
    (the IR epilogues rely on 0 <= lo, which makes truncation equal floor)."""
    if not 0 <= int(lo) <= int(hi) <= 255:
        raise ValueError(f"clamp bounds must satisfy 0 <= lo <= hi <= 255, got {lo}, {hi}")


def check_int8(w) -> None:
    """Weights must fit int8 (w an integer array)."""
    if w.size and (w.min() < -128 or w.max() > 127):
        raise ValueError("weights must fit int8")


def check_finite(mult) -> None:
    if not np.all(np.isfinite(np.asarray(mult, np.float32))):
        raise ValueError("multipliers must be finite")


def check_headroom(w_rows, folded_bias, what: str) -> None:
    """|folded bias| + 255 * sum|w| per output (w_rows [Cout, fan-in], raw u8 activations with the
    zero point folded into the bias) must fit int32: the final accumulator then does, and the
    kernels' wrapping partial sums cannot change it."""
    bound = 255 * np.abs(np.asarray(w_rows, np.int64)).sum(axis=1) \
        + np.abs(np.asarray(folded_bias).astype(np.int64))
    if np.any(bound > I32_MAX):
        raise OverflowError(f"{what} accumulator may exceed int32")
