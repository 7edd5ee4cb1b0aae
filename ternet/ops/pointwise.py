"""pointwise: 1x1 convolution with ternary, int8 or hybrid (per-filter mix) weights,
requantized to uint8; on VNNI/AMX kernels a residual add right after it runs in its epilogue."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, Shape, input_zero_point, requant_params
from .add import add_params
from .conv2d import check_requantized
from ..format import pointwise_weight


def check(c, attrs, ins):
    (h, w, ch), s_in, zx = ins[0].shape, ins[0].scale, ins[0].zero_point
    cin = c.int("cin", 1, c.MAX_CHANNELS)
    cout = c.int("cout", 1, c.MAX_CHANNELS)
    kind = c.choice("weight", c.WEIGHT_TYPES)
    c.choice("activation", c.ACTIVATIONS)
    if cin != ch:
        c.fail(f"cin={cin} but its input has {ch} channels")
    if kind == "int8":
        wt = c.tensor("weight", np.int8, (cout, cin))
    else:
        check_ternary(c, kind, cin, cout)
        wt = pointwise_weight(c.arrays, c.node())
    check_requantized(c, wt, cout, s_in, zx)
    return (h, w, cout)


def check_ternary(c, kind, cin, cout):
    """Packed 2-bit codes: no code 3, zero codes past cin; hybrid rows listed and zero."""
    codes = c.ternary_codes(c.tensor("weight", np.uint8, (cout, -(-cin // 4))), cin)
    bad = np.argwhere(codes == c.CODE_INVALID)
    if len(bad):
        c.fail_tensor("weight",
                      f"invalid 2-bit code 3 at output channel {bad[0][0]}, input {bad[0][1]}")
    if np.any(codes[:, cin:] != 1):
        c.fail_tensor("weight", "padding codes past cin must be 1 (zero)")
    if kind == "hybrid":
        idx = c.arrays.get(f"{c.name}.int8_channels")
        n = 0 if idx is None or idx.ndim != 1 else idx.shape[0]
        idx = c.tensor("int8_channels", np.int32, (n,))
        if n and (np.any(idx < 0) or np.any(idx >= cout)                  # int64: no wrap
                  or np.any(np.diff(idx.astype(np.int64)) <= 0)):
            c.fail_tensor("int8_channels", f"must be strictly increasing indices in [0, {cout})")
        c.tensor("weight_int8", np.int8, (n, cin))
        if n and np.any(codes[idx, :cin] != 1):
            c.fail_tensor("weight", "rows listed in int8_channels must hold zero codes")


def reference(mf, node, inputs):
    from ..kernels.pointwise import pointwise_ref
    src = inputs[0]
    mult, zp, lo, hi = requant_params(mf, node)
    n, h, w, c = src.shape
    return pointwise_ref(src.reshape(-1, c), input_zero_point(mf, node), pointwise_weight(mf, node),
                         mf.tensor(node, "bias"), mult, zp, lo, hi, rule=mf.requant).reshape(n, h, w, -1)


@dataclass(frozen=True)
class PointwiseStep:
    """1x1 convolution, ternary / int8 / hybrid weights."""
    src: int
    dst: int
    shape: Shape
    plan: object
    op = "pointwise"

    def run(self, v, n):
        self.plan(v[self.src], n * self.shape.h * self.shape.w, v[self.dst])

    def with_residual_add(self, mf, add_node, conv_is_b: bool, res_slot: int, dst: int):
        """This step with the residual add `add_node` after it fused into its kernel's epilogue:
        reads the add's other operand from `res_slot`, writes the add's output to `dst`
        (`conv_is_b`: this step's output is the add's second operand). None if its kernel has
        no fused form."""
        from ..kernels.vnni import PwVnniPlan, make_pw_add
        if not isinstance(self.plan, PwVnniPlan):
            return None
        za, ma, zb, mb, zo, lo, hi = add_params(mf, add_node)
        zr, mr, zq, mq = (za, ma, zb, mb) if conv_is_b else (zb, mb, za, ma)
        return PointwiseAddStep(self.src, res_slot, dst, self.shape,
                                make_pw_add(self.plan, zr, mr, zq, mq, zo, lo, hi))


@dataclass(frozen=True)
class PointwiseAddStep:
    """1x1 convolution with the residual add after it fused into its epilogue (see
    kernels.vnni.PwAddPlan): writes the add's output, reading the conv input and the residual."""
    src: int
    res: int
    dst: int
    shape: Shape
    plan: object
    op = "pointwise+add"

    def run(self, v, n):
        self.plan(v[self.src], n * self.shape.h * self.shape.w, v[self.dst], v[self.res])


def build(ctx, node):
    from ..kernels.pointwise import make_pointwise
    s = ctx.shape(node.inputs[0])      # (never the graph input: read_model refuses that)
    mult, zp, lo, hi = requant_params(ctx.mf, node)
    plan = make_pointwise(pointwise_weight(ctx.mf, node), ctx.mf.tensor(node, "bias"),
                          input_zero_point(ctx.mf, node), mult, zp, lo, hi,
                          ctx.pointwise_kernel(node.attrs["weight"]), rule=ctx.mf.requant)
    return PointwiseStep(ctx.slot(node.inputs[0]), ctx.slot(node.name), s, plan)


def cost(mf, node, in_shapes):
    from ..info import ternary_nonzeros
    a = node.attrs
    ho, wo, co = node.out_shape
    pix, cin, weight = ho * wo, a["cin"], a["weight"]
    macs = pix * co * cin
    params = co * cin + co
    if weight == "int8":
        return Cost(weight=weight, macs=macs, int8_macs=macs, params=params)
    n8 = mf.tensor(node, "int8_channels").shape[0] if weight == "hybrid" else 0
    int8_macs = pix * n8 * cin
    return Cost(weight=weight, macs=macs, int8_macs=int8_macs, ternary_macs=macs - int8_macs,
                ternary_adds=pix * int(ternary_nonzeros(mf.tensor(node, "weight")).sum()),
                params=params)


OP = Op("pointwise", 1, check, reference, build, cost, weighted=True)
