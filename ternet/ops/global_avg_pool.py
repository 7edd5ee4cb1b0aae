"""global_avg_pool: mean over all pixels per channel, requantized to uint8 (1 x 1 output)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, Shape, input_zero_point, value_qparams
from .. import quant


def check(c, attrs, ins):
    (h, w, ch), s_in = ins[0].shape, ins[0].scale
    if 255 * h * w > c.INT32_MAX:
        c.fail(f"a sum over {h}x{w} pixels can overflow the int32 accumulator")
    s_out, _ = c.output_qparams()
    c.multiplier("pooling multiplier", quant.pool_multiplier, s_in, s_out, h * w)
    return (1, 1, ch)


def pool_params(mf, node, hw: int) -> tuple[np.float32, int]:
    """(mult, zp_out) of a global average pool over hw pixels."""
    s_in, _ = value_qparams(mf, node.inputs[0])
    so, zo = value_qparams(mf, node.name)
    return quant.pool_multiplier(s_in, so, hw), zo


def reference(mf, node, inputs):
    from ..kernels.elementwise import gap_ref
    n, h, w, c = inputs[0].shape
    y = gap_ref(inputs[0].reshape(n, h * w, c), input_zero_point(mf, node),
                *pool_params(mf, node, h * w))
    return y.reshape(n, 1, 1, c)


@dataclass(frozen=True)
class GlobalAvgPoolStep:
    src: int
    dst: int
    shape: Shape      # of the input
    plan: object
    op = "global_avg_pool"

    def run(self, v, n):
        s = self.shape
        self.plan(v[self.src][: n * s.h * s.w].reshape(n, s.h * s.w, s.cp), v[self.dst][:n])


def build(ctx, node):
    from ..kernels.elementwise import make_gap
    s = ctx.shape(node.inputs[0])
    plan = make_gap(s.c, s.h * s.w, input_zero_point(ctx.mf, node),
                    *pool_params(ctx.mf, node, s.h * s.w))
    return GlobalAvgPoolStep(ctx.slot(node.inputs[0]), ctx.slot(node.name), s, plan)


def cost(mf, node, in_shapes):
    h, w, c = in_shapes[0]
    return Cost(elementwise_adds=h * w * c)


OP = Op("global_avg_pool", 1, check, reference, build, cost)
