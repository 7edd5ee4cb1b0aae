"""ternet convert on ONNX QDQ models built here: onnxruntime's quantize_static output of a small
float CNN (compared with onnxruntime one layer at a time, as test_convert.py does with LiteRT),
ternet's own QDQ export converted back (benchmarks/peer_models.export_ternet), and refusals.
Skips without onnx / onnxruntime."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_models  # noqa: E402

import ternet  # noqa: E402
from ternet import quant  # noqa: E402
from ternet.conversion import ConversionError, convert  # noqa: E402
from ternet.format import pointwise_weight, read_model  # noqa: E402
from ternet.reference import run_node  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402

SIZE = 16
PREPROCESS = {"mean": "0.5", "std": "0.25"}    # the float input is (pixel / 255 - 0.5) / 0.25
AGREEMENT = 0.99                              # as in test_convert.py


def float_cnn(seed=0, extra=None):
    """NCHW float CNN: stem 3x3/2 + ReLU6 (Clip), depthwise 3x3 + ReLU, expand / project 1x1
    with a residual add, global pool, Gemm. `extra(nodes, inits, x) -> x` inserts ops after the
    stem."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def conv(name, x, cout, cin, k, stride=1, pads=(0, 0, 0, 0), group=1):
        w = rng.normal(0, np.sqrt(2 / (cin // group * k * k)), (cout, cin // group, k, k))
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.w", w),
                                               const(f"{name}.b", rng.normal(0, 0.1, cout))],
                                      [name], strides=[stride, stride], pads=list(pads),
                                      group=group, kernel_shape=[k, k]))
        return name

    x = conv("stem", "input", 8, 3, 3, stride=2, pads=(0, 0, 1, 1))    # TF SAME on 16
    nodes.append(helper.make_node("Clip", [x, const("zero", 0.0), const("six", 6.0)], ["stem6"]))
    x = "stem6"
    if extra:
        x = extra(nodes, const, x)
    x = conv("dw", x, 8, 8, 3, pads=(1, 1, 1, 1), group=8)
    nodes.append(helper.make_node("Relu", [x], ["dw_relu"]))
    skip = "dw_relu"
    x = conv("expand", skip, 24, 8, 1)
    nodes.append(helper.make_node("Relu", [x], ["expand_relu"]))
    x = conv("project", "expand_relu", 8, 24, 1)
    nodes.append(helper.make_node("Add", [skip, x], ["sum"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["sum"], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", rng.normal(0, 0.3, (10, 8))),
                                           const("fc.b", rng.normal(0, 0.1, 10))],
                                  ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def pixels(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)


def to_float(x_u8):
    x = ((x_u8 / 255.0 - 0.5) / 0.25).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def quantize(model, tmp_path) -> Path:
    """onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    fp32, qdq = tmp_path / "fp32.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(fp32))
    calib = to_float(pixels(16, seed=2))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq


def ort_layers(qdq: Path, report, x_u8, input_q):
    """onnxruntime's value of every tensor a ternet node stands for, for each image."""
    m = onnx.load(str(qdq))
    names = list(report.source_tensors.values())
    for name in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s, zp = input_q
    # the quantized input ternet sees, dequantized: onnxruntime's QuantizeLinear gives it back
    xf = ((x_u8.astype(np.float32) - np.float32(zp)) * np.float32(s)).transpose(0, 3, 1, 2)
    out = []
    for i in range(len(x_u8)):
        res = sess.run(names, {"input": np.ascontiguousarray(xf[i:i + 1])})
        out.append(dict(zip(names, res)))
    return out


def test_quantize_static_model_matches_onnxruntime_layer_by_layer(tmp_path):
    qdq = quantize(float_cnn(), tmp_path)
    out = tmp_path / "m.safetensors"
    report = convert(qdq, out, preprocess=PREPROCESS)
    mf = read_model(out)
    assert [n.op for n in mf.graph] == ["conv2d", "depthwise", "pointwise", "pointwise", "add",
                                        "global_avg_pool", "linear"]
    assert [n.attrs["padding"] for n in mf.graph[:2]] == ["same", "same"]
    x = ternet.load(out, kernels="reference")
    inputs = np.stack([x.preprocess(img) for img in pixels(3)])
    layers = ort_layers(qdq, report, inputs, (mf.input["scale"], mf.input["zero_point"]))
    values = equal = 0
    for img, theirs in zip(inputs, layers):
        seen = {"input": img[None]}
        for node in mf.graph:
            got = run_node(mf, node, [seen[s] for s in node.inputs])
            want = theirs[report.source_tensors[node.name]]
            if node.op == "linear":      # onnxruntime's float Gemm on the same integers
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
                continue
            want = want.transpose(0, 2, 3, 1) if want.ndim == 4 else want.reshape(got.shape)
            d = np.abs(got.astype(np.int16) - want.astype(np.int16))
            assert d.max() <= 1, node.name
            values, equal = values + d.size, equal + int(np.sum(d == 0))
            seen[node.name] = want.astype(np.uint8)
    assert equal >= AGREEMENT * values


def tie_model(s_in, s_w, s_out, w, zp=128) -> onnx.ModelProto:
    """QDQ by hand: a 1x1 conv (int8 weights w [cout, 3], scales s_w, zero bias) on the
    quantized input, global pool, Gemm. With power-of-two scales its multiplier is exact."""
    cout = w.shape[0]
    inits = [numpy_helper.from_array(np.asarray(v, dt), n) for n, v, dt in [
        ("s_in", s_in, np.float32), ("s_out", s_out, np.float32), ("zp", zp, np.uint8),
        ("w", w.reshape(cout, 3, 1, 1), np.int8), ("w_s", [s_w] * cout, np.float32),
        ("w_zp", [0] * cout, np.int8), ("b", [0] * cout, np.int32),
        ("b_s", [s_in * s_w] * cout, np.float32), ("b_zp", [0] * cout, np.int32),
        ("fc_w", np.ones((2, cout)), np.int8), ("fc_s", [s_w] * 2, np.float32),
        ("fc_zp", [0] * 2, np.int8), ("fc_b", [0] * 2, np.int32),
        ("fc_bs", [s_out * s_w] * 2, np.float32), ("fc_bzp", [0] * 2, np.int32)]]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_s", "w_zp"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "b_s", "b_zp"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["conv"], kernel_shape=[1, 1]),
             helper.make_node("QuantizeLinear", ["conv", "s_out", "zp"], ["conv_q"]),
             helper.make_node("DequantizeLinear", ["conv_q", "s_out", "zp"], ["conv_d"]),
             helper.make_node("GlobalAveragePool", ["conv_d"], ["pool"]),
             helper.make_node("QuantizeLinear", ["pool", "s_out", "zp"], ["pool_q"]),
             helper.make_node("DequantizeLinear", ["pool_q", "s_out", "zp"], ["pool_d"]),
             helper.make_node("Flatten", ["pool_d"], ["flat"]),
             helper.make_node("DequantizeLinear", ["fc_w", "fc_s", "fc_zp"], ["fc_wd"], axis=0),
             helper.make_node("DequantizeLinear", ["fc_b", "fc_bs", "fc_bzp"], ["fc_bd"],
                              axis=0),
             helper.make_node("Gemm", ["flat", "fc_wd", "fc_bd"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "ties", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_requantization_differs_from_onnxruntime_only_in_ties(tmp_path):
    """Why ternet's rule and onnxruntime differ on converted QDQ models (docs/convert.md):
    onnxruntime's integer kernels round acc * m half to even, ternet's rule rounds half up. A
    conv whose multiplier is exactly 1/2 makes every odd accumulator a tie: under ternet's rule
    the output is one step above onnxruntime's exactly where acc / 2 = k + 1/2 with k even; the
    converter writes the file with onnxruntime's rule, which gives its values everywhere."""
    rng = np.random.default_rng(5)
    s_in, s_w = 2.0 ** -5, 2.0 ** -4
    qdq = tmp_path / "ties.onnx"
    onnx.save(tie_model(s_in, s_w, 2 * s_in * s_w, rng.integers(-3, 4, (6, 3))), str(qdq))
    out = tmp_path / "m.safetensors"
    report = convert(qdq, out, preprocess=PREPROCESS)
    mf = read_model(out)
    assert mf.requant == "onnxruntime"
    conv = mf.graph[0]
    assert conv.op == "conv2d"
    x = rng.integers(118, 139, (4, 8, 8, 3)).astype(np.uint8)     # acc stays inside [0, 255]
    theirs = np.concatenate([
        layer[report.source_tensors[conv.name]].transpose(0, 2, 3, 1)
        for layer in ort_layers(qdq, report, x, (s_in, 128))]).astype(np.int16)
    acc = (x.astype(np.int32) - 128) @ mf.tensor(conv, "weight")[:, 0, 0, :].T.astype(np.int32)
    ours = run_node(dataclasses.replace(mf, requant="ternet"), conv, [x]).astype(np.int16)
    assert np.array_equal(ours - theirs, (acc % 4 == 1).astype(np.int16))
    assert np.sum(acc % 4 == 1) > 100
    assert np.array_equal(run_node(mf, conv, [x]), theirs)
    fast = ternet.load(out, kernels="plain")       # the kernels run the file's rule too
    assert np.array_equal(fast.predict(x), ternet.load(out, kernels="reference").predict(x))


def test_raw_float_input_needs_preprocess(tmp_path):
    qdq = quantize(float_cnn(), tmp_path)
    with pytest.raises(ConversionError, match=r"float input.*--preprocess mean=R,G,B std=R,G,B"):
        convert(qdq, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("padding", ["same", "symmetric"])
@pytest.mark.parametrize("weights", ["s8", "u8"])
def test_ternet_qdq_export_round_trip(tmp_path, padding, weights):
    src = tmp_path / "tiny.safetensors"
    make_tiny_model(src, seed=3, padding=padding)
    qdq = peer_models.export_ternet(src, tmp_path / "tiny.onnx", log=lambda s: None,
                                    weights=weights)
    back = tmp_path / "back.safetensors"
    # ternet's own export: keep ternet's rule (the default for ONNX is onnxruntime's)
    report = convert(qdq, back, requant="ternet")
    assert read_model(convert(qdq, tmp_path / "o.safetensors").output).requant == "onnxruntime"
    with pytest.raises(ConversionError, match="unknown requantization rule 'even'"):
        convert(qdq, tmp_path / "e.safetensors", requant="even")
    a, b = read_model(src), read_model(back)
    assert [n.op for n in a.graph] == [n.op for n in b.graph]
    for na, nb in zip(a.graph, b.graph):
        assert pads(a, na) == pads(b, nb)      # stride 1: "same" and "symmetric" coincide
        if na.op == "pointwise":
            assert np.array_equal(pointwise_weight(a, na), pointwise_weight(b, nb))
            # ternary layers come back ternary; hybrid ones as int8 (the same integers)
            assert nb.attrs["weight"] == ("ternary" if na.attrs["weight"] == "ternary" else "int8")
        fields = ["bias", "weight_scale", "output_scale", "output_zero_point"]
        fields += ["weight"] if na.op in ("conv2d", "depthwise", "linear") else []
        for f in fields:
            ka, kb = f"{na.name}.{f}", f"{nb.name}.{f}"
            assert (ka in a.tensors) == (kb in b.tensors)
            if ka in a.tensors:
                assert np.array_equal(a.tensors[ka], b.tensors[kb]), ka
    assert report.ternary_layers == [n.name for n in b.graph if n.attrs.get("weight") == "ternary"]
    x = np.random.default_rng(4).integers(0, 256, (2,) + ternet.load(src).input_shape, np.uint8)
    assert np.array_equal(ternet.load(src, kernels="reference").predict(x),
                          ternet.load(back, kernels="reference").predict(x))


def pads(mf, node):
    """(top, left, Ho, Wo) of a conv-like node on its actual input (None for other ops)."""
    if "padding" not in node.attrs:
        return None
    shapes = {n.name: n.out_shape for n in mf.graph}
    h, w = (mf.input["height"], mf.input["width"]) if node.inputs[0] == "input" else \
        shapes[node.inputs[0]][:2]
    return quant.conv_geometry(node.attrs["padding"], h, w, node.attrs["kernel"],
                               node.attrs["stride"])


def test_unsupported_op_is_named(tmp_path):
    def sigmoid(nodes, const, x):
        nodes.append(helper.make_node("Sigmoid", [x], ["gate"], name="the_gate"))
        return "gate"
    qdq = quantize(float_cnn(extra=sigmoid), tmp_path)
    with pytest.raises(ConversionError, match=r"node #\d+ Sigmoid 'the_gate': op Sigmoid is not "
                                              r"supported by ternet"):
        convert(qdq, tmp_path / "m.safetensors", preprocess=PREPROCESS)
    assert not (tmp_path / "m.safetensors").exists()


def test_float_model_is_refused(tmp_path):
    path = tmp_path / "fp32.onnx"
    onnx.save(float_cnn(), str(path))
    with pytest.raises(ConversionError, match=r"node #0 Conv 'stem': input 'input' is not a "
                                              r"dequantized activation"):
        convert(path, tmp_path / "m.safetensors", preprocess=PREPROCESS)


def test_cli_malformed_onnx_is_one_line(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" * 10)
    r = subprocess.run([sys.executable, "-m", "ternet", "convert", str(bad), "-o",
                        str(tmp_path / "m.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "broken.onnx: " in r.stderr
    assert not (tmp_path / "m.safetensors").exists()
