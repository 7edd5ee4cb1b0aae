"""hard_swish: x * relu6(x + 3) / 6 on a uint8 value, requantized to its own scale (MobileNetV3's
activation); runs as a 256-entry table (kernels/lut.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, Shape, value_qparams


def output_multiplier(s_in, s_out) -> np.float32:
    """s_in / s_out: the scale change the loader bounds like every derived multiplier."""
    return np.float32(np.float64(s_in) / np.float64(s_out))


def check(c, attrs, ins):
    s_out, _ = c.output_qparams()
    c.multiplier("output multiplier", output_multiplier, ins[0].scale, s_out)
    return ins[0].shape


def params(mf, node) -> tuple:
    """(zx, s_in, zp_out, s_out) of a hard_swish node."""
    s_in, zx = value_qparams(mf, node.inputs[0])
    s_out, zo = value_qparams(mf, node.name)
    return zx, s_in, zo, s_out


def reference(mf, node, inputs):
    from ..kernels.lut import hard_swish_ref
    return hard_swish_ref(inputs[0], *params(mf, node))


@dataclass(frozen=True)
class HardSwishStep:
    src: int
    dst: int
    shape: Shape
    plan: object
    op = "hard_swish"

    def run(self, v, n):
        self.plan(v[self.src], n * self.shape.h * self.shape.w, v[self.dst])


def build(ctx, node):
    from ..kernels.lut import make_hard_swish
    return HardSwishStep(ctx.slot(node.inputs[0]), ctx.slot(node.name), ctx.shape(node.inputs[0]),
                         make_hard_swish(*params(ctx.mf, node)))


def cost(mf, node, in_shapes):
    return Cost()        # an activation: not counted (ternet.info's rules), its outputs are


OP = Op("hard_swish", 1, check, reference, build, cost)
