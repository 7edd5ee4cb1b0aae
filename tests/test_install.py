"""The README's two install commands, in order, leave a working `ternet` (issue 16).

`pip install .` then a first `ternet classify` used to write numba's cache into
site-packages/ternet/kernels/__pycache__; `pip install -e .` then left that directory behind and
it shadowed the editable install as a namespace package (`ternet --version` said "ternet
unknown"). This test installs a copy of the checkout into a temporary virtualenv (packages from
this environment, nothing downloaded), non-editable, classifies, reinstalls it editable and
classifies again from another directory, with the default cache locations under a temporary
home. It compiles the kernels twice (once per install location), so it is marked slow.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import ternet

ROOT = Path(__file__).resolve().parents[1]
CAT = str(ROOT / "demo" / "images" / "chelsea_cat.jpg")
CAT_CLASSES = range(281, 286)          # ImageNet's domestic cats (tabby .. Egyptian cat)
PACKAGED = ("pyproject.toml", "README.md", "ternet", "weights")   # what the build reads
PIP = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q")


def _clean_env(tmp: Path) -> dict:
    """No ternet or numba settings (the default cache locations are under test), a temporary
    home and XDG cache, and pip without an index."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TERNET_", "NUMBA_", "PIP_")) and k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "xdg"), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    return env


def _make_venv(tmp: Path, env: dict) -> tuple[Path, Path]:
    """A virtualenv that sees this environment's packages (numpy, numba, pip, setuptools...):
    --system-site-packages reaches the base interpreter's only, so a .pth adds ours."""
    venv = tmp / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                        str(venv)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        pytest.skip(f"cannot create a virtualenv: {r.stderr.strip()[-200:]}")
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, env=env, check=True).stdout.strip())
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "_ternet_test_outer.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, env=env).returncode:
        pytest.skip("pip is not available to the virtualenv")
    return venv, purelib


def _run(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


def _classify_is_a_cat(venv: Path, env: dict, cwd) -> None:
    r = _run([venv / "bin" / "ternet", "classify", CAT, "--json", "--top-k", "1"], env, cwd)
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["path"] == CAT and rec["predictions"][0]["index"] in CAT_CLASSES, rec


def _where_ternet_is(venv: Path, env: dict, cwd) -> Path:
    r = _run([venv / "bin" / "python", "-c", "import ternet; print(ternet.__file__)"], env, cwd)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip()).parent


def _files(d: Path) -> set:
    return {p.relative_to(d) for p in d.rglob("*")}


@pytest.mark.slow
def test_install_then_editable_install_keeps_ternet_working(tmp_path):
    env = _clean_env(tmp_path)
    venv, purelib = _make_venv(tmp_path, env)
    src = tmp_path / "src"                   # a copy: building writes build/ and *.egg-info
    src.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    work = tmp_path / "work"
    work.mkdir()

    r = _run([venv / "bin" / "python", *PIP, src], env, work)           # pip install .
    assert r.returncode == 0, r.stderr
    installed = purelib / "ternet"
    assert _where_ternet_is(venv, env, work) == installed
    before = _files(installed)
    _classify_is_a_cat(venv, env, work)                                 # compiles
    assert _files(installed) == before, "the first run wrote into the installed package"
    caches = tmp_path / "xdg" / "ternet"
    assert any((caches / "numba").rglob("*.nbi")) and any((caches / "frozen").glob("*.json"))

    r = _run([venv / "bin" / "python", *PIP, "-e", src], env, work)     # pip install -e .
    assert r.returncode == 0, r.stderr
    assert not installed.exists(), sorted(map(str, _files(installed)))[:10]
    assert _where_ternet_is(venv, env, "/") == src / "ternet"
    r = _run([venv / "bin" / "ternet", "--version"], env, "/")
    assert r.stdout == f"ternet {ternet.__version__}\n", r.stderr
    _classify_is_a_cat(venv, env, "/")
