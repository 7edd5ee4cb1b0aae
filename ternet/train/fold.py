"""BatchNorm folding: a float model's `graph_spec()` -> a list of `FoldedNode`s.

A folded node is one ternet graph node with a float weight in torch layout (conv: [cout, cin/g,
k, k]; linear: [cout, cin]) and a float bias: conv(x, w * g/sigma) + (beta - mu * g/sigma).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FoldedNode:
    name: str
    op: str
    inputs: list
    attrs: dict
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def fold_conv_bn(w: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into the preceding bias-free conv; computed in float64."""
    g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    wf = w.double() * g.view(-1, *([1] * (w.dim() - 1)))
    bf = bn.bias.double() - bn.running_mean.double() * g
    return wf.float(), bf.float()


@torch.no_grad()
def zero_dead_filters(w: torch.Tensor, rel: float = 1e-5) -> int:
    """Zero filters whose weights are numerically dead (max |w| < rel * median filter max; the
    pretrained Lite0 has some at ~1e-9): their bias, in units of s_in * s_w, would not fit int32."""
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    dead = amax < rel * amax.median()
    w[dead] = 0
    return int(dead.sum())


@torch.no_grad()
def fold_model(model) -> list[FoldedNode]:
    out = []
    for name, op, inputs, attrs, mod, bn in model.graph_spec():
        node = FoldedNode(name, op, list(inputs), dict(attrs))
        if mod is not None:
            if bn is not None:
                node.weight, node.bias = fold_conv_bn(mod.weight, bn)
            else:
                node.weight = mod.weight.detach().float().clone()
                b = mod.bias if mod.bias is not None else torch.zeros(mod.weight.shape[0])
                node.bias = b.detach().float().clone()
            zero_dead_filters(node.weight)
        out.append(node)
    return out


def node_macs(nodes: list[FoldedNode], height: int, width: int) -> dict[str, int]:
    """Multiply-accumulates per weighted node for an input of height x width."""
    from ternet.quant import conv_padding
    hw = {"input": (height, width)}
    macs = {}
    for n in nodes:
        h, w = hw[n.inputs[0]]
        a = n.attrs
        if n.op in ("conv2d", "depthwise"):
            h = conv_padding(a["padding"], h, a["kernel"], a["stride"])[0]
            w = conv_padding(a["padding"], w, a["kernel"], a["stride"])[0]
            c = a["cout"] * a["cin"] if n.op == "conv2d" else a["channels"]
            macs[n.name] = h * w * c * a["kernel"] ** 2
        elif n.op == "pointwise":
            macs[n.name] = h * w * a["cin"] * a["cout"]
        elif n.op == "global_avg_pool":
            h = w = 1
        elif n.op == "linear":
            macs[n.name] = a["cin"] * a["cout"]
        hw[n.name] = (h, w)
    return macs
