"""The op registry: every graph op of the model format, one module each (`ternet/ops/<op>.py`).

An op module defines `OP = ternet.ops._base.Op(...)`: what the op is (attributes, the loader's
check, output shape), its quantization parameters, its numpy reference step, the factory of its
fast step and its `ternet info` accounting. The loader (`format.py`), the reference runner
(`reference.py`), the lowering to fast steps (`lowering.py`) and `ternet info` loop over
`REGISTRY`; adding an op is adding its module (found here by its file name) with its kernel.

Importing this package imports no numba: kernels are imported when a step is built or a
reference step runs.
"""
from __future__ import annotations

import importlib
import pkgutil

from ._base import Cost, Op, Shape, Value

__all__ = ["REGISTRY", "Cost", "Op", "Shape", "Value", "get", "names"]


def _discover() -> dict[str, Op]:
    ops = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        op = importlib.import_module(f"{__name__}.{info.name}").OP
        if op.name != info.name:
            raise ImportError(f"ternet/ops/{info.name}.py defines op {op.name!r}")
        ops[op.name] = op
    return ops


REGISTRY: dict[str, Op] = _discover()


def get(name: str) -> Op:
    """The op named `name` (KeyError if the format has no such op)."""
    return REGISTRY[name]


def names(**flags) -> tuple[str, ...]:
    """Op names, those whose Op fields equal `flags` (e.g. names(weighted=True))."""
    return tuple(n for n, op in REGISTRY.items()
                 if all(getattr(op, k) == v for k, v in flags.items()))
