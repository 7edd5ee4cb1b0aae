"""ternet.numba_internals, the one module that touches numba's internals: importing ternet
patches nothing, object code is kept only while a replay is recorded, and where numba's
internals are not what it expects, replays are off and the numba path gives the same logits."""
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import ternet
from ternet import numba_internals, replay
from replay_fixtures import cache, stored, tiny  # noqa: F401 (fixtures)

pytest.importorskip("llvmlite")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_check():
    numba_internals.reset()
    yield
    numba_internals.reset()


# Prelude of the recording tests' subprocesses: `seen` gets, per kernel whose object code the
# recording asks for, whether numba still held it (compiled or kept by ternet).
_SPY = ("from ternet import numba_internals as ni\n"
        "seen, orig = [], ni.object_code\n"
        "def spy(cres):\n"
        "    lib = cres.library\n"
        "    seen.append(bool(getattr(lib, '_compiled_object', None)\n"
        "                     or getattr(lib, '_ternet_object', None)))\n"
        "    return orig(cres)\n"
        "ni.object_code = spy\n")


def _keeps(hook) -> bool:
    return getattr(hook, "ternet_keeps_object_code", False)


def _run(code: str, *args, **env) -> str:
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_this_numba_passes_the_self_check():
    assert numba_internals._replay_problem() is None
    assert numba_internals._record_problem() is None
    assert numba_internals.self_check(record=True) and numba_internals.replays_off() is None


def test_the_replay_check_does_not_import_numba():
    out = _run("import sys; from ternet import numba_internals as ni\n"
               "print(ni.self_check(), 'numba' in sys.modules)")
    assert out.split() == ["True", "False"]


def test_a_process_that_never_records_patches_nothing(tiny):
    """Importing ternet and its kernels and running the numba path leave numba's classes and its
    JIT engine's object cache hooks as numba made them."""
    path, _, _ = tiny
    code = (
        "import gc, sys, numpy as np, numba\n"
        "from numba.core.codegen import CPUCodeLibrary\n"
        "from numba.core.dispatcher import Dispatcher\n"
        "hook = CPUCodeLibrary.__dict__['_object_getbuffer_hook']\n"
        "import ternet, ternet.kernels.pointwise, ternet.kernels.depthwise, ternet.kernels.conv\n"
        "import ternet.kernels.elementwise\n"
        "from ternet import numba_internals as ni\n"
        "assert CPUCodeLibrary.__dict__['_object_getbuffer_hook'] is hook\n"
        "m = ternet.load(sys.argv[1])\n"
        "m.predict(np.zeros((1,) + m.input_shape, np.uint8))\n"
        "assert CPUCodeLibrary.__dict__['_object_getbuffer_hook'] is hook\n"
        "assert '__call__' not in Dispatcher.__dict__\n"
        "now = ni.getbuffer_hook()\n"
        "assert now.__func__ is hook.__func__ and not getattr(now, 'ternet_keeps_object_code', 0)\n"
        "libs = [o for o in gc.get_objects() if isinstance(o, CPUCodeLibrary)]\n"
        "assert libs and not any(hasattr(o, '_ternet_object') for o in libs)\n"
        "print('ok')\n")
    assert _run(code, path, TERNET_REPLAY="0").strip() == "ok"


def test_object_code_is_kept_only_inside_the_context():
    assert not _keeps(numba_internals.getbuffer_hook())
    with numba_internals.keeping_object_code():
        assert _keeps(numba_internals.getbuffer_hook())
        with numba_internals.keeping_object_code():          # nested (another model recording)
            assert _keeps(numba_internals.getbuffer_hook())
        assert _keeps(numba_internals.getbuffer_hook())
    assert not _keeps(numba_internals.getbuffer_hook())
    with pytest.raises(ZeroDivisionError):
        with numba_internals.keeping_object_code():
            1 / 0
    assert not _keeps(numba_internals.getbuffer_hook())


def test_recording_uses_the_object_code_kept_while_the_kernels_loaded(tiny, tmp_path):
    """In a fresh process whose kernels come from numba's on-disk cache, the recording finds
    every kernel's object code kept (none compiled a second time), and the hook is numba's own
    again afterwards."""
    path, _, _ = tiny
    warm = ("import sys, numpy as np, ternet\n"
            "m = ternet.load(sys.argv[1])\n"
            "m.predict(np.zeros((1,) + m.input_shape, np.uint8))\n")
    _run(warm, path, TERNET_REPLAY="0")                          # numba's cache is warm now
    code = (
        "import sys, numpy as np, ternet\n"
        + _SPY +
        "m = ternet.load(sys.argv[1])\n"
        "m.predict(np.zeros((1,) + m.input_shape, np.uint8))\n"
        "assert m.replay_ready(1) and seen and all(seen), seen\n"
        "assert not getattr(ni.getbuffer_hook(), 'ternet_keeps_object_code', 0)\n"
        "print(len(seen))\n")
    assert int(_run(code, path, TERNET_CACHE_DIR=str(tmp_path / "tc"))) > 0


