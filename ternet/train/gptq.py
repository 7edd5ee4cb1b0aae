"""Sequential second-order ternarization of the pointwise layers (GPTQ with a ternary grid).

One pass over the graph, node by node, with the float teacher and the partially quantized
student side by side on the same calibration images (CIFAR-10 train crops):

* at each pointwise layer to ternarize, from the student's (quantized) inputs Xq and the
  teacher's inputs Xf: Hqq = Xq'Xq, Hfq = Xf'Xq. The float weights that best reproduce the
  teacher's output from the student's inputs are W' = W Hfq Hqq^-1 (this absorbs the error of
  every earlier layer); W' is ternarized column by column, each column's rounding error pushed
  onto the not yet rounded columns through the inverse Hessian (Frantar et al., GPTQ, 2022),
  then the per-channel scales are refitted by least squares and the rounding redone;
* after every weighted node the student's per-channel output mean is matched to the teacher's
  (bias correction), so systematic shifts do not accumulate.

The result is stored as latent weights scale * {-1, 0, 1}, which `fakequant.ternary_weight`
maps back to exactly these codes and scales.
"""
from __future__ import annotations

import torch

from .calibrate import walk_pair
from .fakequant import WEIGHTED, QuantGraph, key, ternary_weight


def _cols(x: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    """NCHW -> [pixels, C] float64, at most max_rows random pixels."""
    m = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if len(m) > max_rows:
        m = m[torch.randperm(len(m), generator=gen)[:max_rows]]
    return m.double()


def gptq_ternary(w: torch.Tensor, h: torch.Tensor, rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """w f64[Cout, Cin], h f64[Cin, Cin] (damped, positive definite) -> (t in {-1,0,1}, alpha[Cout])
    minimising approximately sum_c (w_c - alpha_c t_c) h (w_c - alpha_c t_c)'."""
    cout, cin = w.shape
    perm = torch.argsort(torch.diag(h), descending=True)       # most important columns first
    inv = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    t0, a0 = ternary_weight(w)
    alpha = a0.double()
    t = t0
    for _ in range(rounds):
        wk = w.clone()
        t = torch.zeros_like(w)
        for i in range(cin):
            col = wk[:, i]
            q = torch.clamp(torch.round(col / alpha), -1, 1)
            t[:, i] = q
            err = (col - q * alpha) / hinv[i, i]
            wk[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        th = t @ h
        num, den = (th * w).sum(1), (th * t).sum(1)
        alpha = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), alpha)
    return t[:, inv], alpha


@torch.no_grad()
def gptq_ternarize(g: QuantGraph, ref: QuantGraph, x: torch.Tensor, names, *, damp: float = 0.01,
                   max_rows: int = 200_000, chunk: int = 16, rounds: int = 3,
                   keep_filters: float = 0.0, log=print) -> None:
    """Ternarize the pointwise layers `names` of g (fake-quant student) against ref (float).
    keep_filters > 0: per-filter hybrid (Gope et al.): in every such layer that fraction of the
    filters with the largest relative ternarization error (in the Hessian norm) stay int8."""
    names = set(names)
    gen = torch.Generator().manual_seed(0)

    def node_outputs(n, vq, vf, run):
        name, k = n["name"], key(n["name"])
        if name in names:
            src = n["inputs"][0]
            gen_state = gen.get_state()
            xq = _cols(vq[src], max_rows, gen)
            gen.set_state(gen_state)                    # the same pixels from both networks
            xf = _cols(vf[src], max_rows, gen)
            hqq, hfq = xq.T @ xq, xf.T @ xq
            diag = torch.diag(hqq)
            hd = hqq + damp * diag.mean() * torch.eye(len(hqq), dtype=torch.float64)
            dead = diag == 0
            hd[dead, dead] = 1.0
            w = ref.weight[k].detach().double().reshape(len(ref.weight[k]), -1)
            wp = torch.linalg.solve(hd, (w @ hfq).T).T            # W' = W Hfq Hqq^-1
            t, alpha = gptq_ternary(wp, hd, rounds)
            t[:, dead] = 0
            t0, a0 = ternary_weight(wp)
            e0, e1 = wp - t0 * a0.double()[:, None], wp - t * alpha[:, None]
            before, after = (e0 @ hd * e0).sum(), (e1 @ hd * e1).sum()
            latent = t * alpha[:, None]
            keep = int(round(keep_filters * len(wp)))
            if keep:
                rel = (e1 @ hd * e1).sum(1) / (wp @ hd * wp).sum(1).clamp_min(1e-30)
                rows = torch.argsort(rel, descending=True)[:keep]
                latent[rows] = wp[rows]                  # int8 rows: the corrected float weights
                g.set_wmode(name, "hybrid", int8_rows=rows.tolist())
            else:
                g.set_wmode(name, "ternary")
            g.weight[k].copy_(latent.reshape(g.weight[k].shape).float())
            log(f"gptq {name}: {w.shape[1]}->{w.shape[0]}, {len(xq)} px, proxy error "
                f"{float(after / before):.3f} of plain ternarization, sparsity {float((t == 0).double().mean()):.2f}")
        yf = run(ref, n, vf)
        yq = run(g, n, vq)
        if n["op"] in WEIGHTED:                    # bias correction: match per-channel means
            dims = (0,) if n["op"] == "linear" else (0, 2, 3)
            delta = yf.mean(dims) - yq.mean(dims)
            g.bias[k].add_(delta)
            yq = yq + (delta if n["op"] == "linear" else delta.view(1, -1, 1, 1))
            g._int = None
        return yq, yf

    walk_pair(g, ref, x, node_outputs, chunk)
