"""depthwise: k x k per-channel int8 convolution, requantized to uint8."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, Shape, input_zero_point, padding_of, requant_params
from .conv2d import check_requantized, check_window


def check(c, attrs, ins):
    s_in, zx = ins[0].scale, ins[0].zero_point
    k, ch, ho, wo = check_window(c, ins)
    cout = c.int("channels", 1, c.MAX_CHANNELS)
    if cout != ch:
        c.fail(f"channels={cout} but its input has {ch} channels")
    wt = np.moveaxis(c.tensor("weight", np.int8, (k, k, cout)), 2, 0)
    check_requantized(c, wt, cout, s_in, zx)
    return (ho, wo, cout)


def reference(mf, node, inputs):
    from ..kernels.depthwise import depthwise_ref
    src = inputs[0]
    mult, zp, lo, hi = requant_params(mf, node)
    pt, pl, ho, wo = padding_of(node, src.shape[1], src.shape[2])
    return depthwise_ref(src, input_zero_point(mf, node), mf.tensor(node, "weight"),
                         mf.tensor(node, "bias"), mult, zp, lo, hi, node.attrs["stride"],
                         pt, pl, ho, wo, rule=mf.requant)


@dataclass(frozen=True)
class DepthwiseStep:
    src: int
    dst: int
    src_shape: Shape
    dst_shape: Shape
    plan: object
    pad: int = -1        # arena slot of the bordered-input scratch shared by the steps (-1: none)
    op = "depthwise"

    def run(self, v, n):
        self.plan(self.src_shape.nhwc(v[self.src], n), self.dst_shape.nhwc(v[self.dst], n),
                  v[self.pad] if self.pad >= 0 else None)

    def scratch_bytes(self, n: int) -> int:
        """Bytes of the shared scratch this step needs for a batch of n images."""
        return self.plan.padded_bytes(n) if self.pad >= 0 else 0


def build(ctx, node):
    from ..kernels.depthwise import make_depthwise
    s, out = ctx.shape(node.inputs[0]), ctx.out_shape(node)
    mult, zp, lo, hi = requant_params(ctx.mf, node)
    pt, pl, ho, wo = padding_of(node, s.h, s.w)
    plan = make_depthwise(ctx.mf.tensor(node, "weight"), ctx.mf.tensor(node, "bias"),
                          input_zero_point(ctx.mf, node), mult, zp, lo, hi, node.attrs["stride"],
                          pt, pl, s.h, s.w, ho, wo, rule=ctx.mf.requant)
    return DepthwiseStep(ctx.slot(node.inputs[0]), ctx.slot(node.name), s, out, plan,
                         ctx.scratch if plan.padded else -1)


def cost(mf, node, in_shapes):
    ho, wo, co = node.out_shape
    k = node.attrs["kernel"]
    macs = ho * wo * co * k * k
    return Cost(weight="int8", macs=macs, int8_macs=macs, params=co * k * k + co)


OP = Op("depthwise", 1, check, reference, build, cost, weighted=True)
