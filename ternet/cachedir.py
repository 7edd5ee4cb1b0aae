"""Where ternet keeps its caches: in the user's cache directory, never inside the package.

* numba's compiled kernels: `$NUMBA_CACHE_DIR`, else `<user cache>/numba`;
* replays (`ternet.replay`): `$TERNET_CACHE_DIR/frozen`, else `<user cache>/frozen` (the
  directory keeps the name replays had before they were called replays);

where `<user cache>` is `$XDG_CACHE_HOME/ternet`, else `~/.cache/ternet`.

Why never next to the sources (numba's own default): pip uninstalls only the files it installed.
A cache written into `site-packages/ternet/kernels/__pycache__` survives `pip uninstall`, and
the leftover `site-packages/ternet/` directory (no `__init__.py`) then shadows a later editable
install as a namespace package. Importing this module imports nothing heavy.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import config


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ternet`, else `~/.cache/ternet` (a relative XDG path is ignored, as
    the XDG spec asks)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ternet"


def numba_cache_dir() -> Path:
    """Where numba keeps ternet's compiled kernels."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    return Path(env) if env else user_cache_dir() / "numba"


def replays_dir() -> Path:
    """Where replays are stored."""
    env = config.get("TERNET_CACHE_DIR")
    return Path(env) / "frozen" if env else user_cache_dir() / "frozen"
