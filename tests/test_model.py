"""End to end: a tiny random model written, loaded and run equals the reference runner exactly."""
from pathlib import Path

import numpy as np
import pytest

import ternet
from ternet.format import read_model, write_model
from ternet.reference import run_reference
from tiny_model import builder, make_tiny_model, specs

GOLDEN = Path(__file__).parent / "data" / "tiny_golden.npz"


def _impls():
    from ternet.kernels import cpu
    out = ["plain", "addonly"]
    if cpu.has_avx2():
        out.append("avx2")
    if cpu.has_avx512vnni():
        out.append("vnni")
    return out


@pytest.fixture(scope="module", params=["same", "symmetric"])
def tiny(tmp_path_factory, request):
    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.safetensors", padding=request.param)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 33, 33, 3), dtype=np.uint8)
    return path, x, run_reference(read_model(path), x)


@pytest.mark.parametrize("impl", _impls())
def test_runner_equals_reference(tiny, impl):
    path, x, ref = tiny
    got = ternet.load(path, kernels=impl).predict(x)
    assert got.dtype == np.float32 and got.shape == (3, 10)
    np.testing.assert_array_equal(got, ref)
    assert np.ptp(ref) > 0          # logits actually vary: the test is not trivially passing


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("channels", [20, 16])
def test_conv2d_after_another_layer(tmp_path, impl, channels):
    """A k x k conv2d reading a channel-padded node's output (20 channels in a 32-wide buffer;
    16 needs no padding) equals the reference (it was a ValueError on the fast path)."""
    b = builder(9)
    x = b.conv("c0", "input", channels, 3, 1, "same", "relu")
    x = b.conv("c1", x, 8, 3, 2, "symmetric", "relu6")
    b.linear("fc", b.gap("pool", x), 4)
    inp, pre = specs(b, 9)
    path = tmp_path / "m.safetensors"
    write_model(path, arch="t", graph=b.graph, tensors=b.tensors, input_spec=inp, preprocess=pre,
                labels=list("abcd"), provenance={"producer": "test"})
    x = np.random.default_rng(2).integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    ref = run_reference(read_model(path), x)
    np.testing.assert_array_equal(ternet.load(path, kernels=impl).predict(x), ref)
    assert np.ptp(ref) > 0


def test_batch_size_and_threads_invariant(tiny):
    path, x, ref = tiny
    model = ternet.load(path)
    singles = np.concatenate([model.predict(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(singles, ref)
    two = ternet.load(path, threads=2).predict(x)
    np.testing.assert_array_equal(two, ref)
    np.testing.assert_array_equal(model.predict(x), model.predict(x))   # repeatable


def test_golden_outputs(tmp_path):
    """Logits of a fixed tiny model on a fixed input, committed: catches any drift in numerics."""
    golden = np.load(GOLDEN)
    path = make_tiny_model(tmp_path / "tiny.safetensors", seed=int(golden["seed"]))
    model = ternet.load(path)
    np.testing.assert_array_equal(model.predict(golden["x"]), golden["logits"])
    np.testing.assert_array_equal(run_reference(model.file, golden["x"]), golden["logits"])


def test_predict_rejects_wrong_input(tiny):
    path, x, _ = tiny
    model = ternet.load(path)
    with pytest.raises(ValueError, match=r"\(N, 33, 33, 3\)"):
        model.predict(x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 batch"):
        model.predict(x[0])


def test_classify_list_in_list_out(tiny):
    path, x, _ = tiny
    model = ternet.load(path, kernels="reference")
    assert model.classify([]) == [] and model.classify(()) == []
    imgs = [np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)] * 2
    one, both = model.classify(imgs[0], top_k=3), model.classify(imgs, top_k=3)
    assert len(both) == 2 and both[0] == both[1] == one and len(one) == 3
