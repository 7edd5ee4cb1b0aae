"""ternet.conversion.tflite_reader on a model built here and (if present) the real MobileNetV2."""
import collections
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite")
pytest.importorskip("flatbuffers")

from ternet import ModelFormatError  # noqa: E402
from ternet.conversion.tflite_reader import TFLiteFormatError, read_tflite  # noqa: E402
from tflite_build import OpSpec, TensorSpec, build_tflite  # noqa: E402

SHARED = Path(os.environ.get("TERNET_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
MOBILENET = SHARED / "data/models/tf2_mobilenet_v2_1.0_224_ptq.tflite"


def conv_add_model(rng):
    """x -> CONV_2D 3x3 stride 2 VALID (per-channel int8) -> ADD(itself) -> RESHAPE."""
    w = rng.integers(-127, 128, (6, 3, 3, 4)).astype(np.int8)
    b = rng.integers(-1000, 1000, 6).astype(np.int32)
    ws = rng.uniform(0.01, 0.02, 6).astype(np.float32)
    tensors = [
        TensorSpec("x", (1, 7, 7, 4), "int8", scales=[0.05], zero_points=[-3]),
        TensorSpec("conv/w", (6, 3, 3, 4), "int8", data=w, scales=list(ws), zero_points=[0] * 6),
        TensorSpec("conv/b", (6,), "int32", data=b, scales=list(0.05 * ws), zero_points=[0] * 6),
        TensorSpec("conv/y", (1, 3, 3, 6), "int8", scales=[0.1], zero_points=[5]),
        TensorSpec("sum", (1, 3, 3, 6), "int8", scales=[0.2], zero_points=[-7]),
        TensorSpec("shape", (2,), "int32", data=np.array([1, 54], np.int32)),
        TensorSpec("flat", (1, 54), "int8", scales=[0.2], zero_points=[-7]),
    ]
    ops = [OpSpec("CONV_2D", [0, 1, 2], [3], "Conv2DOptions",
                  {"Padding": 1, "StrideW": 2, "StrideH": 2, "FusedActivationFunction": 3}),
           OpSpec("ADD", [3, 3], [4], "AddOptions", {"FusedActivationFunction": 1}),
           OpSpec("RESHAPE", [4, 5], [6], "ReshapeOptions", {"NewShape": [1, 54]})]
    return build_tflite(tensors, ops, inputs=[0], outputs=[6]), w, b, ws


def test_reads_ops_tensors_and_quantization(tmp_path):
    raw, w, b, ws = conv_add_model(np.random.default_rng(0))
    path = tmp_path / "m.tflite"
    path.write_bytes(raw)
    m = read_tflite(path)

    assert m.path == str(path) and m.version == 3 and m.num_subgraphs == 1
    assert (m.inputs, m.outputs) == ((0,), (6,))
    assert [op.opcode for op in m.ops] == ["CONV_2D", "ADD", "RESHAPE"]
    assert [(op.inputs, op.outputs) for op in m.ops] == [((0, 1, 2), (3,)), ((3, 3), (4,)),
                                                          ((4, 5), (6,))]
    conv = m.ops[0].options
    assert (conv["padding"], conv["stride_w"], conv["stride_h"]) == ("VALID", 2, 2)
    assert conv["fused_activation_function"] == "RELU6"
    assert (conv["dilation_w_factor"], conv["dilation_h_factor"]) == (1, 1)   # schema defaults
    assert m.ops[1].options["fused_activation_function"] == "RELU"
    assert m.ops[2].options["new_shape"] == [1, 54]

    x, wt, bt, y = m.tensors[0], m.tensors[1], m.tensors[2], m.tensors[3]
    assert (x.name, x.shape, x.dtype, x.data) == ("x", (1, 7, 7, 4), "int8", None)
    assert x.quant.scales.tolist() == [np.float32(0.05)] and x.quant.zero_points.tolist() == [-3]
    assert not x.quant.per_channel
    assert wt.dtype == "int8" and wt.shape == (6, 3, 3, 4) and np.array_equal(wt.data, w)
    assert wt.quant.per_channel and np.array_equal(wt.quant.scales, ws)
    assert wt.quant.quantized_dimension == 0 and not wt.data.flags.writeable
    assert bt.dtype == "int32" and np.array_equal(bt.data, b)
    assert y.data is None and m.tensors[5].quant is None
    assert np.array_equal(m.tensors[5].data, [1, 54])


def test_not_a_flatbuffer_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "photo.tflite"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg")
    with pytest.raises(TFLiteFormatError, match=r"photo\.tflite: not a TFLite flatbuffer") as e:
        read_tflite(path)
    assert isinstance(e.value, ModelFormatError) and "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [8, 40, 200, 600])
def test_truncated_file_is_a_format_error(tmp_path, keep):
    raw = conv_add_model(np.random.default_rng(1))[0]
    path = tmp_path / "cut.tflite"
    path.write_bytes(raw[:keep])
    with pytest.raises(TFLiteFormatError, match=r"cut\.tflite: ") as e:
        read_tflite(path)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        read_tflite(tmp_path / "nope.tflite")


def test_missing_tflite_package_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tflite", None)      # import tflite -> ImportError
    with pytest.raises(ImportError,
                       match=r"needs the 'tflite' package: pip install 'ternet\[convert\]'"):
        read_tflite(tmp_path / "m.tflite")


@pytest.mark.skipif(not MOBILENET.exists(), reason="the MobileNetV2 .tflite is not in ../shared")
def test_real_mobilenet_v2():
    m = read_tflite(MOBILENET)
    counts = collections.Counter(op.opcode for op in m.ops)
    assert counts == {"CONV_2D": 36, "DEPTHWISE_CONV_2D": 17, "ADD": 10, "QUANTIZE": 2,
                      "MEAN": 1, "RESHAPE": 1, "SOFTMAX": 1}
    x = m.tensors[m.inputs[0]]
    assert (x.shape, x.dtype, x.quant.zero_points.tolist()) == ((1, 224, 224, 3), "uint8", [127])
    assert x.quant.scales[0] == np.float32(1 / 127.5)
    assert m.tensors[m.outputs[0]].shape == (1, 1001)
    for op in m.ops:
        if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w = m.tensors[op.inputs[1]]
            assert w.dtype == "int8" and w.data is not None
            assert w.quant.scales.size == w.shape[w.quant.quantized_dimension]
            assert np.all(w.quant.zero_points == 0)
