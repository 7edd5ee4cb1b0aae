"""The hard_swish op (ternet/ops/hard_swish.py, kernels/lut.py): table kernel == reference bit
for bit, the reference's defining properties, the loader's checks, a whole model through every
kernel path and a replay equal to the reference runner, and its `ternet info` row."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import ternet
from ternet.errors import ModelFormatError
from ternet.format import read_model, write_model
from ternet.info import analyze
from ternet.kernels.layout import ROW_SLACK, pad_to
from ternet.kernels.lut import hard_swish_ref, make_hard_swish
from ternet.reference import run_reference
from tiny_model import builder, specs

POISON = 0xA5
scales = st.floats(1e-3, 1.0, allow_nan=False, allow_infinity=False)


@given(P=st.integers(1, 300), C=st.integers(1, 70), zx=st.integers(0, 255), zo=st.integers(0, 255),
       s_in=scales, s_out=scales, seed=st.integers(0, 2**32 - 1))
def test_kernel_matches_reference(P, C, zx, zo, s_in, s_out, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (P + ROW_SLACK, pad_to(C)), dtype=np.uint8)
    out = np.full((P + ROW_SLACK + 2, pad_to(C)), POISON, np.uint8)
    make_hard_swish(zx, s_in, zo, s_out)(x, P, out)
    np.testing.assert_array_equal(out[:P], hard_swish_ref(x[:P], zx, s_in, zo, s_out))
    assert (out[P:] == POISON).all()


@given(zx=st.integers(0, 255), s=scales)
def test_reference_is_identity_above_3_and_zero_below_minus_3(zx, s):
    """h(v) = v for v >= 3 and 0 for v <= -3: with the output quantized like the input, codes
    at or above zx + 3/s come back unchanged and codes at or below zx - 3/s become zx."""
    x = np.arange(256)
    y = hard_swish_ref(x, zx, s, zx, s)
    v = s * (x - zx)
    np.testing.assert_array_equal(y[v >= 3], x[v >= 3])
    assert (y[v <= -3] == zx).all()
    assert (y[(v > -3) & (v <= 0)] <= zx).all()          # h <= 0 on (-3, 0]


def test_kernel_in_place():
    x = np.random.default_rng(3).integers(0, 256, (10 + ROW_SLACK, 32), dtype=np.uint8)
    want = hard_swish_ref(x[:10], 100, 0.05, 30, 0.04)
    make_hard_swish(100, 0.05, 30, 0.04)(x, 10, x)
    np.testing.assert_array_equal(x[:10], want)


def _hard_swish(b, name, src):
    s_in, zx = b.qp[src]
    s_out, zo = s_in * 0.9, 40
    b.tensors[f"{name}.output_scale"] = np.array([s_out], np.float32)
    b.tensors[f"{name}.output_zero_point"] = np.array([zo], np.int32)
    b.qp[name] = (s_out, zo)
    b._node(name, "hard_swish", [src], {}, b.shape[src])
    return name


def _model(path, drop=None, stem_input=False, **tensor_override):
    b = builder(17, seed=4)
    x = b.conv("stem", "input", 20, 3, 2, "same", "none")
    x = _hard_swish(b, "stem.act", "input" if stem_input else x)
    if stem_input:
        x = "stem"
    y = b.dw("dw", x, 3, 1, "same", "none")
    y = _hard_swish(b, "dw.act", y)
    y = b.pw("project", y, 20, "ternary", "none")
    x = b.add("add", x, y)
    b.linear("fc", b.gap("pool", x), 6)
    b.tensors.update(tensor_override)
    if drop:
        del b.tensors[drop]
    inp, pre = specs(b, 17)
    write_model(path, arch="t", graph=b.graph, tensors=b.tensors, input_spec=inp, preprocess=pre,
                labels=list("abcdef"), provenance={"producer": "test"})
    return path


def _impls():
    from ternet.kernels import cpu
    return ["plain", "addonly"] + (["avx2"] if cpu.has_avx2() else []) + \
        (["vnni"] if cpu.has_avx512vnni() else [])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = _model(tmp_path_factory.mktemp("hs") / "m.safetensors")
    x = np.random.default_rng(2).integers(0, 256, (3, 17, 17, 3), dtype=np.uint8)
    return path, x, run_reference(read_model(path), x)


@pytest.mark.parametrize("impl", _impls())
def test_model_equals_reference(model, impl, monkeypatch):
    monkeypatch.setenv("TERNET_REPLAY", "0")
    path, x, ref = model
    np.testing.assert_array_equal(ternet.load(path, kernels=impl).predict(x), ref)
    assert np.ptp(ref) > 0


def test_replay_equals_reference(model, tmp_path, monkeypatch):
    monkeypatch.setenv("TERNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TERNET_REPLAY", raising=False)
    monkeypatch.delenv("TERNET_FROZEN", raising=False)
    path, x, ref = model
    m = ternet.load(path)
    np.testing.assert_array_equal(m.predict(x[:1]), ref[:1])      # numba, recorded
    m2 = ternet.load(path)
    assert m2.replay_ready(1)
    np.testing.assert_array_equal(m2.predict(x[:1]), ref[:1])     # replayed


def test_loader_checks(tmp_path):
    with pytest.raises(ModelFormatError, match=r"tensor 'dw.act.output_scale': missing"):
        _model(tmp_path / "a.safetensors", drop="dw.act.output_scale")
    with pytest.raises(ModelFormatError, match=r"node 'stem.act'.*cannot read the graph input"):
        _model(tmp_path / "b.safetensors", stem_input=True)
    with pytest.raises(ModelFormatError, match=r"node 'dw.act': output multiplier .* outside"):
        _model(tmp_path / "c.safetensors", **{"dw.act.output_scale": np.array([1e-30], np.float32)})


def test_info_counts_outputs_not_operations(model):
    path, _, _ = model
    info = analyze(read_model(path))
    rows = [l for l in info.layers if l.op == "hard_swish"]
    assert [l.name for l in rows] == ["stem.act", "dw.act"]
    for l in rows:
        assert l.macs == l.adds == l.mults == l.params == 0
        assert l.outputs == int(np.prod(l.out_shape)) > 0
