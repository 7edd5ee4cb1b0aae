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

from .. import config
from ..cachedir import numba_cache_dir

# Bounds checking for debugging and CI (`NUMBA_BOUNDSCHECK=1` also works, globally).
_BOUNDSCHECK = config.get("TERNET_BOUNDSCHECK") or None
_CACHE = config.get("TERNET_NUMBA_CACHE")


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


_SERIAL_ONLY = False      # set in a child forked after numba started GNU OpenMP's threads


def _after_fork_in_child() -> None:
    """GNU OpenMP cannot run a parallel region in a process forked after it started: numba's
    omp layer kills such a child (SIGTERM, "fork() called from a process already using GNU
    OpenMP"). numba deems omp fork-safe everywhere but Linux. In such a child every kernel runs
    its serial variant (`num_threads` answers 1): same results (kernels are deterministic across
    thread counts), one core per layer."""
    global _SERIAL_ONLY
    from numba.np.ufunc import parallel
    if (sys.platform.startswith("linux") and getattr(parallel, "_is_initialized", False)
            and getattr(parallel, "_threading_layer", None) == "omp"):
        _SERIAL_ONLY = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """numba.get_num_threads() without its per-call locking (~1 us instead of several, and the
    plans ask once per layer call): once the threading layer is up, read the thread-local count
    through numba's own ctypes accessor. 1 where parallel kernels must not run."""
    if _SERIAL_ONLY:
        return 1
    from numba.np.ufunc import parallel
    get = getattr(parallel, "_get_num_threads", None)
    if get is None or not getattr(parallel, "_is_initialized", False):
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


def _user_dir_cache_class():
    """numba's FunctionCache with a locator that always answers `numba_cache_dir()`.

    numba picks a kernel's cache directory from its global config when the kernel is decorated:
    `NUMBA_CACHE_DIR` as read when numba was first imported, else `__pycache__` next to the
    source. Setting the variable ourselves would miss the case where numba was imported first
    (and would move the user's own numba caches too), so ternet's kernels get a cache object of
    their own. The classes are numba internals whose names changed across versions (0.59:
    `_UserProvidedCacheLocator`): None if they are not found."""
    from numba.core import caching
    base = (getattr(caching, "UserProvidedCacheLocator", None)
            or getattr(caching, "_UserProvidedCacheLocator", None))
    impl = getattr(caching, "CompileResultCacheImpl", None)
    cache = getattr(caching, "FunctionCache", None)
    if base is None or impl is None or cache is None:
        return None

    class Locator(base):
        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            # one subdirectory per source directory, as numba does (installs never collide), and
            # per version of the kernel sources
            sub = f"{self.get_suitable_cache_subpath(py_file)}_{_sources_digest()}"
            self._cache_path = os.path.join(numba_cache_dir(), sub)

        @classmethod
        def from_function(cls, py_func, py_file):
            return super(base, cls).from_function(py_func, py_file)   # skips base's CACHE_DIR test

    class Impl(impl):
        _locator_classes = [Locator]

    class Cache(cache):
        _impl_class = Impl

    return Cache


_USER_DIR_CACHE = _user_dir_cache_class() if _CACHE else None


def _enable_cache(disp) -> None:
    """Cache disp's compiled code on disk in the user cache directory. Where that directory
    cannot be created or written, kernels compile in every process (as with
    TERNET_NUMBA_CACHE=0): slow, but never the package directory, and never a failed import."""
    if _USER_DIR_CACHE is not None:
        try:
            disp._cache = _USER_DIR_CACHE(disp.py_func)
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
