"""Synthetic calibration images from the teacher's BatchNorm statistics (ZeroQ's "distilled data",
Cai et al. 2020; the batch-statistics term of DeepInversion, Yin et al. 2020).

Every BatchNorm layer of the pretrained (unfolded) teacher stores the mean and variance of its
input over ImageNet. Starting from Gaussian noise, a batch of images is optimised with Adam so that
at every BN layer the batch's per-channel mean and standard deviation match the stored ones:

    loss = sum over BN layers of ||mean_b - running_mean||_2 + ||std_b - sqrt(running_var + eps)||_2

so the images excite every layer with ImageNet-like statistics, without any ImageNet image. A
random flip and a small random shift each step (DeepInversion's jitter) keep the optimisation from
settling on one fixed high-frequency pattern.

With `targets` (DeepInversion's class term) the loss also has `ce` x the cross-entropy of the
teacher's logits to one target class per image. Why: BN statistics alone, like upscaled CIFAR,
give images on which the teacher predicts a handful of classes (measured: 13 distinct top-1
classes in 128 BN-only images, and 5 in 128 augmented CIFAR images, 118 of them "window screen"),
so distillation on them says almost nothing about the other 990 classes. Starting from natural
images (`init`, e.g. CIFAR upscaled) instead of noise reaches a lower BN loss in fewer steps.

Images are returned as uint8 pixels of the model's input quantization (for Lite0:
pixel = 128 x + 127), i.e. exactly what the integer engine sees.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn


def bn_stat_loss(model: nn.Module, x: torch.Tensor, *, with_output: bool = False):
    """Sum over the model's BatchNorm2d layers of the L2 distance between the batch's per-channel
    input mean / std and the layer's running statistics (model in eval mode); with_output: also
    the model's output, (loss, output)."""
    terms = []

    def hook(bn, inp, _out):
        a = inp[0]
        mean = a.mean((0, 2, 3))
        std = torch.sqrt(a.var((0, 2, 3), unbiased=False) + bn.eps)
        terms.append(torch.norm(mean - bn.running_mean, 2)
                     + torch.norm(std - torch.sqrt(bn.running_var + bn.eps), 2))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    loss = torch.stack(terms).sum()
    return (loss, out) if with_output else loss


def synthesize(model: nn.Module, n: int, size: int, *, steps: int, lr: float, scale: float,
               zero_point: int, seed: int, targets: torch.Tensor | None = None, ce: float = 0.0,
               init: torch.Tensor | None = None, log=print) -> torch.Tensor:
    """n images u8-valued float [n, 3, size, size] whose BN statistics match the model's; the
    model's input is real = scale * (pixel - zero_point). targets: int64 [n] classes the teacher
    is pushed towards with weight ce; init: u8-valued float [n, 3, size, size] start images
    (default: Gaussian noise)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    lo, hi = scale * (0 - zero_point), scale * (255 - zero_point)
    if init is None:
        x = (torch.randn(n, 3, size, size, generator=g) * 0.5).clamp(lo, hi)
    else:
        if tuple(init.shape) != (n, 3, size, size):
            raise ValueError(f"init: expected shape {(n, 3, size, size)}, got {tuple(init.shape)}")
        x = scale * (init.float() - zero_point)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    aim = targets is not None and ce != 0
    t0 = time.time()
    for step in range(steps):
        flip = bool(torch.randint(0, 2, (1,), generator=g))
        dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
        xi = torch.roll(x, (dy, dx), (2, 3))
        loss, logits = bn_stat_loss(model, xi.flip(3) if flip else xi, with_output=True)
        if aim:
            xent = nn.functional.cross_entropy(logits, targets)
            loss = loss + ce * xent
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
        if step % 50 == 0 or step == steps - 1:
            msg = f"  step {step}/{steps}: loss {loss.item():.3f}"
            if aim:
                msg += f" (cross-entropy to targets {xent.item():.3f})"
            log(f"{msg} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        return torch.clamp(torch.floor(x / scale + zero_point + 0.5), 0, 255)
