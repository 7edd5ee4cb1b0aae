"""Is numba's on-disk cache of ternet's kernels warm? A cheap guess, for the CLI's notice.

Asking numba itself would mean importing it and building every kernel's cache index. Instead,
after a run that compiled (or loaded) the kernels successfully, the CLI writes an empty marker
file into the numba cache directory. Its name hashes everything numba's cache depends on:

* ternet and numba versions, Python version, and the CPU model name (numba caches per CPU);
* size and mtime of every kernel source file (numba invalidates on these too);
* the `--kernels` choice and the set of ops / pointwise weight kinds of the model, which decide
  which kernels get compiled.

If the marker is missing the cache is taken as cold. Deleting the numba cache directory
(`ternet.cachedir.numba_cache_dir()`: `NUMBA_CACHE_DIR`, else `~/.cache/ternet/numba`) deletes
the markers with it. A wrong guess costs only a missing or superfluous notice.
"""
from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

from .cachedir import numba_cache_dir

_PREFIX = "ternet-warm-"


def cache_dir() -> Path:
    """Where numba writes ternet's kernel cache (and so where the markers live)."""
    return numba_cache_dir()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> list[str]:
    import numba  # already imported by the kernels when this runs; importlib.metadata is slower

    from . import __version__
    return [__version__, numba.__version__, sys.version.split()[0], _cpu_name()]


def _sources() -> list[str]:
    from . import kernels
    d = Path(kernels.__file__).resolve().parent
    out = []
    for p in sorted(d.glob("*.py")):
        st = p.stat()
        out.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return out


def model_signature(model_file) -> str:
    """Which kernels a model needs: its ops and pointwise weight kinds."""
    kinds = {n.op if n.op != "pointwise" else f"pointwise:{n.attrs.get('weight')}"
             for n in model_file.graph}
    return ",".join(sorted(kinds))


def marker(kernels: str, signature: str) -> Path:
    h = hashlib.sha256("\n".join(_versions() + _sources() + [kernels, signature]).encode())
    return cache_dir() / (_PREFIX + h.hexdigest()[:20])


def is_warm(kernels: str, signature: str) -> bool:
    if kernels == "reference":          # numpy only: nothing to compile
        return True
    try:
        return marker(kernels, signature).exists()
    except OSError:
        return False


def mark_warm(kernels: str, signature: str) -> None:
    """Record a successful compile; failures are ignored (the notice just repeats)."""
    if kernels == "reference":
        return
    try:
        m = marker(kernels, signature)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()
    except OSError:
        pass
