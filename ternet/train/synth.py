"""Synthetic calibration images from the teacher's BatchNorm statistics (ZeroQ's "distilled data",
Cai et al. 2020; the batch-statistics term of DeepInversion, Yin et al. 2020).

Every BatchNorm layer of the pretrained (unfolded) teacher stores the mean and variance of its
input over ImageNet. Starting from Gaussian noise, a batch of images is optimised with Adam so that
at every BN layer the batch's per-channel mean and standard deviation match the stored ones:

    loss = sum over BN layers of ||mean_b - running_mean||_2 + ||std_b - sqrt(running_var + eps)||_2

so the images excite every layer with ImageNet-like statistics, without any ImageNet image. A
random flip and a small random shift each step (DeepInversion's jitter) keep the optimisation from
settling on one fixed high-frequency pattern. Images are returned as uint8 pixels of the model's
input quantization (for Lite0: pixel = 128 x + 127), i.e. exactly what the integer engine sees.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn


def bn_stat_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over the model's BatchNorm2d layers of the L2 distance between the batch's per-channel
    input mean / std and the layer's running statistics (model in eval mode)."""
    terms = []

    def hook(bn, inp, _out):
        a = inp[0]
        mean = a.mean((0, 2, 3))
        std = torch.sqrt(a.var((0, 2, 3), unbiased=False) + bn.eps)
        terms.append(torch.norm(mean - bn.running_mean, 2)
                     + torch.norm(std - torch.sqrt(bn.running_var + bn.eps), 2))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()


def synthesize(model: nn.Module, n: int, size: int, *, steps: int, lr: float, scale: float,
               zero_point: int, seed: int, log=print) -> torch.Tensor:
    """n images u8-valued float [n, 3, size, size] whose BN statistics match the model's; the
    model's input is real = scale * (pixel - zero_point)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    lo, hi = scale * (0 - zero_point), scale * (255 - zero_point)
    x = (torch.randn(n, 3, size, size, generator=g) * 0.5).clamp(lo, hi).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    t0 = time.time()
    for step in range(steps):
        flip = bool(torch.randint(0, 2, (1,), generator=g))
        dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
        xi = torch.roll(x, (dy, dx), (2, 3))
        loss = bn_stat_loss(model, xi.flip(3) if flip else xi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step}/{steps}: BN statistics loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        return torch.clamp(torch.floor(x / scale + zero_point + 0.5), 0, 255)
