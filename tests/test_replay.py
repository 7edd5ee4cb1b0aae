"""Replays (ternet.replay / ternet.record): the replay equals the numba path bit for bit, is used
by a fresh process without importing numba, and anything wrong with it falls back to numba."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ternet
from ternet import replay
from ternet.errors import SettingError
from ternet.format import read_model
from ternet.reference import run_reference
from replay_fixtures import cache, stored, tiny  # noqa: F401 (fixtures)
from tiny_model import make_tiny_model

pytest.importorskip("llvmlite")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kernels", ["auto", "addonly", "plain"])
def test_replay_equals_numba_and_reference(tiny, cache, kernels):
    path, x, ref = tiny
    m = ternet.load(path, kernels=kernels)
    first = m.predict(x[:1])                      # numba, then recorded (and verified)
    assert len(stored(cache)) == 1 and m.replay_ready(1) and not m.replay_ready(2)
    again = m.predict(x[:1])                      # replayed
    np.testing.assert_array_equal(first, ref[:1])
    np.testing.assert_array_equal(again, ref[:1])
    m2 = ternet.load(path, kernels=kernels)       # another model object: loads the stored replay
    assert m2._program is None                    # ... without lowering the graph
    for i in range(len(x)):
        np.testing.assert_array_equal(m2.predict(x[i:i + 1]), ref[i:i + 1])
    np.testing.assert_array_equal(m2.predict(x), ref)         # batch of 3: its own replay
    assert len(stored(cache)) == 2


def _wide_model(path):
    """Layers wide enough for the AVX-512 / AMX kernels: 80 -> 96 -> 80 channel pointwise layers
    (AMX from 32 input channels, 100 pixels: 6 tiles of 16 and a VNNI tail of 4), a 96-channel
    depthwise, a residual add."""
    from tiny_model import builder, specs
    from ternet.format import write_model
    b = builder(20)
    x = b.conv("stem", "input", 80, 3, 2, "same", "relu6")
    y = b.pw("expand", x, 96, "ternary", "relu6")
    y = b.dw("dw", y, 5, 1, "same", "relu6")
    y = b.pw("project", y, 80, "ternary", "none")
    x = b.add("add", x, y)
    b.linear("fc", b.gap("pool", x), 5)
    inp, pre = specs(b, 20)
    write_model(path, arch="t", graph=b.graph, tensors=b.tensors, input_spec=inp, preprocess=pre,
                labels=list("abcde"), provenance={"producer": "test"})
    return path


def test_amx_and_avx512_kernels_replay(cache, tmp_path):
    """A replay of a model whose layers run the AMX pointwise and AVX-512 depthwise kernels
    (where the CPU has them) is exact, also in a fresh process (which must first ask Linux for
    the AMX tile state: replay.Replay does), and records which kernels need it."""
    from ternet.kernels import cpu
    path = _wide_model(tmp_path / "wide.safetensors")
    x = np.random.default_rng(9).integers(0, 256, (1, 20, 20, 3), dtype=np.uint8)
    ref = run_reference(read_model(path), x)
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x), ref)
    np.testing.assert_array_equal(m.predict(x), ref)              # replayed
    (meta,) = stored(cache)
    amx = [k["name"] for k in json.loads(meta.read_text())["kernels"] if k.get("amx")]
    assert bool(amx) == cpu.has_amx()
    code = ("import numpy as np, sys, ternet\n"
            f"m = ternet.load({str(path)!r})\n"
            "x = np.random.default_rng(9).integers(0, 256, (1, 20, 20, 3), dtype=np.uint8)\n"
            "np.save(sys.argv[1], m.predict(x))\n"
            "assert 'numba' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.npy")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)


def test_amx_refused_falls_back(cache, tmp_path, monkeypatch):
    """Where Linux refuses the AMX tile state: no AMX class, AMX plans refuse to build, a stored
    replay with AMX kernels is not run, and the model still computes the reference on VNNI."""
    from ternet.kernels import cpu, vnni
    path = _wide_model(tmp_path / "wide.safetensors")
    x = np.random.default_rng(9).integers(0, 256, (1, 20, 20, 3), dtype=np.uint8)
    ref = run_reference(read_model(path), x)
    had_amx = cpu.has_amx()
    np.testing.assert_array_equal(ternet.load(path).predict(x), ref)       # recorded
    monkeypatch.setattr(cpu, "amx_permission", lambda: False)
    assert not cpu.has_amx() and cpu.cpu_class() != "amx"
    with pytest.raises(RuntimeError, match="AMX"):
        vnni.make_pw_vnni(np.ones((4, 64), np.int8), np.zeros(4, np.int32), 0,
                          np.ones(4, np.float32), 0, 0, 255, isa="amx")
    if had_amx:
        (meta,) = stored(cache)
        with pytest.raises(replay.ReplayError, match="AMX"):
            replay.load(meta.stem)
    np.testing.assert_array_equal(ternet.load(path).predict(x), ref)


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


def test_corrupt_replay_is_ignored_and_rerecorded(tiny, cache):
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])
    (meta,) = stored(cache)
    blob = meta.with_suffix(".bin")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x[:1]), ref[:1])      # numba, and recorded again
    assert m.replay_ready(1)
    json.loads(meta.read_text())
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])


def test_model_change_invalidates(tiny, cache, tmp_path):
    path, x, _ = tiny
    p2 = make_tiny_model(tmp_path / "other.safetensors", seed=11)
    ternet.load(path).predict(x[:1])
    ref2 = run_reference(read_model(p2), x[:1])
    np.testing.assert_array_equal(ternet.load(p2).predict(x[:1]), ref2)
    assert len(stored(cache)) == 2
    d1, d2 = replay.model_digest(path), replay.model_digest(p2)
    assert replay.replay_key(d1, "auto", 1) != replay.replay_key(d2, "auto", 1)
    assert replay.replay_key(d1, "auto", 1) != replay.replay_key(d1, "addonly", 1)


@pytest.mark.parametrize("name", ["TERNET_REPLAY", "TERNET_FROZEN"])
def test_disabled_and_threads(tiny, cache, monkeypatch, name):
    """2 threads on one image, TERNET_REPLAY=0 or its former name TERNET_FROZEN=0: numba only."""
    path, x, ref = tiny
    np.testing.assert_array_equal(ternet.load(path, threads=2).predict(x[:1]), ref[:1])
    assert stored(cache) == []                    # 2 threads: numba's parallel kernels
    monkeypatch.setenv(name, "0")
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])
    assert stored(cache) == []
    monkeypatch.setenv("TERNET_REPLAY", "1")       # the new name wins over the old one
    monkeypatch.setenv("TERNET_FROZEN", "0")
    assert replay.enabled("auto")


def test_images_parallel_over_threads(tiny, cache):
    """threads=2 with several images: one replay instance per thread, same results."""
    path, x, ref = tiny
    m = ternet.load(path, threads=2)
    np.testing.assert_array_equal(m.predict(x), ref)          # records the 2- and 1-image replays
    assert len(stored(cache)) == 2
    np.testing.assert_array_equal(m.predict(x), ref)          # both workers replay
    assert set(m._replays.workers) == {(2, 0), (1, 1)}
    np.testing.assert_array_equal(ternet.load(path, threads=3).predict(x), ref)


def test_partial_batch_reuses_a_bigger_loaded_replay(tiny, cache):
    """A smaller batch after a bigger one (at most twice its size) is zero-padded into the loaded
    replay once: same logits, no new replay; when that size recurs it gets its own replay."""
    path, x, ref = tiny
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x), ref)              # records the 3-image replay
    np.testing.assert_array_equal(m.predict(x), ref)
    np.testing.assert_array_equal(m.predict(x[1:]), ref[1:])      # 2 images: padded to 3
    assert len(stored(cache)) == 1
    np.testing.assert_array_equal(m.predict(x[1:]), ref[1:])      # again: its own replay now
    assert len(stored(cache)) == 2
    np.testing.assert_array_equal(m.predict(x[2:]), ref[2:])      # 1 image: 2 <= 2 x 1, padded
    assert len(stored(cache)) == 2


def test_replaced_file_with_same_size_and_mtime_gets_its_own_replay(tiny, cache, tmp_path):
    """Regression: replays were keyed by path, size and mtime, so a model file overwritten in place
    by another of the same size, its mtime restored (cp -p, rsync -t), replayed the old weights."""
    path, x, ref_old = tiny
    new = make_tiny_model(tmp_path / "new.safetensors", seed=11)
    target = tmp_path / "model.safetensors"
    target.write_bytes(path.read_bytes())
    before = target.stat()
    np.testing.assert_array_equal(ternet.load(target).predict(x[:1]), ref_old[:1])   # recorded
    with open(target, "r+b") as f:                         # in place: same inode
        f.write(new.read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)
    ref_new = run_reference(read_model(new), x[:1])
    assert not np.array_equal(ref_new, ref_old[:1])
    np.testing.assert_array_equal(ternet.load(target).predict(x[:1]), ref_new)
    assert len(stored(cache)) == 2
    np.testing.assert_array_equal(ternet.load(target).predict(x[:1]), ref_new)   # replayed


def test_model_digest_is_the_content_not_the_path(tiny, tmp_path):
    path, _, _ = tiny
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    assert replay.model_digest(copy) == replay.model_digest(read_model(path))
    assert replay.model_digest(make_tiny_model(tmp_path / "o.safetensors", seed=11)) != \
        replay.model_digest(path)


def _fake_replay(root: Path, key: str, size: int, used_ns: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{key}.bin").write_bytes(b"\0" * (size - 2))
    (root / f"{key}.json").write_bytes(b"{}")
    os.utime(root / f"{key}.json", ns=(used_ns, used_ns))


def test_evict_deletes_least_recently_used_first(cache):
    """Five 100-byte replays, used in the order a..e; a limit of 300 bytes keeps the three most
    recently used, and always the replay just written, however old its timestamp."""
    t0 = 1_700_000_000 * 10**9
    for i, key in enumerate("abcde"):
        _fake_replay(cache, key, 100, t0 + i * 10**9)
    replay.evict(300, keep="a")
    assert [p.stem for p in stored(cache)] == ["a", "d", "e"]
    assert sorted(p.stem for p in cache.glob("*.bin")) == ["a", "d", "e"]


def test_loading_a_replay_marks_it_used_and_the_cap_is_kept(tiny, cache, monkeypatch):
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])
    (meta,) = stored(cache)
    os.utime(meta, ns=(0, 0))
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])     # replayed
    assert meta.stat().st_mtime_ns > 0
    monkeypatch.setenv("TERNET_REPLAY_CACHE_MB", "1")
    m = ternet.load(path)
    recorded, xx, refs = [], np.concatenate([x, x]), np.concatenate([ref, ref])
    for n in (1, 3, 6):                    # 0.3-0.8 MB each: they do not all fit
        np.testing.assert_array_equal(m.predict(xx[:n]), refs[:n])
        recorded.append(replay.paths(m._replay_key(n))[0])
        sizes = [p.stat().st_size + p.with_suffix(".bin").stat().st_size for p in stored(cache)]
        assert sum(sizes) <= 1 << 20 and recorded[-1].exists()
    assert not recorded[0].exists()        # the least recently used went first


@pytest.mark.parametrize("name", ["TERNET_REPLAY_CACHE_MB", "TERNET_PLAN_CACHE_MB"])
def test_replay_cache_setting(tiny, cache, monkeypatch, name):
    """TERNET_REPLAY_CACHE_MB, or its former name TERNET_PLAN_CACHE_MB (errors name the one set)."""
    path, x, ref = tiny
    monkeypatch.setenv(name, "0")                                 # stores nothing, still correct
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])
    assert stored(cache) == []
    for bad in ("abc", "-1", "1.5"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SettingError, match=f"{name}='{re.escape(bad)}'"):
            ternet.load(path)


def test_new_cache_setting_wins_over_the_old_name(monkeypatch):
    monkeypatch.setenv("TERNET_PLAN_CACHE_MB", "abc")
    monkeypatch.setenv("TERNET_REPLAY_CACHE_MB", "3")
    assert replay.cache_limit() == 3 << 20
    monkeypatch.delenv("TERNET_REPLAY_CACHE_MB")
    with pytest.raises(SettingError, match="TERNET_PLAN_CACHE_MB='abc'"):
        replay.cache_limit()
