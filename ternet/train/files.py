"""Reading the training toolkit's own .pt files (checkpoints, synthetic image sets) with one-line
errors that name the file and the problem, so a wrong path or a corrupt file never ends a
command in a traceback."""
from __future__ import annotations

from pathlib import Path

import torch


class InputFileError(ValueError):
    """An input file of a training command is missing, unreadable or not the kind it needs."""


def load_pt(path, what: str, keys: tuple[str, ...], weights_only: bool = True) -> dict:
    """The dict stored in `path`, which must hold `keys`; `what` names the kind of file in errors.
    weights_only=False only for our own checkpoints (they pickle a graph description)."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{path}: no such file (expected a {what})")
    try:
        d = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as e:      # corrupt or foreign files fail in pickle, zip or torch code alike
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise InputFileError(f"{path}: not a readable {what} ({type(e).__name__}: {first})") from None
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise InputFileError(f"{path}: not a {what} (no {', '.join(missing)})")
    return d
