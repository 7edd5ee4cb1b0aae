"""Thread settings fail at load with a message naming them; fork after multi-threaded predicts is
safe (numba's GNU OpenMP layer kills a child that runs a parallel region, see kernels/_jit.py)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ternet
from ternet.errors import SettingError
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CAT = str(ROOT / "demo" / "images" / "chelsea_cat.jpg")
# 65 x 65 input: the depthwise layers are big enough for numba's parallel kernels (PAR_MIN_MACS)
PARALLEL_SIZE = 65


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("th") / "tiny.safetensors")


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_bad_threads_argument_fails_at_load(tiny, threads):
    with pytest.raises(SettingError, match=f"^threads={threads!r}: expected a positive integer"):
        ternet.load(tiny, threads=threads)


@pytest.mark.parametrize("value", ["0", "abc", "-1", "2.0"])
def test_bad_thread_variable_fails_at_load(tiny, monkeypatch, value):
    monkeypatch.setenv("TERNET_NUM_THREADS", value)
    with pytest.raises(SettingError, match=f"^TERNET_NUM_THREADS='{value}': expected a positive"):
        ternet.load(tiny)


def test_thread_variable_and_argument_are_used(tiny, monkeypatch):
    monkeypatch.setenv("TERNET_NUM_THREADS", "3")
    assert ternet.load(tiny)._threads() == 3
    assert ternet.load(tiny, threads=np.int64(2))._threads() == 2


def test_cli_bad_thread_variable_is_a_usage_error(tiny):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERNET_NUM_THREADS": "0"}
    r = subprocess.run([sys.executable, "-m", "ternet", "classify", CAT, "--model", str(tiny)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr == "ternet: error: TERNET_NUM_THREADS='0': expected a positive integer\n"
    assert r.stdout == ""


FORK_CHILD = """
import os, sys
import numpy as np
import ternet
from ternet.kernels import _jit

path, size = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
m = ternet.load(path, threads=2)
one = m.predict(x[:1])      # one image: numba's parallel kernels split each layer
many = m.predict(x)         # several: per-thread replays on the model's thread pool
pid = os.fork()
if pid == 0:                # same results from the same model, from a new one; serial kernels
    same = (np.array_equal(m.predict(x[:1]), one) and np.array_equal(m.predict(x), many)
            and np.array_equal(ternet.load(path, threads=2).predict(x[:1]), one))
    os._exit(0 if same and _jit.num_threads() == 1 else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_after_two_thread_predict(tmp_path):
    """The child used to die with SIGTERM ("fork() called from a process already using GNU
    OpenMP"), and predicting several images in it hung (the thread pool's threads do not
    survive a fork)."""
    path = make_tiny_model(tmp_path / "m.safetensors", size=PARALLEL_SIZE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERNET_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", FORK_CHILD, str(path), str(PARALLEL_SIZE)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"], r.stderr
