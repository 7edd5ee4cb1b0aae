"""benchmarks/peer_models.export_ternet: a ternet model file as QDQ ONNX computes the same logits.

Uses the tiny all-ops model (ternary, hybrid and int8 pointwise, relu6 with non-zero zero points
so the explicit Clip path runs, both paddings). Skips without onnx/onnxruntime (the `bench` extra).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_models  # noqa: E402

import ternet  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402


@pytest.mark.parametrize("seed,padding", [(0, "same"), (1, "symmetric")])
@pytest.mark.parametrize("weights", ["u8", "s8"])
@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_export_matches_reference(tmp_path, seed, padding, weights, level):
    src = tmp_path / "tiny.safetensors"
    make_tiny_model(src, seed=seed, padding=padding)
    m = ternet.load(src, kernels="reference")
    onnx_path = peer_models.export_ternet(src, tmp_path / "tiny.onnx", log=lambda s: None, weights=weights)
    h = m.input_shape[0]
    x = np.random.default_rng(seed).integers(0, 256, (4, h, h, 3), dtype=np.uint8)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    got = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    want = m.predict(x)
    # identical integers up to ties (ternet rounds half up, onnxruntime half to even) and the
    # float evaluation order of the classifier
    np.testing.assert_allclose(got, want, atol=1e-3 * float(np.ptp(want)), rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()
