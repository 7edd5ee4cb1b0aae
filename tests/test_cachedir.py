"""Caches live in the user cache directory (ternet/cachedir.py), never inside the package."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ternet import cachedir
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "ternet" / "kernels"


def test_locations_follow_the_environment(monkeypatch, tmp_path):
    for var in ("NUMBA_CACHE_DIR", "TERNET_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cachedir.numba_cache_dir() == tmp_path / "home" / ".cache" / "ternet" / "numba"
    assert cachedir.replays_dir() == tmp_path / "home" / ".cache" / "ternet" / "frozen"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")       # the XDG spec: absolute only
    assert cachedir.user_cache_dir() == tmp_path / "home" / ".cache" / "ternet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cachedir.numba_cache_dir() == tmp_path / "xdg" / "ternet" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "nb"))
    monkeypatch.setenv("TERNET_CACHE_DIR", str(tmp_path / "tc"))
    assert cachedir.numba_cache_dir() == tmp_path / "nb"
    assert cachedir.replays_dir() == tmp_path / "tc" / "frozen"


def _run(code: str, env_update: dict, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TERNET_REPLAY",
                                                                "TERNET_FROZEN")}
    env.update(PYTHONPATH=str(ROOT), **env_update)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def _numba_files(d: Path) -> set:
    return {p for p in d.rglob("*") if p.suffix in (".nbi", ".nbc")} if d.exists() else set()


def test_kernel_cache_goes_to_the_user_dir_even_if_numba_came_first(tmp_path):
    """numba reads NUMBA_CACHE_DIR once, at its import; ternet's kernels have their own cache
    locator, so importing numba before ternet changes nothing."""
    model = make_tiny_model(tmp_path / "m.safetensors")
    before = _numba_files(KERNELS)
    code = ("import sys, numba, numpy as np, ternet\n"
            "m = ternet.load(sys.argv[1])\n"
            "m.predict(np.zeros((1,) + m.input_shape, np.uint8))\n")
    r = _run(code, {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "TERNET_REPLAY": "0"}, model)
    assert r.returncode == 0, r.stderr
    assert _numba_files(tmp_path / "xdg" / "ternet" / "numba")
    assert _numba_files(KERNELS) == before


def test_unusable_cache_dir_still_loads(tmp_path):
    """A cache directory that cannot be created: loading (which imports every kernel module)
    used to fail with numba's "no locator available"; now kernels go uncached (compiled in the
    process, as with TERNET_NUMBA_CACHE=0)."""
    model = make_tiny_model(tmp_path / "m.safetensors")
    code = ("import sys, ternet\n"
            "from ternet.kernels import conv\n"
            "m = ternet.load(sys.argv[1])\n"
            "assert m.layers and type(conv._copy16._cache).__name__ == 'NullCache'\n")
    r = _run(code, {"XDG_CACHE_HOME": "/dev/null/cache", "TERNET_CACHE_DIR": "/dev/null/cache"},
             model)
    assert r.returncode == 0, r.stderr


def test_editing_any_kernel_source_moves_every_kernel_cache(tmp_path):
    """numba reuses a kernel's cached code while the kernel's own file is unchanged, even if code
    it compiles in from another file changed (vnni.py's intrinsics in depthwise kernels): that
    replayed stale machine code. The cache directory is keyed by all kernel sources instead."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "ternet", copy / "ternet",
                    ignore=shutil.ignore_patterns("__pycache__", "weights", "train"))
    code = "from ternet.kernels import conv; print(conv._copy16._cache.cache_path)"

    def cache_path() -> str:
        env = {**os.environ, "PYTHONPATH": str(copy), "NUMBA_CACHE_DIR": str(tmp_path / "nb")}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    first = cache_path()
    assert first.startswith(str(tmp_path / "nb")) and first == cache_path()
    with open(copy / "ternet" / "kernels" / "vnni.py", "a") as f:      # not conv.py
        f.write("# edited\n")
    assert cache_path() != first
