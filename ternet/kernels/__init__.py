"""Numba kernels. Importing this package imports numba (never compiles anything).

Before numba is imported we make sure its on-disk cache can be written: when the installed
package directory is read-only, compiled kernels go to a per-user cache directory instead.
"""
import os
import sys


def _cache_dir() -> str | None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    if os.access(here, os.W_OK):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ternet", "numba")


if "numba" not in sys.modules:
    _d = _cache_dir()
    if _d:
        os.makedirs(_d, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = _d
