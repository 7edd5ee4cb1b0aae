"""What a model file is, from its safetensors header alone (no tensor data is read).

Used by `ternet models` and to pick the CLI's default model, which must stay cheap: reading
and validating every bundled file in full just to list them would cost seconds.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import config

FALLBACK_DEFAULT = "efficientnet_lite0_prom"
USABLE_GAP = 3.0      # points of top-1 below its own FP32 reference a ternary default may lose


@dataclass(frozen=True)
class ModelSummary:
    name: str
    path: str
    arch: str
    num_classes: int
    pointwise: str            # "ternary", "int8", "hybrid", "mixed" or "-" (none)
    top1: float | None        # percent, from ternet.metrics
    top5: float | None
    size_bytes: int
    metric_key: str = ""      # where top1 came from in ternet.metrics, e.g. "dev200_top1"
    ref_top1: float | None = None   # the FP32 model's top-1 on the same images, if recorded

    @property
    def usable(self) -> bool:
        """Within USABLE_GAP points of its FP32 reference (True when either is unknown)."""
        return self.top1 is None or self.ref_top1 is None or self.top1 >= self.ref_top1 - USABLE_GAP

    @property
    def is_imagenet(self) -> bool:
        return self.num_classes == 1000

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "arch": self.arch,
                "num_classes": self.num_classes, "pointwise": self.pointwise,
                "top1": self.top1, "top5": self.top5, "metric_key": self.metric_key,
                "size_bytes": self.size_bytes, "ref_top1": self.ref_top1, "usable": self.usable}


def read_metadata(path) -> dict:
    """The `__metadata__` string map of a safetensors file (header only)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def _json(meta: dict, key: str, default):
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        return default


_REFERENCE_WORDS = ("fp32", "fp16", "float", "baseline", "reference", "teacher")


def find_metric(metrics, which: str = "top1") -> tuple[float, str] | None:
    """Find a top-1 (or top-5) accuracy of *this* file in a metrics object of unknown layout.

    Returns (percent, key path) or None. Accepts flat or nested dicts and key spellings like
    top1, top_1, acc@1, dev200_top1; skips accuracies of a float reference model (keys
    mentioning fp32, float, baseline, ...); prefers entries whose key path mentions ImageNet.
    Fractions (<= 1) are turned into percents.
    """
    n = which[-1]
    found: list[tuple[bool, str, float]] = []

    def walk(obj, trail: str):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{trail}/{k}" if trail else str(k))
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            low = trail.lower()
            key = low.rsplit("/", 1)[-1].replace("_", "").replace("-", "").replace(" ", "")
            if any(w in low for w in _REFERENCE_WORDS):
                return
            if key.startswith((f"top{n}", f"acc@{n}", f"acc{n}")) or key.endswith(f"top{n}"):
                found.append(("imagenet" in low, trail, float(obj)))

    walk(metrics or {}, "")
    if not found:
        return None
    _, key, v = sorted(found, key=lambda t: not t[0])[0]   # an ImageNet entry first, if any
    return (v * 100.0 if v <= 1.0 else v), key


def reference_top1(metrics) -> float | None:
    """The float reference model's top-1 recorded next to the file's own (e.g. dev200_fp32_top1)."""
    if not isinstance(metrics, dict):
        return None
    for k, v in metrics.items():
        low = str(k).lower().replace("_", "")
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and "top1" in low
                and any(w in low for w in ("fp32", "float"))):
            return float(v) * 100.0 if v <= 1.0 else float(v)
    return None


def metric(metrics, which: str = "top1") -> float | None:
    """Percent accuracy from `find_metric`, or None."""
    r = find_metric(metrics, which)
    return None if r is None else r[0]


def summarize(path, name: str | None = None) -> ModelSummary:
    """Summary of one model file; raises OSError/ValueError if the header cannot be read."""
    p = Path(path)
    meta = read_metadata(p)
    graph = _json(meta, "ternet.graph", [])
    kinds = {n.get("attrs", {}).get("weight") for n in graph
             if isinstance(n, dict) and n.get("op") == "pointwise"}
    pointwise = "-" if not kinds else (kinds.pop() if len(kinds) == 1 else "mixed")
    metrics = _json(meta, "ternet.metrics", {})
    top1 = find_metric(metrics, "top1")
    return ModelSummary(
        name=name or p.name.removesuffix(".safetensors"), path=str(p),
        arch=meta.get("ternet.arch", "?"), num_classes=len(_json(meta, "ternet.labels", [])),
        pointwise=str(pointwise), top1=top1[0] if top1 else None, top5=metric(metrics, "top5"),
        size_bytes=os.path.getsize(p), metric_key=top1[1] if top1 else "",
        ref_top1=reference_top1(metrics))


def bundled_summaries() -> list[ModelSummary]:
    """Summaries of the bundled models; unreadable files are left out."""
    from .models import bundled
    out = []
    for m in bundled():
        try:
            out.append(summarize(m.path, m.name))
        except ImportError:     # a missing dependency is not a broken file: say so
            raise
        except Exception:  # a broken bundled file must not break listing or the default choice
            continue
    return out


DEFAULT_RULE = (f"the most accurate bundled all-ternary ImageNet model within {USABLE_GAP:g} "
                "points of its FP32 top-1, else the most accurate bundled ImageNet model")


def default_model() -> str:
    """`TERNET_MODEL` if set, else `bundled_default()`."""
    return config.get("TERNET_MODEL") or bundled_default()


def bundled_default() -> str:
    """The most accurate bundled ImageNet model whose pointwise convs are all ternary, if it is
    usable (within USABLE_GAP points of the FP32 top-1 recorded in the same file).

    Models without a recorded top-1 rank last. With no usable all-ternary model bundled, the
    most accurate bundled ImageNet model (whatever its weights: the command must name what is in
    the photo); with none at all, `efficientnet_lite0_prom` (its absence is reported when
    loading). DEFAULT_RULE says this in one line for `--help`.
    """
    imagenet = [s for s in bundled_summaries() if s.is_imagenet]
    for kinds in (("ternary",), None):
        cands = [s for s in imagenet if kinds is None or (s.pointwise in kinds and s.usable)]
        if cands:
            best = max(cands, key=lambda s: (s.top1 if s.top1 is not None else -1.0,
                                             s.name == FALLBACK_DEFAULT))
            return best.name
    return FALLBACK_DEFAULT
