"""linear: the int8 classifier, the graph's last node: float32 logits (no requantization)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, value_qparams
from .. import quant


def check(c, attrs, ins):
    (h, w, ch), s_in, zx = ins[0].shape, ins[0].scale, ins[0].zero_point
    cin = c.int("cin", 1, c.MAX_CHANNELS)
    cout = c.int("cout", 1, c.MAX_CHANNELS)
    if (h, w) != (1, 1):
        c.fail(f"input must be 1x1 spatially (pooled), got {h}x{w}")
    if cin != ch:
        c.fail(f"cin={cin} but its input has {ch} channels")
    wt = c.tensor("weight", np.int8, (cout, cin))
    b = c.tensor("bias", np.int32, (cout,))
    s_w = c.weight_scale(cout)
    c.accumulator(b, wt, zx)
    c.multiplier("logit scale", quant.logit_scale, s_in, s_w)
    return (1, 1, cout)


def reference(mf, node, inputs):
    from ..kernels.elementwise import linear_ref
    src = inputs[0]
    s_in, zx = value_qparams(mf, node.inputs[0])
    scale = quant.logit_scale(s_in, mf.tensor(node, "weight_scale"))
    return linear_ref(src.reshape(src.shape[0], -1), zx, mf.tensor(node, "weight"),
                      mf.tensor(node, "bias"), scale)


@dataclass(frozen=True)
class LinearStep:
    """int8 classifier -> float32 logits (the graph output)."""
    src: int
    plan: object
    op = "linear"

    def run(self, v, n, logits):
        self.plan(v[self.src], n, logits)


def build(ctx, node):
    from ..kernels.elementwise import make_linear
    s_in, zx = value_qparams(ctx.mf, node.inputs[0])
    plan = make_linear(ctx.mf.tensor(node, "weight"), ctx.mf.tensor(node, "bias"), zx, s_in,
                       ctx.mf.tensor(node, "weight_scale"), ctx.classifier_kernel())
    return LinearStep(ctx.slot(node.inputs[0]), plan)


def cost(mf, node, in_shapes):
    cin, cout = node.attrs["cin"], node.attrs["cout"]
    macs = cin * cout
    return Cost(weight="int8", macs=macs, int8_macs=macs, params=macs + cout,
                outputs=0)               # logits are dequantized, not requantized


OP = Op("linear", 1, check, reference, build, cost, weighted=True, requantized=False,
        classifier=True)
