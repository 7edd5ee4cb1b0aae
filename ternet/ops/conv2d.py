"""conv2d: k x k int8 convolution, the stem (the only op that reads the graph input): im2col +
the int8 GEMM, requantized to uint8."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Cost, Op, Shape, input_zero_point, padding_of, requant_params
from .. import quant


def check(c, attrs, ins):
    s_in, zx = ins[0].scale, ins[0].zero_point
    k, ch, ho, wo = check_window(c, ins)
    cin = c.int("cin", 1, c.MAX_CHANNELS)
    cout = c.int("cout", 1, c.MAX_CHANNELS)
    if cin != ch:
        c.fail(f"cin={cin} but its input has {ch} channels")
    c.im2col(k, cin, ho, wo)
    wt = c.tensor("weight", np.int8, (cout, k, k, cin))
    check_requantized(c, wt, cout, s_in, zx)
    return (ho, wo, cout)


def check_window(c, ins) -> tuple[int, int, int, int]:
    """The checks every conv-like node (conv2d, depthwise) shares: kernel, stride, padding,
    activation, output size. Returns (kernel, input channels, output height, output width)."""
    h, w, ch = ins[0].shape
    k, st = conv_attrs(c)
    pad = c.choice("padding", c.PADDINGS)
    c.choice("activation", c.ACTIVATIONS)
    ho, wo = output_hw(c, pad, h, w, k, st)
    return k, ch, ho, wo


def conv_attrs(c) -> tuple[int, int]:
    """kernel and stride of a conv-like node (conv2d, depthwise)."""
    k = c.int("kernel", 1, 7)
    st = c.int("stride", 1, 2)
    if k % 2 == 0:
        c.fail(f"'kernel' must be odd, got {k}")
    return k, st


def output_hw(c, pad, h, w, k, st) -> tuple[int, int]:
    ho = quant.conv_padding(pad, h, k, st)[0]
    wo = quant.conv_padding(pad, w, k, st)[0]
    if ho < 1 or wo < 1:
        c.fail(f"output would be empty for a {h}x{w} input")
    return ho, wo


def check_requantized(c, wt, cout, s_in, zx):
    """bias, weight scales and output quantization of a weighted, requantized node whose
    canonical weights are `wt` [cout, ...]; its accumulators cannot overflow."""
    b = c.tensor("bias", np.int32, (cout,))
    s_w = c.weight_scale(cout)
    s_out, _ = c.output_qparams()
    c.accumulator(b, wt, zx)
    c.multiplier("requantization multiplier", quant.requant_multiplier, s_in, s_w, s_out, c.requant)


def reference(mf, node, inputs):
    from ..kernels.conv import conv_ref
    src = inputs[0]
    mult, zp, lo, hi = requant_params(mf, node)
    pt, pl, ho, wo = padding_of(node, src.shape[1], src.shape[2])
    return conv_ref(src, input_zero_point(mf, node), mf.tensor(node, "weight"),
                    mf.tensor(node, "bias"), mult, zp, lo, hi, node.attrs["stride"], pt, pl, ho, wo,
                    rule=mf.requant)


@dataclass(frozen=True)
class ConvStep:
    """k x k int8 convolution (the stem): im2col + int8 GEMM."""
    src: int
    dst: int
    src_shape: Shape
    plan: object
    op = "conv2d"

    def run(self, v, n):
        self.plan(self.src_shape.nhwc(v[self.src], n), v[self.dst])


def build(ctx, node):
    from ..kernels.conv import make_conv
    s = ctx.shape(node.inputs[0])
    mult, zp, lo, hi = requant_params(ctx.mf, node)
    pt, pl, ho, wo = padding_of(node, s.h, s.w)
    wt, b = ctx.mf.tensor(node, "weight"), ctx.mf.tensor(node, "bias")
    if s.cp != s.c:              # reads a channel-padded buffer: zero weights for the padding
        wt = np.pad(wt, ((0, 0), (0, 0), (0, 0), (0, s.cp - s.c)))
    plan = make_conv(wt, b, input_zero_point(ctx.mf, node), mult, zp, lo, hi, node.attrs["stride"],
                     pt, pl, s.h, s.w, ho, wo, ctx.conv_kernel(), rule=ctx.mf.requant)
    return ConvStep(ctx.slot(node.inputs[0]), ctx.slot(node.name), s, plan)


def cost(mf, node, in_shapes):
    a = node.attrs
    ho, wo, co = node.out_shape
    k = a["kernel"]
    macs = ho * wo * co * k * k * a["cin"]
    return Cost(weight="int8", macs=macs, int8_macs=macs, params=co * k * k * a["cin"] + co)


OP = Op("conv2d", 1, check, reference, build, cost, weighted=True, reads_image=True)
