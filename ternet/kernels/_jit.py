"""The one Numba decorator used by every kernel: lazy compile, on-disk cache, no fastmath.

Importing this module imports numba but compiles nothing: kernels compile on first call and are
cached on disk in `ternet.cachedir.numba_cache_dir()` (the user cache directory, whatever numba's
own default), never next to the sources: see `ternet.cachedir` for why.
"""
import functools
import hashlib
import os
import sys
from pathlib import Path

import numba
import numpy as np

from .. import config, numba_internals
from ..cachedir import numba_cache_dir

# Bounds checking for debugging and CI (`NUMBA_BOUNDSCHECK=1` also works, globally).
_BOUNDSCHECK = config.get("TERNET_BOUNDSCHECK") or None
_CACHE = config.get("TERNET_NUMBA_CACHE")


U = np.uint64  # unsigned index type: signed computed indices defeat vectorisation (kernels.md 7)


_SERIAL_ONLY = False      # set in a child forked after numba started GNU OpenMP's threads


def _after_fork_in_child() -> None:
    """GNU OpenMP cannot run a parallel region in a process forked after it started: numba's
    omp layer kills such a child (SIGTERM, "fork() called from a process already using GNU
    OpenMP"). numba deems omp fork-safe everywhere but Linux. In such a child every kernel runs
    its serial variant (`num_threads` answers 1): same results (kernels are deterministic across
    thread counts), one core per layer."""
    global _SERIAL_ONLY
    if sys.platform.startswith("linux") and numba_internals.omp_started():
        _SERIAL_ONLY = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """numba.get_num_threads() without its per-call locking (~1 us instead of several, and the
    plans ask once per layer call): once the threading layer is up, read the thread-local count
    through numba's own ctypes accessor. 1 where parallel kernels must not run."""
    if _SERIAL_ONLY:
        return 1
    get = numba_internals.num_threads_getter()
    if get is None:
        return numba.get_num_threads()
    n = get()
    return n if n > 0 else numba.get_num_threads()


@functools.cache
def _sources_digest() -> str:
    """Hash of every kernel source file and of quant.py, which they import. numba checks only
    the file a kernel is defined in before reusing its cached machine code, but a kernel also
    compiles in code from other files (vnni.py's and dw_vnni.py's intrinsics, helpers inlined
    from conv.py, constants): after an edit or an upgrade that changes only one of those, the
    old code would run, giving wrong answers. Costs well under 1 ms, once per process."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in [*sorted(here.glob("*.py")), here.parent / "quant.py"]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _cache_path(subpath: str) -> str:
    """A kernel's cache directory: one subdirectory per source directory (numba's `subpath`:
    installs never collide) and per version of the kernel sources, in `numba_cache_dir()`.

    numba picks a kernel's cache directory from its global config when the kernel is decorated:
    `NUMBA_CACHE_DIR` as read when numba was first imported, else `__pycache__` next to the
    source. Setting the variable ourselves would miss the case where numba was imported first
    (and would move the user's own numba caches too), so ternet's kernels get a cache object of
    their own (`numba_internals.user_dir_cache_class`)."""
    return os.path.join(numba_cache_dir(), f"{subpath}_{_sources_digest()}")


_USER_DIR_CACHE = numba_internals.user_dir_cache_class(_cache_path) if _CACHE else None


def _enable_cache(disp) -> None:
    """Cache disp's compiled code on disk in the user cache directory. Where that directory
    cannot be created or written, kernels compile in every process (as with
    TERNET_NUMBA_CACHE=0): slow, but never the package directory, and never a failed import."""
    if _USER_DIR_CACHE is not None:
        try:
            numba_internals.set_cache(disp, _USER_DIR_CACHE)
        except RuntimeError:            # numba: "no locator available" (directory unusable)
            pass
        return
    # unknown numba internals: fall back to numba's global setting, pointed at the same place
    if not numba.config.CACHE_DIR:
        numba.config.CACHE_DIR = str(numba_cache_dir())
    disp.enable_caching()


def kernel(parallel: bool = False, **kw):
    """njit with ternet's policy. fastmath stays off: the requantization must round exactly
    like the numpy reference (FMA contraction would change results)."""
    cache = kw.pop("cache", _CACHE)
    opts = dict(cache=False, nogil=True, error_model="numpy", fastmath=False,
                boundscheck=_BOUNDSCHECK, parallel=parallel)
    opts.update(kw)

    def decorate(fn):
        disp = numba.njit(**opts)(fn)
        if cache:
            _enable_cache(disp)
        return disp
    return decorate
