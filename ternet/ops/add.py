"""add: residual add of two uint8 values with their own scales, requantized to uint8."""
from __future__ import annotations

from dataclasses import dataclass

from ._base import Cost, Op, Shape, value_qparams
from .. import quant


def check(c, attrs, ins):
    c.choice("activation", c.ACTIVATIONS)
    a, b = ins
    if a.shape != b.shape:
        c.fail(f"operand shapes differ: {list(a.shape)} vs {list(b.shape)}")
    s_out, _ = c.output_qparams()
    c.multiplier("operand multiplier", quant.add_multipliers, a.scale, b.scale, s_out)
    return a.shape


def add_params(mf, node) -> tuple:
    """(za, ma, zb, mb, zp_out, lo, hi) of a residual add node, by the rules of ternet.quant."""
    sa, za = value_qparams(mf, node.inputs[0])
    sb, zb = value_qparams(mf, node.inputs[1])
    so, zo = value_qparams(mf, node.name)
    ma, mb = quant.add_multipliers(sa, sb, so)
    lo, hi = quant.activation_bounds(node.attrs["activation"], so, zo)
    return za, ma, zb, mb, zo, lo, hi


def reference(mf, node, inputs):
    za, ma, zb, mb, zo, lo, hi = add_params(mf, node)
    return quant.add_ref(inputs[0], za, ma, inputs[1], zb, mb, zo, lo, hi)


@dataclass(frozen=True)
class AddStep:
    """Residual add of two uint8 tensors with different scales."""
    a: int
    b: int
    dst: int
    shape: Shape
    plan: object
    op = "add"

    def run(self, v, n):
        self.plan(v[self.a], v[self.b], n * self.shape.h * self.shape.w, v[self.dst])


def build(ctx, node):
    from ..kernels.elementwise import make_add
    return AddStep(ctx.slot(node.inputs[0]), ctx.slot(node.inputs[1]), ctx.slot(node.name),
                   ctx.shape(node.inputs[0]), make_add(*add_params(ctx.mf, node)))


def cost(mf, node, in_shapes):
    h, w, c = in_shapes[0]
    return Cost(elementwise_adds=h * w * c)


OP = Op("add", 2, check, reference, build, cost)
