"""Kernels made by factories (ternet/kernels/variants.py): names, the closure rule, and numba's
on-disk cache, which must hold them like hand-written kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ternet.kernels import cpu, depthwise, pointwise, variants, vnni

ROOT = Path(__file__).resolve().parents[1]

_CACHE_SCRIPT = """
import json, sys, numpy as np
from ternet.kernels import vnni
from ternet.kernels.layout import ROW_SLACK
rng = np.random.default_rng(0)
w = rng.integers(-1, 2, (40, 72)).astype(np.int8)
plan = vnni.make_pw_vnni(w, rng.integers(-99, 99, 40).astype(np.int32), 3,
                         np.full(40, 0.01, np.float32), 7, 0, 255, isa=sys.argv[1], by_size=False)
x = rng.integers(0, 256, (12 + ROW_SLACK, plan.cin_p)).astype(np.uint8)
out = np.zeros((12 + ROW_SLACK, plan.cout_p), np.uint8)
plan(x, 12, out)
d = vnni.drivers(plan.isa).serial
print(json.dumps({"name": d.py_func.__qualname__, "hits": sum(d.stats.cache_hits.values()),
                  "misses": sum(d.stats.cache_misses.values()), "out": out[:12].tolist()}))
"""


def _run(isa, cache_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TERNET_NUMBA_CACHE", "TERNET_REPLAY", "TERNET_FROZEN")}
    env.update(PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache_dir))
    r = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, isa], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_factory_made_driver_is_loaded_from_the_disk_cache(tmp_path):
    """First process: the driver compiles and its index file appears under its own name; a second
    process with the same cache directory loads it (a hit, no compile) and computes the same."""
    isa = "avx2" if cpu.can_run("avx2") else "emu512"
    first = _run(isa, tmp_path)
    assert first["name"] == vnni.ISAS[isa].driver
    assert first["misses"] >= 1 and first["hits"] == 0
    index = [p.name for p in tmp_path.rglob("*.nbi")]
    assert any(n.startswith(f"vnni.{first['name']}-") for n in index), index
    second = _run(isa, tmp_path)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert second["out"] == first["out"]


def test_every_variant_has_a_name_of_its_own():
    """numba names cache files by module + qualname: variants of one factory must differ."""
    kernels = [d for ds in vnni.DRIVERS.values() for d in ds]
    kernels += [d for ds in depthwise.DRIVERS.values() for d in ds if d is not None]
    kernels += [d for ds in pointwise.DRIVERS.values() for d in ds]
    by_name = {}
    for k in kernels:
        by_name.setdefault((k.py_func.__module__, k.py_func.__qualname__), set()).add(id(k))
    assert all(len(ids) == 1 for ids in by_name.values())
    assert vnni.pw_i8_u8_vnni.py_func.__qualname__ == "pw_i8_u8_vnni"
    assert vnni.pw_t2_u8_avx2_par.targetoptions["parallel"]
    assert not vnni.pw_t2_u8_avx2.targetoptions.get("parallel")


def test_variant_refuses_what_would_break_the_cache():
    obj = object()

    def uses_an_object():
        return obj

    with pytest.raises(TypeError, match="plain constants"):
        variants.variant(uses_an_object, "test_kernel_variants_obj", __name__)

    def plain():
        return 1

    variants.variant(plain, "test_kernel_variants_once", __name__)
    with pytest.raises(ValueError, match="collide"):
        variants.variant(plain, "test_kernel_variants_once", __name__)


def test_kernel_isa_is_explicit_for_int8_on_avx2():
    import numpy as np
    ternary, int8 = np.array([[1, -1, 0]], np.int8), np.array([[3, -1, 0]], np.int8)
    assert vnni.kernel_isa("avx2", ternary) == "avx2"
    assert vnni.kernel_isa("avx2", int8) == "avx2i8"
    assert vnni.kernel_isa("avx2i8", ternary) == "avx2i8"
    assert vnni.kernel_isa("vnni", int8) == "avx512vnni"
    assert vnni.kernel_isa("emu512", int8) == "emu512"
