"""Frozen plans (ternet.frozen / ternet.freeze): the replay equals the numba path bit for bit, is
used by a fresh process without importing numba, and anything wrong with it falls back to numba."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ternet
from ternet import frozen
from ternet.format import read_model
from ternet.reference import run_reference
from tiny_model import make_tiny_model

pytest.importorskip("llvmlite")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TERNET_FROZEN", raising=False)
    return tmp_path / "cache" / "frozen"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("fz") / "tiny.safetensors")
    x = np.random.default_rng(5).integers(0, 256, (3, 33, 33, 3), dtype=np.uint8)
    return path, x, run_reference(read_model(path), x)


def _plans(cache):
    return sorted(cache.glob("*.json")) if cache.exists() else []


@pytest.mark.parametrize("kernels", ["auto", "addonly", "plain"])
def test_replay_equals_numba_and_reference(tiny, cache, kernels):
    path, x, ref = tiny
    m = ternet.load(path, kernels=kernels)
    first = m.predict(x[:1])                      # numba, then recorded (and verified)
    assert len(_plans(cache)) == 1 and m.frozen_ready(1) and not m.frozen_ready(2)
    again = m.predict(x[:1])                      # replayed
    np.testing.assert_array_equal(first, ref[:1])
    np.testing.assert_array_equal(again, ref[:1])
    m2 = ternet.load(path, kernels=kernels)       # another model object: loads the stored plan
    assert m2._built is None                      # ... without building layers
    for i in range(len(x)):
        np.testing.assert_array_equal(m2.predict(x[i:i + 1]), ref[i:i + 1])
    np.testing.assert_array_equal(m2.predict(x), ref)         # batch of 3: its own plan
    assert len(_plans(cache)) == 2


def test_fresh_process_does_not_import_numba(tiny, cache):
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])             # record
    np.save(cache.parent / "x.npy", x[:1])
    code = ("import sys, numpy as np, ternet; m = ternet.load(sys.argv[1]); "
            "y = m.predict(np.load(sys.argv[2])); np.save(sys.argv[3], y); "
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(cache.parent / "x.npy"),
                          str(cache.parent / "y.npy")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "False", out.stderr
    np.testing.assert_array_equal(np.load(cache.parent / "y.npy"), ref[:1])


def test_corrupt_plan_is_ignored_and_rerecorded(tiny, cache):
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])
    (meta,) = _plans(cache)
    blob = meta.with_suffix(".bin")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x[:1]), ref[:1])      # numba, and recorded again
    assert m.frozen_ready(1)
    json.loads(meta.read_text())
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])


def test_model_change_invalidates(tiny, cache, tmp_path):
    path, x, _ = tiny
    p2 = make_tiny_model(tmp_path / "other.safetensors", seed=11)
    ternet.load(path).predict(x[:1])
    ref2 = run_reference(read_model(p2), x[:1])
    np.testing.assert_array_equal(ternet.load(p2).predict(x[:1]), ref2)
    assert len(_plans(cache)) == 2
    assert frozen.plan_key(str(path), "auto", 1) != frozen.plan_key(str(p2), "auto", 1)
    assert frozen.plan_key(str(path), "auto", 1) != frozen.plan_key(str(path), "addonly", 1)


def test_disabled_and_threads(tiny, cache, monkeypatch):
    path, x, ref = tiny
    np.testing.assert_array_equal(ternet.load(path, threads=2).predict(x[:1]), ref[:1])
    assert _plans(cache) == []                    # 2 threads: numba's parallel kernels
    monkeypatch.setenv("TERNET_FROZEN", "0")
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])
    assert _plans(cache) == []


def test_images_parallel_over_threads(tiny, cache):
    """threads=2 with several images: one frozen plan instance per thread, same results."""
    path, x, ref = tiny
    m = ternet.load(path, threads=2)
    np.testing.assert_array_equal(m.predict(x), ref)          # records the 2- and 1-image plans
    assert len(_plans(cache)) == 2
    np.testing.assert_array_equal(m.predict(x), ref)          # both workers replay
    assert {k for k, v in m._workers.items() if v} == {(2, 0), (1, 1)}
    np.testing.assert_array_equal(ternet.load(path, threads=3).predict(x), ref)


def test_partial_batch_reuses_a_bigger_loaded_plan(tiny, cache):
    """A smaller batch after a bigger one (at most twice its size) is zero-padded into the loaded
    plan once: same logits, no new plan; when that size recurs it gets its own plan."""
    path, x, ref = tiny
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x), ref)              # records the 3-image plan
    np.testing.assert_array_equal(m.predict(x), ref)
    np.testing.assert_array_equal(m.predict(x[1:]), ref[1:])      # 2 images: padded to 3
    assert len(_plans(cache)) == 1
    np.testing.assert_array_equal(m.predict(x[1:]), ref[1:])      # again: its own plan now
    assert len(_plans(cache)) == 2
    np.testing.assert_array_equal(m.predict(x[2:]), ref[2:])      # 1 image: 2 <= 2 x 1, padded
    assert len(_plans(cache)) == 2
