"""Reference runner: executes a model file with the numpy `*_ref` ops only.

Slow and obvious, on canonical (unpadded) tensors. It is the yardstick the fast runner
(`ternet.model.Model`) must match bit for bit, and what the exporter's tests compare against.
"""
from __future__ import annotations

import numpy as np

from . import quant
from .format import ModelFile, pointwise_weight


def node_qparams(mf: ModelFile, name: str) -> tuple[float, int]:
    """(scale, zero_point) of a node's uint8 output; 'input' is the graph input."""
    if name == "input":
        return float(mf.input["scale"]), int(mf.input["zero_point"])
    return (float(mf.tensors[f"{name}.output_scale"][0]),
            int(mf.tensors[f"{name}.output_zero_point"][0]))


def requant_params(mf: ModelFile, node) -> tuple[np.ndarray, int, int, int]:
    """(mult float32[C], zp_out, lo, hi) of a conv-like node, by the rules of ternet.quant."""
    s_in, _ = node_qparams(mf, node.inputs[0])
    s_out, zp = node_qparams(mf, node.name)
    mult = quant.requant_multiplier(s_in, mf.tensor(node, "weight_scale"), s_out)
    lo, hi = quant.activation_bounds(node.attrs["activation"], s_out, zp)
    return mult, zp, lo, hi


def padding_of(node, h: int, w: int) -> tuple[int, int, int, int]:
    """(pad_top, pad_left, Ho, Wo) of a conv/depthwise node on an h x w input."""
    a = node.attrs
    return quant.conv_geometry(a["padding"], h, w, a["kernel"], a["stride"])


def add_params(mf: ModelFile, node) -> tuple:
    """(za, ma, zb, mb, zp_out, lo, hi) of a residual add node, by the rules of ternet.quant."""
    sa, za = node_qparams(mf, node.inputs[0])
    sb, zb = node_qparams(mf, node.inputs[1])
    so, zo = node_qparams(mf, node.name)
    ma, mb = quant.add_multipliers(sa, sb, so)
    lo, hi = quant.activation_bounds(node.attrs["activation"], so, zo)
    return za, ma, zb, mb, zo, lo, hi


def pool_params(mf: ModelFile, node, hw: int) -> tuple[np.float32, int]:
    """(mult, zp_out) of a global average pool over hw pixels."""
    s_in, _ = node_qparams(mf, node.inputs[0])
    so, zo = node_qparams(mf, node.name)
    return quant.pool_multiplier(s_in, so, hw), zo


def run_reference(mf: ModelFile, x: np.ndarray) -> np.ndarray:
    """x uint8 [N, H, W, 3] (quantized input) -> float32 logits [N, num_classes]."""
    vals = {"input": np.ascontiguousarray(x, np.uint8)}
    for node in mf.graph:
        vals[node.name] = run_node(mf, node, [vals[s] for s in node.inputs])
    return vals[mf.graph[-1].name]


def run_node(mf: ModelFile, node, inputs: list) -> np.ndarray:
    """One node on its input values (uint8 NHWC; the graph's own or any others of the same
    shape, e.g. another engine's, to compare layers one at a time) -> its output value."""
    from .kernels.conv import conv_ref
    from .kernels.depthwise import depthwise_ref
    from .kernels.elementwise import gap_ref, linear_ref
    from .kernels.pointwise import pointwise_ref

    a = node.attrs
    src = np.ascontiguousarray(inputs[0], np.uint8)
    _, zx = node_qparams(mf, node.inputs[0])
    if node.op == "conv2d":
        mult, zp, lo, hi = requant_params(mf, node)
        pt, pl, ho, wo = padding_of(node, src.shape[1], src.shape[2])
        return conv_ref(src, zx, mf.tensor(node, "weight"), mf.tensor(node, "bias"), mult, zp,
                        lo, hi, a["stride"], pt, pl, ho, wo)
    if node.op == "depthwise":
        mult, zp, lo, hi = requant_params(mf, node)
        pt, pl, ho, wo = padding_of(node, src.shape[1], src.shape[2])
        return depthwise_ref(src, zx, mf.tensor(node, "weight"), mf.tensor(node, "bias"), mult, zp,
                             lo, hi, a["stride"], pt, pl, ho, wo)
    if node.op == "pointwise":
        mult, zp, lo, hi = requant_params(mf, node)
        n, h, w, c = src.shape
        return pointwise_ref(src.reshape(-1, c), zx, pointwise_weight(mf, node),
                             mf.tensor(node, "bias"), mult, zp, lo, hi).reshape(n, h, w, -1)
    if node.op == "add":
        za, ma, zb, mb, zo, lo, hi = add_params(mf, node)
        return quant.add_ref(src, za, ma, np.asarray(inputs[1], np.uint8), zb, mb, zo, lo, hi)
    if node.op == "global_avg_pool":
        n, h, w, c = src.shape
        y = gap_ref(src.reshape(n, h * w, c), zx, *pool_params(mf, node, h * w))
        return y.reshape(n, 1, 1, c)
    if node.op == "linear":
        s_in, _ = node_qparams(mf, node.inputs[0])
        scale = quant.logit_scale(s_in, mf.tensor(node, "weight_scale"))
        return linear_ref(src.reshape(src.shape[0], -1), zx, mf.tensor(node, "weight"),
                          mf.tensor(node, "bias"), scale)
    raise ValueError(f"unknown op {node.op!r}")   # validated by format.read_model: unreachable
