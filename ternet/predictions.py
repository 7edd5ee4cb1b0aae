"""Turning logits into ranked, labelled predictions (library and CLI share this structure)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["Prediction", "softmax", "top_k"]


@dataclass(frozen=True)
class Prediction:
    rank: int           # 1 = most likely
    index: int          # class index in the model's output
    label: str
    probability: float  # softmax of the float32 logits, computed in float64

    def as_dict(self) -> dict:
        return asdict(self)


def softmax(logits) -> np.ndarray:
    """Softmax over the last axis in float64; max-subtracted so large logits cannot overflow."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def top_k(logits_row, labels: Sequence[str], k: int = 5) -> list[Prediction]:
    """The k most likely classes of one logits vector; ties go to the lower class index.

    Ranking uses the logits themselves (softmax can map distinct logits to equal
    probabilities when exp underflows). Classes without a label are named `class_<i>`.
    """
    z = np.asarray(logits_row)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"expected one non-empty row of logits, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinity")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = softmax(z)
    # Stable sort of the negated logits keeps equal logits in ascending index order.
    order = np.argsort(-z.astype(np.float64), kind="stable")[:k]
    return [Prediction(rank=r + 1, index=int(i),
                       label=labels[i] if i < len(labels) else f"class_{i}",
                       probability=float(p[i]))
            for r, i in enumerate(order)]
