"""Per-layer ternarization sensitivity (for hybrid models, after Gope et al.).

Starting from the int8 PTQ graph, ternarize ONE pointwise layer at a time (with per-channel
correction of that layer on CIFAR train images), and measure the KD loss to the FP32 teacher
on held-out CIFAR images. Never uses the ImageNet dev images.
"""
from __future__ import annotations

import copy

import torch

from .calibrate import correct_channels
from .qat import kd_loss, prom_layers


@torch.no_grad()
def layer_sensitivity(g_int8, teacher, x_corr, x_eval, T: float = 2.0, log=print) -> dict:
    teacher.mode = "float"
    t = torch.cat([teacher(teacher.input_real(b)) for b in x_eval.split(32)])

    def kd(g):
        g.mode = "fake"
        s = torch.cat([g(g.input_real(b)) for b in x_eval.split(32)])
        return float(kd_loss(s, t, T))

    base = kd(g_int8)
    out = {"_int8": base}
    for name in prom_layers(g_int8, head=True):
        g = copy.deepcopy(g_int8)
        g.set_wmode(name, "ternary")
        correct_channels(g, teacher, x_corr, only=[name])
        out[name] = kd(g)
        log(f"sensitivity {name}: kd {out[name]:.4f} (int8 {base:.4f})")
    return out


def greedy_int8_order(sens: dict) -> list[str]:
    """Layers in the order they should be kept int8: largest KD damage per ternary MAC first."""
    base = sens["_int8"]["kd"]
    layers = [k for k in sens if k != "_int8"]
    return sorted(layers, key=lambda k: -(sens[k]["kd"] - base) / max(sens[k]["macs"], 1))
