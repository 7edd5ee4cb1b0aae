"""PROM quantization-aware training with knowledge distillation, resumable.

The student is a QuantGraph in `fake` mode (ternary / hybrid / int8 weights with STE, uint8
activations with fixed calibrated ranges); the teacher is the same folded network in `float`
mode. Loss: KL(teacher || student) on temperature-softened logits (labels are never used),
optionally plus the relative squared error of every block's output (`feat`). Inputs: augmented,
upscaled CIFAR-10 train images and/or synthetic images. Checkpoints are written atomically every
`save_every` seconds to <out>/ckpt.pt; running the same command again resumes from it.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .fakequant import QuantGraph
from .files import load_pt


# ---------------------------------------------------------------------------- checkpoints

def save_ckpt(path, g: QuantGraph, **extra) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"desc": g.describe(), "state": g.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_ckpt(path) -> tuple[QuantGraph, dict]:
    ck = load_pt(path, "ternet.train checkpoint", ("desc", "state"), weights_only=False)
    return QuantGraph.from_description(ck["desc"], ck["state"]), ck


# ---------------------------------------------------------------------------- weight assignment

def prom_layers(g: QuantGraph, head: bool = True) -> list[str]:
    """The pointwise layers PROM makes ternary: every block pointwise (+ the head conv)."""
    return [n["name"] for n in g.nodes("pointwise") if n["name"] != "head" or head]


def kd_loss(student, teacher, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def feature_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Mean over the tapped feature maps of the student's squared error relative to the
    teacher's energy: every image then supervises each block, not only the 1000 logits."""
    return torch.stack([F.mse_loss(student[k], t) / t.pow(2).mean().clamp_min(1e-12)
                        for k, t in teacher.items()]).mean()


@torch.no_grad()
def heldout_metrics(g: QuantGraph, teacher: QuantGraph, x, T: float) -> dict:
    """KD and top-1 agreement with the teacher on held-out images x, or on (images, labels):
    then also 1000-way top-1 of the student against the labels."""
    x, y = x if isinstance(x, tuple) else (x, None)
    g.mode, teacher.mode = "fake", "float"
    s = torch.cat([g(g.input_real(b)) for b in x.split(32)])
    t = torch.cat([teacher(teacher.input_real(b)) for b in x.split(32)])
    out = {"kd": float(kd_loss(s, t, T)), "agree_top1": float((s.argmax(1) == t.argmax(1)).float().mean())}
    if y is not None:
        out["top1"] = float((s.argmax(1) == y).float().mean())
        out["teacher_top1"] = float((t.argmax(1) == y).float().mean())
    return out


def train(g: QuantGraph, teacher: QuantGraph, aug, held_x, ckpt_path, *, steps: int, batch: int,
          lr: float, T: float, save_every: float, eval_every: int, log, start_step: int = 0,
          opt_state=None, extra: dict | None = None, ramp: int = 0, ramp_layers=(),
          feat: float = 0.0, lr_rel: bool = False, channels_last: bool = False) -> QuantGraph:
    """Run (or resume) QAT until `steps`; checkpoint every `save_every` seconds; every
    `eval_every` steps log the KD to the teacher on each held-out set of `held_x` {name: images}.
    feat > 0 adds feat x feature_loss on every block output (g.block_outputs()).
    lr_rel: `lr` is relative to each tensor's mean |value| at the start of the run, so every
    tensor moves by about the same fraction per step (folded weights span 0.01-0.9 and biases
    up to ~15: one absolute Adam rate churns the small expand weights and freezes the rest).
    channels_last: NHWC activations (oneDNN's faster CPU convolutions; float sums in another
    order, so a run is reproducible only with the same setting)."""
    params = list(g.weight.values()) + list(g.bias.values())
    if lr_rel:
        sizes = [float(p.detach().abs().mean()) for p in params]
        typical = sum(sizes) / max(1, sum(x > 0 for x in sizes))    # for an all-zero tensor
        groups = [{"params": [p], "base": lr * (x if x > 0 else typical)} for p, x in zip(params, sizes)]
    else:
        groups = [{"params": params}]
    opt = torch.optim.Adam(groups, lr=lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)     # restores each group's "base" too: resume is exact
    teacher.mode = "float"
    for p in teacher.parameters():
        p.requires_grad_(False)
    step, last_save, t0 = start_step, time.time(), time.time()
    taps = set(g.block_outputs()) if feat else set()
    extra = dict(extra or {})

    def save():
        save_ckpt(ckpt_path, g, opt=opt.state_dict(), step=step, **extra)

    while step < steps:
        if ramp:                                   # progressive ternarization, layer by layer
            n_on = min(len(ramp_layers), math.ceil(len(ramp_layers) * (step + 1) / ramp))
            for name in ramp_layers[:n_on]:
                if g.wmode[name] != "ternary":
                    g.set_wmode(name, "ternary")
        cur = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        for grp in opt.param_groups:           # lr_rel: each tensor's own rate, same schedule
            grp["lr"] = grp["base"] * cur / lr if lr_rel else cur
        x = aug.batch(batch, step)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g.mode = "fake"
        with torch.no_grad():
            tl, tf = teacher.forward_taps(teacher.input_real(x), taps)
        sl, sf = g.forward_taps(g.input_real(x), taps)
        loss = kd = kd_loss(sl, tl, T)
        if feat:
            fl = feature_loss(sf, tf)
            loss = kd + feat * fl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            rate = 10 * batch / (time.time() - t0)
            t0 = time.time()
            parts = f" (kd {kd.item():.4f}, features {fl.item():.4f})" if feat else ""
            log(f"step {step}/{steps} loss {loss.item():.4f}{parts} lr {cur:.2e} {rate:.2f} img/s")
        if eval_every and step % eval_every == 0:
            for name, hx in held_x.items():
                log(f"heldout {name} step {step}: {heldout_metrics(g, teacher, hx, T)}")
        if time.time() - last_save > save_every:
            save()
            last_save = time.time()
            log(f"saved {ckpt_path} at step {step}")
    save()
    return g
