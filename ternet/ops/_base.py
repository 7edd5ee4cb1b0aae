"""What every op module provides (`Op`), and the helpers several ops share.

An op module (`ternet/ops/<op>.py`) defines `OP = Op(...)`: the op's name as the model file
spells it, its loader check, its quantization parameters, its numpy reference step, the factory
of its fast step and its cost accounting. `ternet.ops` collects them; nothing else in the
package branches on op names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import quant


@dataclass(frozen=True)
class Op:
    name: str                 # the `op` of a graph node (docs/format.md)
    arity: int                # number of inputs
    check: Callable           # (NodeCheck, attrs, [Value]) -> (H, W, C); registers its tensors
    reference: Callable       # (ModelFile, node, [uint8 NHWC arrays]) -> output array
    build: Callable           # (lowering.BuildContext, node) -> Step (a fast step over the arena)
    cost: Callable            # (ModelFile, node, [(H, W, C)]) -> Cost
    weighted: bool = False    # has weight, bias and weight_scale tensors
    requantized: bool = True  # has output_scale / output_zero_point (False: float32 logits)
    reads_image: bool = False  # may read the graph input (unpadded 3-channel image)
    classifier: bool = False  # the graph's last node, producing float32 logits


@dataclass(frozen=True)
class Value:
    """What the loader knows about a graph value: shape and quantization."""
    shape: tuple              # (H, W, C)
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Cost:
    """An op's share of `ternet info`'s counters (see ternet.info for the counting rules)."""
    weight: str = "-"         # "int8", "ternary", "hybrid" or "-"
    macs: int = 0
    int8_macs: int = 0
    ternary_macs: int = 0
    ternary_adds: int = 0     # additions from nonzero ternary weights
    elementwise_adds: int = 0
    params: int = 0
    outputs: int | None = None   # requantized outputs; None: every output element


@dataclass(frozen=True)
class Shape:
    """A value's buffer in the arena: 2-D [rows, cp] uint8, rows = pixels of the batch."""
    h: int
    w: int
    c: int            # real channels
    cp: int           # channels in the buffer (padded to CH_ALIGN; the graph input is not)

    def nhwc(self, buf, n):
        """The NHWC view of the first n images of a 2-D [rows, cp] buffer."""
        return buf[: n * self.h * self.w].reshape(n, self.h, self.w, self.cp)


# ---------------------------------------------------------------------------- quantization

def value_qparams(mf, name: str) -> tuple[float, int]:
    """(scale, zero_point) of a node's uint8 output; 'input' is the graph input."""
    if name == "input":
        return float(mf.input["scale"]), int(mf.input["zero_point"])
    return (float(mf.tensors[f"{name}.output_scale"][0]),
            int(mf.tensors[f"{name}.output_zero_point"][0]))


def requant_params(mf, node) -> tuple[np.ndarray, int, int, int]:
    """(mult float32[C], zp_out, lo, hi) of a conv-like node, by the file's requantization rule
    (mf.requant, ternet.quant)."""
    s_in, _ = value_qparams(mf, node.inputs[0])
    s_out, zp = value_qparams(mf, node.name)
    mult = quant.requant_multiplier(s_in, mf.tensor(node, "weight_scale"), s_out, mf.requant)
    lo, hi = quant.activation_bounds(node.attrs["activation"], s_out, zp)
    return mult, zp, lo, hi


def padding_of(node, h: int, w: int) -> tuple[int, int, int, int]:
    """(pad_top, pad_left, Ho, Wo) of a conv/depthwise node on an h x w input."""
    a = node.attrs
    return quant.conv_geometry(a["padding"], h, w, a["kernel"], a["stride"])


def input_zero_point(mf, node) -> int:
    return value_qparams(mf, node.inputs[0])[1]
