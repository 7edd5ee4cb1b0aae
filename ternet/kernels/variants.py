"""Kernels made by factories: one definition of a driver body, one named kernel per variant.

A kernel family (a micro-kernel called per work item, with serial / parallel / fused variants per
ISA) is written once as a closure in a factory; `variant` turns each closure into a `kernel()`
with its own name. numba's on-disk cache keeps working for such functions only under conditions,
which `variant` enforces:

* numba names a function's cache files after its module, `__qualname__` and first line number,
  and keys the entries in them by signature plus hashes of the bytecode and of the pickled
  closure cells. Closures from one factory share the qualname ("f.<locals>.g"), the line and the
  bytecode; a serial and a parallel copy share the cells as well. So every variant gets a
  qualname of its own (its public name), unique per module: checked here.
* The cells must pickle the same way in every process, or every process misses the cache: they
  may hold only plain constants (int, str, bool, float), the variant's parameters. Intrinsics and
  other numba objects are reached through module globals (not part of the key; a change to them
  changes the kernel sources, which `_jit._sources_digest` covers).
* An int cell is a compile-time constant inside the kernel: intrinsics that take it as an argument
  see an `IntegerLiteral` and can specialise on it.
"""
from __future__ import annotations

from ._jit import kernel

_PLAIN = (int, str, bool, float)
_NAMES: set = set()


def variant(fn, name: str, module: str, parallel: bool = False, **opts):
    """The closure fn as the kernel `module.name` (a `_jit.kernel`, cached on disk)."""
    cells = [c.cell_contents for c in fn.__closure__ or ()]
    bad = [type(v).__name__ for v in cells if not isinstance(v, _PLAIN)]
    if bad:
        raise TypeError(f"{name}: closure cells must be plain constants for numba's cache, got {bad}")
    if (module, name) in _NAMES:
        raise ValueError(f"{module}.{name} made twice: its cache files would collide")
    _NAMES.add((module, name))
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = module
    return kernel(parallel=parallel, **opts)(fn)