def test_recording_after_the_kernels_loaded_outside_the_context(tiny, tmp_path):
    """Kernels loaded from numba's cache before any recording (numba dropped their object code):
    the recording emits it again from numba's IR, and the replay reproduces the reference in a
    fresh process."""
    path, x, ref = tiny
    np.save(tmp_path / "x.npy", x[:1])
    code = (
        "import os, sys, numpy as np, ternet\n"
        + _SPY +
        "x = np.load(sys.argv[2])\n"
        "m = ternet.load(sys.argv[1])\n"
        "os.environ['TERNET_REPLAY'] = '0'\n"
        "a = m.predict(x)\n"
        "os.environ['TERNET_REPLAY'] = '1'\n"
        "b = m.predict(x)\n"
        "assert m.replay_ready(1) and seen and not any(seen), seen\n"
        "assert np.array_equal(a, b)\n"
        "print('ok')\n")
    replays = str(tmp_path / "tc")
    _run("import sys, numpy as np, ternet\n"
         "m = ternet.load(sys.argv[1]); m.predict(np.zeros((1,) + m.input_shape, np.uint8))\n",
         path, TERNET_REPLAY="0")                                  # numba's cache is warm now
    assert _run(code, path, tmp_path / "x.npy", TERNET_CACHE_DIR=replays).strip() == "ok"
    again = ("import sys, numpy as np, ternet\n"
             "m = ternet.load(sys.argv[1]); assert m.replay_ready(1)\n"
             "np.save(sys.argv[3], m.predict(np.load(sys.argv[2])))\n"
             "assert 'numba' not in sys.modules\n")
    _run(again, path, tmp_path / "x.npy", tmp_path / "y.npy", TERNET_CACHE_DIR=replays)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), ref[:1])


def test_changed_record_internals_turn_replays_off(tiny, cache, monkeypatch, capsys):
    """An internal that recording needs is gone: nothing is recorded, the numba path gives the
    reference logits, replays stay off for the process; without TERNET_DEBUG, nothing is said."""
    from numba.core.codegen import CPUCodeLibrary
    from numba.core.registry import cpu_target
    path, x, ref = tiny
    cpu_target.target_context            # numba's JIT engine exists, holding its hooks already
    monkeypatch.delattr(CPUCodeLibrary, "_object_getbuffer_hook")
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x[:1]), ref[:1])
    np.testing.assert_array_equal(m.predict(x), ref)
    assert stored(cache) == [] and not m.replay_ready(1)
    assert "_object_getbuffer_hook" in numba_internals.replays_off()
    assert not replay.enabled("auto")
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])
    assert stored(cache) == []
    assert capsys.readouterr().err == ""


def test_changed_replay_internals_leave_stored_replays_unused(tiny, cache, monkeypatch, capsys):
    """numba's C helper extension is not where the replay path looks (as after a rename): a
    stored replay is neither loaded nor rewritten, the numba path gives the reference logits,
    and with TERNET_DEBUG=1 one note says why, once."""
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])                              # recorded
    (meta,) = stored(cache)
    os.utime(meta, ns=(0, 0))                                     # loading would renew this
    monkeypatch.setattr(numba_internals, "_HELPERLIB", "_helperlib_renamed*.so")
    numba_internals.reset()                                       # a fresh process, as it were
    monkeypatch.setenv("TERNET_DEBUG", "1")
    for _ in range(2):
        m = ternet.load(path)
        assert not m.replay_ready(1)
        np.testing.assert_array_equal(m.predict(x[:1]), ref[:1])
        np.testing.assert_array_equal(m.predict(x), ref)
    assert stored(cache) == [meta] and meta.stat().st_mtime_ns == 0
    err = capsys.readouterr().err
    assert err.count("ternet: numba's internals are not what ternet expects") == 1, err
    assert "_helperlib_renamed" in err and len(err.splitlines()) == 1


def test_unusable_c_helpers_turn_replays_off(tiny, cache, monkeypatch):
    path, x, ref = tiny
    ternet.load(path).predict(x[:1])                              # recorded
    (meta,) = stored(cache)
    monkeypatch.setitem(sys.modules, "numba._helperlib", types.SimpleNamespace())
    monkeypatch.setattr(replay, "_HELPERS_DONE", False)
    with pytest.raises(replay.ReplayError, match="C helpers"):
        replay.load(meta.stem)
    assert numba_internals.replays_off() and not replay.enabled("auto")
    np.testing.assert_array_equal(ternet.load(path).predict(x[:1]), ref[:1])


def test_replay_key_covers_the_sources_that_shape_the_machine_code():
    names = {s.split(":")[0] for s in replay._stamps()}
    for name in ("ops/pointwise.py", "lowering.py", "executors.py", "numba_internals.py",
                 "replay.py", "record.py", "quant.py", "kernels/vnni.py"):
        assert name in names, name
