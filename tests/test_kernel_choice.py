"""The kernel-selection table (ternet.kernels.cpu): which kernel each request picks on each CPU
class, the errors of requests that cannot work, and the request reaching Model from
`kernels=` or TERNET_KERNELS."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ternet
from ternet.errors import SettingError
from ternet.kernels import cpu
from ternet.lowering import BuildContext
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "demo" / "images" / "chelsea_cat.jpg"
WEIGHTS = ("ternary", "int8", "hybrid")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("choice") / "tiny.safetensors")


def _cpu(monkeypatch, amx=False, vnni=False, avx2=False):
    monkeypatch.setattr(cpu, "has_amx", lambda: amx)
    monkeypatch.setattr(cpu, "has_avx512vnni", lambda: vnni)
    monkeypatch.setattr(cpu, "has_avx2", lambda: avx2)


def _kernels(request):
    """(pointwise per weight kind, the stem's GEMM, the classifier) as lowering chooses them."""
    ctx = BuildContext(None, request, {}, [], 0)
    return [ctx.pointwise_kernel(w) for w in WEIGHTS], ctx.conv_kernel(), ctx.classifier_kernel()


def test_request_vocabulary():
    assert cpu.REQUESTS == ("auto", "amx", "vnni", "avx2", "addonly", "plain", "reference")
    assert cpu.REQUESTS[1:-1] == cpu.IMPLS
    assert set(cpu.REQUEST_ROW) == set(cpu.IMPLS)
    assert set(cpu.REQUEST_ROW.values()) <= set(cpu.KERNEL_TABLE)


@pytest.mark.parametrize("flags, cls, pointwise, classifier, depthwise", [
    ((True, True, True), "amx", ["amx"] * 3, "vnni", "vnni"),
    ((False, True, True), "avx512vnni", ["vnni"] * 3, "vnni", "vnni"),
    ((False, True, False), "avx512vnni", ["vnni"] * 3, "vnni", "vnni"),
    ((False, False, True), "avx2", ["avx2"] * 3, "avx2", "pairs"),
    ((False, False, False), "generic", ["addonly", "plain", "addonly"], "plain", "pairs")])
def test_auto_follows_the_table(monkeypatch, flags, cls, pointwise, classifier, depthwise):
    _cpu(monkeypatch, *flags)
    assert cpu.cpu_class() == cls
    assert _kernels("auto") == (pointwise, pointwise[1], classifier)
    assert [cpu.pointwise_kernel(t) for t in (True, False)] == pointwise[:2]
    assert cpu.depthwise_kernel() == depthwise


def test_explicit_requests(monkeypatch):
    """Each family its own row of the table: avx2 runs every weight kind and the stem on avx2;
    addonly stays multiplication-free where it can (int8 layers and the stem run plain), plain
    portable everywhere; the depthwise layout is the CPU's whatever the request."""
    _cpu(monkeypatch, avx2=True)
    assert _kernels("avx2") == (["avx2"] * 3, "avx2", "avx2")
    assert _kernels("addonly") == (["addonly", "plain", "addonly"], "plain", "plain")
    assert _kernels("plain") == (["plain"] * 3, "plain", "plain")
    _cpu(monkeypatch, amx=True, vnni=True, avx2=True)
    assert _kernels("amx") == (["amx"] * 3, "amx", "vnni")
    assert _kernels("vnni") == (["vnni"] * 3, "vnni", "vnni")
    assert _kernels("avx2") == (["avx2"] * 3, "avx2", "avx2")
    assert _kernels("plain") == (["plain"] * 3, "plain", "plain")
    assert cpu.depthwise_kernel() == "vnni"


@pytest.mark.parametrize("request_, flags, what", [
    ("amx", (False, True, True), "AMX-INT8"), ("vnni", (False, False, True), "AVX-512 VNNI"),
    ("avx2", (False, False, False), "AVX2")])
def test_a_request_the_cpu_cannot_run_is_an_error(monkeypatch, request_, flags, what):
    _cpu(monkeypatch, *flags)
    for choose in (lambda: cpu.pointwise_kernel(True, request_),
                   lambda: cpu.pointwise_kernel(False, request_),
                   lambda: cpu.classifier_kernel(request_)):
        with pytest.raises(RuntimeError, match=f"^kernels='{request_}' needs {what}"):
            choose()


@pytest.mark.parametrize("request_", ["reference", "bogus", ""])
def test_a_request_that_selects_no_kernel_is_an_error(request_):
    with pytest.raises(ValueError, match=f"kernels='{request_}' selects no kernel"):
        cpu.pointwise_kernel(True, request_)


# ---------------------------------------------------------------- the request reaching Model

def test_ternet_kernels_reaches_load(tiny, monkeypatch):
    """Without a kernels argument, load takes TERNET_KERNELS (else auto); an argument wins, and
    then the variable is not read at all."""
    monkeypatch.delenv("TERNET_KERNELS", raising=False)
    assert ternet.load(tiny, kernels="reference").kernels == "reference"
    assert ternet.load(tiny).kernels == "auto"
    monkeypatch.setenv("TERNET_KERNELS", "reference")
    assert ternet.load(tiny).kernels == "reference"
    monkeypatch.setenv("TERNET_KERNELS", " PLAIN ")
    m = ternet.load(tiny)
    assert m.kernels == "plain" and ternet.Model(m.file).kernels == "plain"
    assert ternet.load(tiny, kernels="reference").kernels == "reference"
    monkeypatch.setenv("TERNET_KERNELS", "bogus")
    with pytest.raises(SettingError, match="^TERNET_KERNELS='bogus': expected one of auto, amx"):
        ternet.load(tiny)
    assert ternet.load(tiny, kernels="reference").kernels == "reference"
    with pytest.raises(SettingError, match="^kernels='bogus': expected one of auto, amx"):
        ternet.load(tiny, kernels="bogus")


def test_ternet_kernels_chooses_the_built_kernels(tiny, monkeypatch):
    """The variable's request is the one the layers are built with: a family this CPU lacks
    fails at load, as the same argument does."""
    monkeypatch.setenv("TERNET_REPLAY", "0")            # no stored replay: load builds the layers
    _cpu(monkeypatch)
    monkeypatch.setenv("TERNET_KERNELS", "avx2")
    with pytest.raises(RuntimeError, match="^kernels='avx2' needs AVX2"):
        ternet.load(tiny)
    with pytest.raises(RuntimeError, match="^kernels='avx2' needs AVX2"):
        ternet.load(tiny, kernels="avx2")
    assert ternet.load(tiny, kernels="addonly").kernels == "addonly"


def _cli(*args, env):
    e = {k: v for k, v in os.environ.items() if k not in ("TERNET_MODEL", "TERNET_DEBUG")}
    return subprocess.run([sys.executable, "-m", "ternet", *map(str, args)], cwd=ROOT,
                          env={**e, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)


def test_cli_kernels_default_is_the_variable(tiny):
    r = _cli("bench", "--model", tiny, "--rounds", "1", "--no-layers", "--json",
             env={"TERNET_KERNELS": "reference"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kernels"] == "reference"


@pytest.mark.parametrize("var, value, args", [
    ("TERNET_KERNELS", "bogus", ()), ("TERNET_DEBUG", "maybe", ("--kernels", "reference"))])
def test_cli_bad_setting_is_a_usage_error(tiny, var, value, args):
    r = _cli("classify", CAT, "--model", tiny, *args, env={var: value})
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"ternet: error: {var}='{value}': expected ")


def test_cli_kernels_argument_wins(tiny):
    r = _cli("classify", CAT, "--model", tiny, "--kernels", "reference", "--json",
             env={"TERNET_KERNELS": "bogus"})
    assert r.returncode == 0, r.stderr
    assert "predictions" in r.stdout
