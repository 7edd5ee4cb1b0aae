"""Top-1 / top-5 on the ImageNet dev images (reporting only; never used to choose anything)."""
from __future__ import annotations

import numpy as np
import torch


def topk(logits, labels) -> dict:
    logits = torch.as_tensor(np.asarray(logits))
    top5 = logits.topk(5, 1).indices.numpy()
    labels = np.asarray(labels)
    return {"top1": float(np.mean(top5[:, 0] == labels)),
            "top5": float(np.mean((top5 == labels[:, None]).any(1))), "n": int(len(labels))}


@torch.no_grad()
def logits_of(g, x: torch.Tensor, mode: str, batch: int = 50) -> torch.Tensor:
    """Logits of a QuantGraph on uint8-valued NCHW x; mode 'float', 'fake' or 'int'."""
    saved, g.mode = g.mode, mode
    out = [g(xb if mode == "int" else g.input_real(xb)) for xb in x.split(batch)]
    g.mode = saved
    return torch.cat(out).float()


def reference_logits(path, x: torch.Tensor, batch: int = 20) -> np.ndarray:
    """Logits of an exported file by ternet's numpy reference runner."""
    from ternet.format import read_model
    from ternet.reference import run_reference
    mf = read_model(path)
    xs = x.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return np.concatenate([run_reference(mf, xs[i:i + batch]) for i in range(0, len(xs), batch)])
