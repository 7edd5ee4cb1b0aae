"""Block-wise reconstruction (BRECQ-style, Li et al. 2021) of a quantized student.

The graph is cut into groups (the stem with block 0, each inverted-residual block, then
head + pool + classifier). Group by group, in order: the student's inputs to the group (from the
already reconstructed groups, fake-quantized) and the float teacher's outputs of the group (from
float inputs) are cached for N calibration images (CIFAR-10 train crops); then the group's latent
weights and biases are trained with Adam to minimise the mean squared error between the
student's group output (fake-quant weights with straight-through estimator, uint8 activations)
and the teacher's. So every group learns to undo the error of everything before it, with a
dense per-pixel signal instead of the 1000 logits of end-to-end distillation.
"""
from __future__ import annotations

import math
import time

import torch

from .fakequant import WEIGHTED, QuantGraph, key


def groups(g: QuantGraph) -> list[list[int]]:
    """Node indices per group: stem + block 0, each block, then the head to the logits."""
    out, cur, prefix = [], [], None
    for i, n in enumerate(g.spec):
        name = n["name"]
        p = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else "tail"
        if name == "stem":
            p = "blocks.0"
        if p != prefix and cur:
            out.append(cur)
            cur = []
        prefix = p
        cur.append(i)
    out.append(cur)
    return out


def _external_inputs(g: QuantGraph, idx: list[int]) -> list[str]:
    inside = {g.spec[i]["name"] for i in idx}
    ext = []
    for i in idx:
        for s in g.spec[i]["inputs"]:
            if s not in inside and s not in ext:
                ext.append(s)
    return ext


def _run_group(graph: QuantGraph, idx, inputs: dict) -> torch.Tensor:
    vals = dict(inputs)
    for i in idx:
        n = graph.spec[i]
        vals[n["name"]] = graph.node_post(n, graph.node_pre(n, vals))
    return vals[graph.spec[idx[-1]]["name"]]


@torch.no_grad()
def _advance(graph: QuantGraph, idx, vals: dict, chunk: int) -> torch.Tensor:
    """Run a group over all cached images in chunks; returns its output."""
    ext = _external_inputs(graph, idx)
    n = len(vals[ext[0]])
    return torch.cat([_run_group(graph, idx, {s: vals[s][i:i + chunk] for s in ext})
                      for i in range(0, n, chunk)])


def reconstruct(g: QuantGraph, ref: QuantGraph, x: torch.Tensor, *, steps: int, batch: int,
                lr: float, log, start_group: int = 0, on_group_done=None, chunk: int = 16) -> None:
    """Reconstruct groups start_group.. of student g against float teacher ref on images x."""
    g.mode, ref.mode = "fake", "float"
    for p in ref.parameters():
        p.requires_grad_(False)
    gs = groups(g)
    vq, vf = {"input": g.input_real(x)}, {"input": ref.input_real(x)}
    last = g._last_use
    for gi, idx in enumerate(gs):
        name_out = g.spec[idx[-1]]["name"]
        if gi >= start_group:
            ext = _external_inputs(g, idx)
            target = _advance(ref, idx, vf, chunk)
            params = []
            for i in idx:
                n = g.spec[i]
                if n["op"] in WEIGHTED:
                    k = key(n["name"])
                    for t in (g.weight[k], g.bias[k]):
                        t.requires_grad_(True)
                        params.append({"params": [t], "lr": lr * float(t.detach().abs().mean() + 1e-6)})
            opt = torch.optim.Adam(params)
            base = [p["lr"] for p in opt.param_groups]
            gen = torch.Generator().manual_seed(gi)
            t0 = time.time()
            with torch.no_grad():
                before = float(((_advance(g, idx, vq, chunk) - target) ** 2).mean())
            for step in range(steps):
                f = 0.5 * (1 + math.cos(math.pi * step / steps))
                for p, b in zip(opt.param_groups, base):
                    p["lr"] = b * f
                pick = torch.randint(0, len(x), (batch,), generator=gen)
                out = _run_group(g, idx, {s: vq[s][pick] for s in ext})
                loss = ((out - target[pick]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                g._int = None
            for p in params:
                p["params"][0].requires_grad_(False)
            with torch.no_grad():
                after = float(((_advance(g, idx, vq, chunk) - target) ** 2).mean())
            var = float(target.var())
            log(f"group {gi} ({g.spec[idx[0]]['name']}..{name_out}): relative mse {before / var:.4f} -> "
                f"{after / var:.4f}, "
                f"{steps} steps in {time.time() - t0:.0f}s")
            if on_group_done:
                on_group_done(gi + 1)
        # advance both caches past this group
        vf[name_out] = target if gi >= start_group else _advance(ref, idx, vf, chunk)
        vq[name_out] = _advance(g, idx, vq, chunk)
        for s in list(vq):
            if s != name_out and s in last and last[s] <= idx[-1]:
                vq.pop(s, None)
                vf.pop(s, None)
