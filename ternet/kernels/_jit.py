"""The one Numba decorator used by every kernel: lazy compile, on-disk cache, no fastmath.

Importing this module imports numba but compiles nothing: kernels compile on first call and are
cached (`cache=True`) in numba's cache directory, which `ternet.kernels` points at a writable
user directory when the package directory is read-only.
"""
import os

import numba
import numpy as np

# Bounds checking for debugging and CI (`NUMBA_BOUNDSCHECK=1` also works, globally).
_BOUNDSCHECK = os.environ.get("TERNET_BOUNDSCHECK", "") == "1" or None
_CACHE = os.environ.get("TERNET_NUMBA_CACHE", "1") != "0"


def _keep_object_code() -> None:
    """numba hands a cached kernel's object code to the JIT and drops it; keep a reference so
    `ternet.freeze` can store it without compiling the kernel again (optional: if numba's
    internals differ, freeze compiles a fresh copy instead)."""
    try:
        from numba.core.codegen import CPUCodeLibrary
        orig = CPUCodeLibrary.__dict__["_object_getbuffer_hook"].__func__
    except (ImportError, KeyError, AttributeError):
        return
    if getattr(orig, "_ternet", False):
        return

    def hook(cls, ll_module):
        buf = orig(cls, ll_module)
        if buf:
            lib = getattr(ll_module, "_CPUCodeLibrary__library", None)
            if lib is not None:
                lib._ternet_object = buf
        return buf
    hook._ternet = True
    CPUCodeLibrary._object_getbuffer_hook = classmethod(hook)


_keep_object_code()

U = np.uint64  # unsigned index type: signed computed indices defeat vectorisation (kernels.md 7)


def num_threads() -> int:
    """numba.get_num_threads() without its per-call locking (~1 us instead of several, and the
    plans ask once per layer call): once the threading layer is up, read the thread-local count
    through numba's own ctypes accessor."""
    from numba.np.ufunc import parallel
    get = getattr(parallel, "_get_num_threads", None)
    if get is None or not getattr(parallel, "_is_initialized", False):
        return numba.get_num_threads()
    n = get()
    return n if n > 0 else numba.get_num_threads()


def kernel(parallel: bool = False, **kw):
    """njit with ternet's policy. fastmath stays off: the requantization must round exactly
    like the numpy reference (FMA contraction would change results)."""
    opts = dict(cache=_CACHE, nogil=True, error_model="numpy", fastmath=False,
                boundscheck=_BOUNDSCHECK, parallel=parallel)
    opts.update(kw)
    return numba.njit(**opts)
