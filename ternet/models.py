"""Bundled models: names like `efficientnet_lite0_prom` resolve to files in `weights/`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".safetensors"


def weights_dirs() -> list[Path]:
    """Where bundled weights live: the source checkout's weights/, then the installed copy
    (pyproject maps weights/ to the package data directory ternet/weights/)."""
    here = Path(__file__).resolve().parent
    dirs = [here.parent / "weights", here / "weights"]
    return [d for d in dirs if d.is_dir() and any(d.glob("*" + SUFFIX))]


@dataclass(frozen=True)
class BundledModel:
    name: str
    path: Path


def bundled() -> list[BundledModel]:
    seen, out = set(), []
    for d in weights_dirs():
        for p in sorted(d.glob("*" + SUFFIX)):
            name = p.name[: -len(SUFFIX)]
            if name not in seen:
                seen.add(name)
                out.append(BundledModel(name, p))
    return out


def resolve(name_or_path) -> Path:
    """A path that exists, or a bundled model name; FileNotFoundError lists the bundled names."""
    p = Path(name_or_path)
    if p.exists() or p.suffix == SUFFIX or "/" in str(name_or_path):
        return p
    for m in bundled():
        if m.name == str(name_or_path):
            return m.path
    names = ", ".join(m.name for m in bundled()) or "none installed"
    raise FileNotFoundError(f"{name_or_path}: no such model file or bundled model (bundled: {names})")
