"""Post-training calibration of a QuantGraph on CIFAR batches (never on dev images).

* `calibrate_ranges`: run the graph (float weights or fake-quant weights, float activations),
  keep each node's output min/max and a random sample of values, and choose (lo, hi) per
  node by `minmax`, `percentile:<p>` or `mse` (the clipping factor minimising the uint8
  quantization MSE of the sampled values, via quant.choose_activation_qparams).
* `correct_channels`: sequential per-channel correction (bias correction + BN re-estimation):
  node by node, the quantized network's pre-activation output is matched in mean (and
  optionally std) to the float network's on the same images; the affine fix is folded into
  the float weights and bias, so quantizers (int8 / ternary scales) follow it.
"""
from __future__ import annotations

import numpy as np
import torch

from ternet import quant
from .fakequant import QuantGraph, WEIGHTED, key, requantized


def _mse_range(v: np.ndarray, lo: float, hi: float, grid=np.linspace(0.25, 1.0, 31)):
    best, arg = np.inf, (lo, hi)
    for c in grid:
        l, h = lo * c, hi * c
        s, zp = quant.choose_activation_qparams(l, h)
        q = np.clip(np.floor(v / s + zp + 0.5), 0, 255)
        err = np.mean(((q - zp) * s - v) ** 2)
        if err < best:
            best, arg = err, (l, h)
    return arg


@torch.no_grad()
def calibrate_ranges(g: QuantGraph, batches, method: str = "mse", per_batch: int = 20000, seed: int = 0):
    rng = np.random.default_rng(seed)
    lo, hi, samples = {}, {}, {}
    saved = g.mode
    g.mode = "float" if saved == "float" else "calib"
    for x in batches:
        vals = {"input": g.input_real(x)}
        for n in g.spec:
            name = n["name"]
            y = g.node_pre(n, vals) if g.mode == "float" else _pre_fakew(g, n, vals)
            act = n["attrs"].get("activation", "none")
            y = torch.clamp(y, 0, 6) if act == "relu6" else (torch.relu(y) if act == "relu" else y)
            vals[name] = y
            if not requantized(n["op"]):
                continue
            lo[name] = min(lo.get(name, np.inf), float(y.min()))
            hi[name] = max(hi.get(name, -np.inf), float(y.max()))
            flat = y.flatten()
            pick = torch.from_numpy(rng.integers(0, flat.numel(), min(per_batch, flat.numel())))
            samples.setdefault(name, []).append(flat[pick].numpy())
    g.mode = saved
    for name in lo:
        v = np.concatenate(samples[name])
        if method == "minmax":
            l, h = lo[name], hi[name]
        elif method.startswith("percentile"):
            p = float(method.split(":")[1])
            l, h = min(lo[name], 0) if lo[name] >= 0 else np.percentile(v, 100 - p), np.percentile(v, p)
        elif method == "mse":
            l, h = _mse_range(v, lo[name], hi[name])
        else:
            raise ValueError(method)
        g.set_range(name, l, h)


def _pre_fakew(g: QuantGraph, n, vals):
    """Pre-activation output with quantized weights but float activations."""
    g.mode = "fake"
    try:
        return g.node_pre(n, vals)
    finally:
        g.mode = "calib"


@torch.no_grad()
def walk_pair(g: QuantGraph, ref: QuantGraph, x: torch.Tensor, node_outputs, chunk: int = 16) -> None:
    """Run the fake-quant student g and the float teacher ref side by side, node by node, on x.

    `node_outputs(n, vq, vf, run)` returns the node's pre-activation outputs (yq, yf); it may first
    change the student's weights for that node, reading both networks' current values vq / vf
    (name -> tensor); `run(graph, n, vals)` evaluates a node in chunks of images. The walker then
    applies each network's activation (+ quantization) and frees values past their last use."""
    g.mode, ref.mode = "fake", "float"
    vq, vf = {"input": g.input_real(x)}, {"input": ref.input_real(x)}

    def run(graph, n, vals):
        return torch.cat([graph.node_pre(n, {s: vals[s][i:i + chunk] for s in n["inputs"]})
                          for i in range(0, len(x), chunk)])

    for i, n in enumerate(g.spec):
        yq, yf = node_outputs(n, vq, vf, run)
        vq[n["name"]] = g.node_post(n, yq)
        vf[n["name"]] = ref.node_post(n, yf)
        for s in n["inputs"]:
            if g._last_use[s] == i:
                vq.pop(s, None)
                vf.pop(s, None)


@torch.no_grad()
def correct_channels(g: QuantGraph, ref: QuantGraph, x: torch.Tensor, match_std: bool = True,
                     only=None, chunk: int = 16):
    """Match each weighted node's per-channel output mean/std (fake-quant g) to the float ref."""

    def node_outputs(n, vq, vf, run):
        name = n["name"]
        yf = run(ref, n, vf)
        if n["op"] in WEIGHTED and (only is None or name in only) and requantized(n["op"]):
            yq = run(g, n, vq)
            dims = (0, 2, 3)
            mq, mf = yq.mean(dims), yf.mean(dims)
            a = (yf.std(dims) / yq.std(dims).clamp_min(1e-8)).clamp(0.5, 2.0) if match_std else torch.ones_like(mq)
            k = key(name)
            g.weight[k].mul_(a.view(-1, *[1] * (g.weight[k].dim() - 1)))
            g.bias[k].copy_(a * g.bias[k] + (mf - a * mq))
            g._int = None
        return run(g, n, vq), yf

    walk_pair(g, ref, x, node_outputs, chunk)
