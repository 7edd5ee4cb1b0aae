"""ternet convert on small TFLite models built here (tests/tflite_build.py), no network.

Numerics are compared with LiteRT where it is installed, one layer at a time: each ternet node
runs (numpy reference) on LiteRT's own input to that layer, so the only difference left is the
rounding rule of that one requantization (LiteRT's XNNPACK rounds acc * scale to nearest-even in
float32, ternet rounds half up, docs/convert.md): at most 1 step, and rare.
"""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tflite")
pytest.importorskip("flatbuffers")

import ternet  # noqa: E402
from ternet.conversion import ConversionError, convert  # noqa: E402
from ternet.format import read_model  # noqa: E402
from ternet.reference import run_node, run_reference  # noqa: E402
from tflite_build import OpSpec, TensorSpec, build_tflite  # noqa: E402

SAME, VALID = 0, 1
ACT = {"none": 0, "relu": 1, "relu6": 3}
AGREEMENT = 0.99        # share of values equal to LiteRT's; measured 1 - 5e-6 on MobileNetV2


class Net:
    """A TFLite int8 CNN assembled op by op; activations are (tensor id, shape, scale, zp)."""

    def __init__(self, seed=0, size=16, input_dtype="uint8"):
        self.rng = np.random.default_rng(seed)
        self.tensors, self.ops = [], []
        scale, zp = 1 / 127.5, 127
        if input_dtype == "float32":
            raw = self._tensor("image", (1, size, size, 3), "float32")
            self.x = self._act("image_q", (1, size, size, 3), scale, zp - 128)
            self.ops.append(OpSpec("QUANTIZE", [raw], [self.x[0]]))
        else:
            raw = self._tensor("image", (1, size, size, 3), "uint8", scales=[scale],
                               zero_points=[zp])
            self.x = self._act("image_q", (1, size, size, 3), scale, zp - 128)
            self.ops.append(OpSpec("QUANTIZE", [raw], [self.x[0]]))
        self.input = raw
        self.output = None

    def _tensor(self, name, shape, dtype, data=None, scales=None, zero_points=None, qdim=0):
        self.tensors.append(TensorSpec(name, tuple(shape), dtype, data, scales, zero_points, qdim))
        return len(self.tensors) - 1

    def _act(self, name, shape, scale, zp):
        return (self._tensor(name, shape, "int8", scales=[scale], zero_points=[int(zp)]),
                tuple(shape), float(np.float32(scale)), int(zp))

    def _out_scale(self, x, w_scales, fan_in):
        # accumulators ~ 73 (|w|) * 50 (|x - zx|) * sqrt(fan_in): about 40 output steps per sigma
        return float(np.mean(w_scales)) * x[2] * 91.0 * np.sqrt(fan_in)

    def _weights(self, shape, axis, per_tensor, ternary):
        cout = shape[axis]
        if ternary:
            step = self.rng.integers(1, 128, cout)
            codes = self.rng.integers(-1, 2, shape)
            w = (codes * step.reshape([-1 if i == axis else 1 for i in range(len(shape))]))
        else:
            w = self.rng.integers(-127, 128, shape)
        scales = self.rng.uniform(0.005, 0.02, 1 if per_tensor else cout).astype(np.float32)
        return w.astype(np.int8), scales

    def conv(self, cout, k=1, stride=1, padding=SAME, act="none", ternary=False,
             per_tensor=False, bias_multiple=1, src=None):
        x = src or self.x
        cin = x[1][3]
        w, ws = self._weights((cout, k, k, cin), 0, per_tensor, ternary)
        steps = np.abs(w.reshape(cout, -1).astype(np.int32)).max(axis=1).clip(1) if ternary else 1
        bias = (self.rng.integers(-40, 40, cout) * bias_multiple * steps).astype(np.int32)
        h = x[1][1]
        out = -(-h // stride) if padding == SAME else (h - k) // stride + 1
        return self._conv_op("CONV_2D", x, w, ws, bias, (1, out, out, cout), k * k * cin,
                             {"Padding": padding, "StrideW": stride, "StrideH": stride,
                              "FusedActivationFunction": ACT[act]})

    def depthwise(self, k=3, stride=1, padding=SAME, act="relu6", src=None):
        x = src or self.x
        c = x[1][3]
        w, ws = self._weights((1, k, k, c), 3, False, False)
        bias = self.rng.integers(-2000, 2000, c).astype(np.int32)
        h = x[1][1]
        out = -(-h // stride) if padding == SAME else (h - k) // stride + 1
        return self._conv_op("DEPTHWISE_CONV_2D", x, w, ws, bias, (1, out, out, c), k * k,
                             {"Padding": padding, "StrideW": stride, "StrideH": stride,
                              "DepthMultiplier": 1, "FusedActivationFunction": ACT[act]},
                             qdim=3)

    def _conv_op(self, opcode, x, w, ws, bias, out_shape, fan_in, options, qdim=0):
        n = len(self.ops)
        wt = self._tensor(f"op{n}/w", w.shape, "int8", w, list(ws), [0] * ws.size, qdim)
        bt = self._tensor(f"op{n}/b", bias.shape, "int32", bias, list(ws * x[2]), [0] * ws.size)
        y = self._act(f"op{n}/y", out_shape, self._out_scale(x, ws, fan_in),
                      self.rng.integers(-20, 20))
        kind = "Conv2DOptions" if opcode == "CONV_2D" else "DepthwiseConv2DOptions"
        self.ops.append(OpSpec(opcode, [x[0], wt, bt], [y[0]], kind, options))
        self.x = y
        return y

    def pad(self, top, bottom, left, right):
        x = self.x
        pads = self._tensor(f"op{len(self.ops)}/pads", (4, 2), "int32",
                            np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        _, h, w, c = x[1]
        y = self._act(f"op{len(self.ops)}/padded", (1, h + top + bottom, w + left + right, c),
                      x[2], x[3])
        self.ops.append(OpSpec("PAD", [x[0], pads], [y[0]]))
        self.x = y
        return y

    def unary(self, opcode, src=None, options_type=None, options=None, out_q=None):
        x = src or self.x
        scale, zp = out_q or (x[2], x[3])
        y = self._act(f"op{len(self.ops)}/{opcode.lower()}", x[1], scale, zp)
        self.ops.append(OpSpec(opcode, [x[0]], [y[0]], options_type, options or {}))
        self.x = y
        return y

    def add(self, a, b, act="none"):
        y = self._act(f"op{len(self.ops)}/add", a[1], 1.3 * max(a[2], b[2]),
                      self.rng.integers(-10, 10))
        self.ops.append(OpSpec("ADD", [a[0], b[0]], [y[0]], "AddOptions",
                               {"FusedActivationFunction": ACT[act]}))
        self.x = y
        return y

    def mean(self):
        x = self.x
        axes = self._tensor(f"op{len(self.ops)}/axes", (2,), "int32", np.array([1, 2], np.int32))
        y = self._act(f"op{len(self.ops)}/mean", (1, 1, 1, x[1][3]), x[2] * 0.8, x[3])
        self.ops.append(OpSpec("MEAN", [x[0], axes], [y[0]], "ReducerOptions", {"KeepDims": True}))
        self.x = y
        return y

    def classifier(self, classes, as_conv=False):
        x = self.x
        cin = x[1][3]
        w, ws = self._weights((classes, cin), 0, False, False)
        bias = self.rng.integers(-3000, 3000, classes).astype(np.int32)
        if as_conv:
            self.x = self._conv_op("CONV_2D", x, w.reshape(classes, 1, 1, cin), ws, bias,
                                   (1, 1, 1, classes), cin,
                                   {"Padding": SAME, "StrideW": 1, "StrideH": 1,
                                    "FusedActivationFunction": 0})
            shape = self._tensor("logits/shape", (2,), "int32", np.array([1, classes], np.int32))
            flat = self._act("logits/flat", (1, classes), self.x[2], self.x[3])
            self.ops.append(OpSpec("RESHAPE", [self.x[0], shape], [flat[0]], "ReshapeOptions",
                                   {"NewShape": [1, classes]}))
            logits = flat
        else:
            n = len(self.ops)
            wt = self._tensor(f"op{n}/w", w.shape, "int8", w, list(ws), [0] * classes)
            bt = self._tensor(f"op{n}/b", bias.shape, "int32", bias, list(ws * x[2]), [0] * classes)
            logits = self._act("logits", (1, classes), self._out_scale(x, ws, cin) * 2, 0)
            self.ops.append(OpSpec("FULLY_CONNECTED", [x[0], wt, bt], [logits[0]],
                                   "FullyConnectedOptions", {"FusedActivationFunction": 0}))
        self.logits = logits
        self.x = self._act("probs", (1, classes), 1 / 256, -128)
        self.ops.append(OpSpec("SOFTMAX", [logits[0]], [self.x[0]], "SoftmaxOptions",
                               {"Beta": 1.0}))
        self.output = self.x[0]
        return self

    def bytes(self, outputs=None):
        return build_tflite(self.tensors, self.ops, [self.input], outputs or [self.output])

    def save(self, path):
        path.write_bytes(self.bytes())
        return path

    def probe(self):
        """LiteRT on this model with every op output exposed (XNNPACK writes graph outputs)."""
        from ai_edge_litert.interpreter import Interpreter
        outs = sorted({t for op in self.ops for t in op.outputs})
        it = Interpreter(model_content=self.bytes(outs), num_threads=1)
        it.allocate_tensors()
        return it


def mobilenet_like(seed=0, ternary=False, bias_multiple=1):
    """Stem, depthwise, expand/project pointwise with a residual add, pool, classifier."""
    net = Net(seed)
    net.conv(8, k=3, stride=2, act="relu6")                       # stem, TF SAME, 16 -> 8
    net.depthwise(k=3, act="relu6")
    block_in = net.conv(12, ternary=ternary, bias_multiple=bias_multiple)       # project
    net.conv(24, act="relu6", ternary=ternary, bias_multiple=bias_multiple)     # expand
    net.depthwise(k=5, act="relu6")
    proj = net.conv(12, ternary=ternary, bias_multiple=bias_multiple)
    net.add(block_in, proj)
    net.mean()
    return net.classifier(10)


def images(net, n=4, seed=1):
    size = net.tensors[net.input].shape[1]
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def compare_layers(net, path, report, x):
    """Per node: (values, equal to LiteRT, max |diff|); the classifier's max |logit diff| in
    units of LiteRT's logit step."""
    mf = read_model(path)
    it = net.probe()
    inp = it.get_input_details()[0]["index"]
    stats = {"values": 0, "equal": 0, "max_diff": 0, "logit_steps": 0.0}
    for img in x:
        it.set_tensor(inp, img[None])
        it.invoke()
        seen = {"input": img[None]}
        for node in mf.graph:
            got = run_node(mf, node, [seen[s] for s in node.inputs])
            want = it.get_tensor(report.source_tensors[node.name])
            if node.op == "linear":
                tid = report.source_tensors[node.name]
                scale, zp = it.get_tensor_details()[tid]["quantization"]
                want = want.reshape(-1)[-got.shape[1]:]        # background dropped, if any
                inside = (want > -128) & (want < 127)           # LiteRT clamps to its int8 range
                lit = (want.astype(np.float64) - zp) * scale
                steps = np.abs(got[0] - lit)[inside] / scale
                stats["logit_steps"] = max(stats["logit_steps"], float(np.max(steps, initial=0)))
                continue
            want = (want.astype(np.int16) + 128).astype(np.uint8).reshape(got.shape)
            d = np.abs(got.astype(np.int16) - want)
            stats["values"] += d.size
            stats["equal"] += int(np.sum(d == 0))
            stats["max_diff"] = max(stats["max_diff"], int(d.max()))
            seen[node.name] = want
    return stats


def assert_matches_litert(net, path, report, x):
    s = compare_layers(net, path, report, x)
    assert s["max_diff"] <= 1, s
    assert s["equal"] >= AGREEMENT * s["values"], s
    # LiteRT rounds its int8 logits to its step: half a step, plus float32 evaluation slack
    assert s["logit_steps"] <= 0.5 + 1e-3, s


# ---------------------------------------------------------------------------- conversion

def test_mobilenet_like_graph_and_litert(tmp_path):
    net = mobilenet_like()
    out = tmp_path / "m.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), out)
    mf = read_model(out)
    assert mf.requant == "ternet" and "ternet.requant" not in mf.metadata   # TFLite: ternet's rule
    assert [n.op for n in mf.graph] == ["conv2d", "depthwise", "pointwise", "pointwise",
                                        "depthwise", "pointwise", "add", "global_avg_pool",
                                        "linear"]
    assert [n.attrs.get("activation") for n in mf.graph[:7]] == \
        ["relu6", "relu6", "none", "relu6", "relu6", "none", "none"]
    assert all(n.attrs["weight"] == "int8" for n in mf.graph if n.op == "pointwise")
    assert mf.input["zero_point"] == 127 and mf.input["scale"] == pytest.approx(1 / 127.5)
    # int8 -> uint8: every zero point moves by exactly 128, scales and integers unchanged
    src = {t.name: t for t in net.tensors}
    stem = mf.graph[0]
    assert mf.tensor(stem, "output_zero_point")[0] == src["op1/y"].zero_points[0] + 128
    assert np.array_equal(mf.tensor(stem, "weight"), src["op1/w"].data)
    assert np.array_equal(mf.tensor(stem, "bias"), src["op1/b"].data)
    assert mf.labels == tuple(f"class_{i}" for i in range(10))
    assert report.ternary_layers == [] and not report.background_dropped
    pytest.importorskip("ai_edge_litert")
    assert_matches_litert(net, out, report, images(net))


def test_fast_path_is_bit_exact_with_reference(tmp_path):
    net = mobilenet_like(seed=3)
    out = tmp_path / "m.safetensors"
    convert(net.save(tmp_path / "m.tflite"), out)
    x = images(net, n=3)
    fast = ternet.load(out, threads=1).predict(x)
    assert np.array_equal(fast, ternet.load(out, kernels="reference").predict(x))


def test_ternary_valued_pointwise_is_packed_and_reported(tmp_path):
    net = mobilenet_like(seed=5, ternary=True)            # biases multiples of each row's q
    tern, ints = tmp_path / "t.safetensors", tmp_path / "i.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), tern)
    convert(tmp_path / "m.tflite", ints, ternary=False)
    pw = [n for n in read_model(tern).graph if n.op == "pointwise"]
    assert [n.attrs["weight"] for n in pw] == ["ternary"] * 3
    assert report.ternary_layers == [n.name for n in pw]
    assert any("packed ternary" in line for line in report.lines())
    assert not any("rounded" in line for line in report.notes)
    assert all(n.attrs["weight"] == "int8" for n in read_model(ints).graph if n.op == "pointwise")
    # same integers: only float32 rounding of the multiplier (s_w * q vs s_w) can move a value
    x = images(net)
    a, b = read_model(tern), read_model(ints)
    for na, nb in zip(a.graph, b.graph):
        if na.op == "pointwise":
            src = np.random.default_rng(0).integers(0, 256, (2, 8, 8, na.attrs["cin"]),
                                                    dtype=np.uint8)
            d = np.abs(run_node(a, na, [src]).astype(int) - run_node(b, nb, [src]).astype(int))
            assert d.max() <= 1 and np.mean(d == 0) >= AGREEMENT
    pytest.importorskip("ai_edge_litert")
    assert_matches_litert(net, tern, report, x)


def test_ternary_bias_rounding_is_reported(tmp_path):
    net = mobilenet_like(seed=6, ternary=True, bias_multiple=1)
    for op in net.ops:                                   # biases no longer multiples of q
        if op.opcode == "CONV_2D":
            b = net.tensors[op.inputs[2]]
            b.data = (b.data + 1).astype(np.int32)
    report = convert(net.save(tmp_path / "m.tflite"), tmp_path / "t.safetensors")
    assert report.ternary_layers
    assert any("rounded" in line for line in report.notes)


@pytest.mark.parametrize("pads, stride, expected", [
    ((1, 1, 1, 1), 1, "same"),          # stride 1: TF SAME and symmetric coincide
    ((1, 1, 1, 1), 2, "symmetric"),     # PyTorch style on an even input
    ((0, 1, 0, 1), 2, "same"),          # TF SAME: the extra row / column after
])
def test_pad_then_valid_conv_gives_both_padding_conventions(tmp_path, pads, stride, expected):
    net = Net(seed=7)
    net.pad(*pads)
    net.conv(8, k=3, stride=stride, padding=VALID, act="relu")
    net.pad(*pads)
    net.depthwise(k=3, stride=stride, padding=VALID)
    net.mean()
    net.classifier(5)
    out = tmp_path / "m.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), out)
    assert [n.attrs["padding"] for n in read_model(out).graph[:2]] == [expected, expected]
    pytest.importorskip("ai_edge_litert")
    assert_matches_litert(net, out, report, images(net))


def test_standalone_relu_per_tensor_weights_and_conv_classifier(tmp_path):
    net = Net(seed=8)
    net.conv(8, k=3, stride=2)
    net.unary("RELU6")                                    # a pure clamp: folded into the conv
    net.conv(16, per_tensor=True)
    net.unary("RELU")
    net.mean()
    net.classifier(7, as_conv=True)                       # 1x1 CONV_2D + RESHAPE classifier
    out = tmp_path / "m.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), out)
    g = read_model(out).graph
    assert [(n.op, n.attrs.get("activation")) for n in g] == [
        ("conv2d", "relu6"), ("pointwise", "relu"), ("global_avg_pool", None), ("linear", None)]
    assert np.unique(read_model(out).tensor(g[1], "weight_scale")).size == 1
    pytest.importorskip("ai_edge_litert")
    assert_matches_litert(net, out, report, images(net))


def test_background_class_dropped_with_labels(tmp_path):
    net = Net(seed=9)
    net.conv(8, k=3, stride=2, act="relu6")
    net.mean()
    net.classifier(1001)
    labels = tmp_path / "labels.txt"
    labels.write_text("background\n" + "".join(f"thing {i}\n" for i in range(1000)))
    out = tmp_path / "m.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), out, labels=labels)
    mf = read_model(out)
    assert report.background_dropped and mf.labels[0] == "thing 0" and len(mf.labels) == 1000
    w = net.tensors[net.ops[-2].inputs[1]].data
    assert np.array_equal(mf.tensor(mf.graph[-1], "weight"), w[1:])
    pytest.importorskip("ai_edge_litert")
    assert_matches_litert(net, out, report, images(net))


def test_a_real_1001_class_model_keeps_its_first_class(tmp_path):
    net = Net(seed=10)
    net.conv(8, k=3, stride=2)
    net.mean()
    net.classifier(1001)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(1001)))
    report = convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors", labels=labels)
    assert not report.background_dropped
    assert read_model(tmp_path / "m.safetensors").labels[0] == "thing 0"


def dead_filter_net(act, seed=22):
    """Stem conv whose channel 2 has a bias at the int32 limit (a quantizer's dead filter)."""
    net = Net(seed=seed)
    net.conv(8, k=3, stride=2, act=act)
    b = net.tensors[net.ops[-1].inputs[2]]
    b.data = b.data.copy()
    b.data[2] = -(2**31) + 1000
    net.mean()
    return net.classifier(3)


def test_dead_filter_at_a_clamp_is_zeroed_and_reported(tmp_path):
    net = dead_filter_net("relu6")        # its output is 0 for every input, with or without weights
    out = tmp_path / "m.safetensors"
    report = convert(net.save(tmp_path / "m.tflite"), out)
    assert any("1 numerically dead filter(s)" in line for line in report.notes)
    mf = read_model(out)
    w = mf.tensor(mf.graph[0], "weight")
    assert not w[2].any() and np.array_equal(np.delete(w, 2, 0),
                                             np.delete(net.tensors[net.ops[1].inputs[1]].data, 2, 0))
    # the exact output: the clamp's lower bound. (LiteRT is no reference here: its int32
    # accumulator wraps around for this channel.)
    y = run_node(mf, mf.graph[0], [images(net)])
    assert np.all(y[..., 2] == mf.tensor(mf.graph[0], "output_zero_point")[0])


def test_accumulator_overflow_of_a_live_channel_is_refused(tmp_path):
    net = dead_filter_net("none")
    stem = net.ops[1]
    s_w = net.tensors[stem.inputs[1]].scales[2]
    # an output scale at which the bias lands mid-range: the weights then move the output
    net.tensors[stem.outputs[0]].scales = [float(np.float32(1 / 127.5) * s_w * 2**31 / 100)]
    with pytest.raises(ConversionError, match=r"op #1 CONV_2D .*output channel 2: bias -2147482648 "
                                              r"and its weights can overflow"):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors")


def test_default_preprocessing_feeds_raw_pixels(tmp_path):
    net = Net(seed=11, size=16)
    net.conv(4, k=3, stride=2)
    net.mean()
    net.classifier(3)
    out = tmp_path / "m.safetensors"
    convert(net.save(tmp_path / "m.tflite"), out, preprocess=["resize=16"])
    m = ternet.load(out, kernels="reference")
    assert (m.file.preprocess["resize"], m.file.preprocess["crop"]) == (16, 16)
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    img[0, :, 0] = np.arange(16) * 17                     # include 0 and 255
    assert np.array_equal(m.preprocess(img), img)


def test_float_input_needs_its_normalisation(tmp_path):
    net = Net(seed=12, input_dtype="float32")
    net.conv(4, k=3, stride=2)
    net.mean()
    net.classifier(3)
    src = net.save(tmp_path / "m.tflite")
    with pytest.raises(ConversionError, match=r"float input.*--preprocess mean=R,G,B std=R,G,B"):
        convert(src, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    convert(src, tmp_path / "m.safetensors", preprocess={"mean": "0.5", "std": "0.5,0.5,0.5"})
    mf = read_model(tmp_path / "m.safetensors")
    assert mf.preprocess["mean"] == [0.5] * 3 and mf.input["zero_point"] == 127
    assert run_reference(mf, images(net, 1)).shape == (1, 3)


# ---------------------------------------------------------------------------- refusals

def test_unsupported_op_is_named(tmp_path):
    net = Net(seed=13)
    net.conv(8, k=3, stride=2)
    net.unary("LOGISTIC", out_q=(1 / 256, -128))
    net.mean()
    net.classifier(3)
    with pytest.raises(ConversionError, match=r"op #2 LOGISTIC \('op2/logistic'\): op LOGISTIC is "
                                              r"not supported by ternet"):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == [tmp_path / "m.tflite"]


@pytest.mark.parametrize("build, message", [
    (lambda n: (n.pad(2, 2, 2, 2), n.conv(8, k=3, padding=VALID)),
     r"pads \(top, bottom, left, right\) = \(2, 2, 2, 2\) match neither"),
    (lambda n: n.conv(8, k=3, padding=VALID), r"VALID padding of a 3x3 convolution"),
    (lambda n: n.conv(8, k=3, stride=3), r"strides 3x3"),
    (lambda n: n.conv(8, k=4, stride=2), r"kernel 4x4"),
])
def test_unsupported_geometry_is_named(tmp_path, build, message):
    net = Net(seed=14)
    build(net)
    net.mean()
    net.classifier(3)
    with pytest.raises(ConversionError, match=r"op #\d+ (CONV_2D|PAD) .*" + message):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_requantizing_relu_is_refused(tmp_path):
    net = Net(seed=21)
    net.conv(8, k=3, stride=2)
    net.unary("RELU", out_q=(net.x[2] * 2, -128))
    net.mean()
    net.classifier(3)
    with pytest.raises(ConversionError, match=r"op #2 RELU .*a RELU that also requantizes \(scale "
                                              r"[0-9.e-]+ -> [0-9.e-]+\) is not supported"):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors")


def test_float_weights_are_refused(tmp_path):
    net = Net(seed=15)
    net.conv(8, k=3, stride=2)
    w = net.tensors[net.ops[-1].inputs[1]]
    w.dtype, w.data, w.scales, w.zero_points = "float32", w.data.astype(np.float32), None, None
    net.mean()
    net.classifier(3)
    with pytest.raises(ConversionError, match=r"weights 'op1/w': float32; ternet converts "
                                              r"int8-quantized weights only"):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors")


def test_labels_count_mismatch(tmp_path):
    net = Net(seed=16)
    net.conv(8, k=3, stride=2)
    net.mean()
    net.classifier(3)
    labels = tmp_path / "l.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ConversionError,
                       match=r"l\.txt: 2 labels, but the classifier has 3 outputs"):
        convert(net.save(tmp_path / "m.tflite"), tmp_path / "m.safetensors", labels=labels)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ternet", "convert", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_converts_and_reports(tmp_path):
    src = mobilenet_like(seed=17, ternary=True).save(tmp_path / "m.tflite")
    r = run_cli(src, "-o", tmp_path / "m.safetensors", "--arch", "tiny_mnv2")
    assert r.returncode == 0, r.stderr
    assert "3 pointwise layer(s) written as packed ternary" in r.stdout
    mf = read_model(tmp_path / "m.safetensors")
    assert mf.arch == "tiny_mnv2"
    assert mf.provenance["command"].startswith("ternet convert ")
    assert mf.provenance["source_format"] == "tflite" and len(mf.provenance["source_sha256"]) == 64


def test_cli_unsupported_op_is_one_line_and_writes_nothing(tmp_path):
    net = Net(seed=18)
    net.conv(8, k=3, stride=2)
    net.unary("TANH", out_q=(1 / 128, 0))
    net.mean()
    net.classifier(3)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous file")
    r = run_cli(net.save(tmp_path / "m.tflite"), "-o", out)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "op #2 TANH" in r.stderr and "not supported by ternet" in r.stderr
    assert out.read_bytes() == b"previous file"                    # kept, not half-overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.tflite"]


@pytest.mark.parametrize("content, message", [
    (lambda raw: raw[:300], r"m\.tflite: corrupt TFLite flatbuffer"),
    (lambda raw: b"\x89PNG\r\n\x1a\n" + raw[8:], r"m\.tflite: not a TFLite flatbuffer"),
])
def test_cli_malformed_file_is_one_line_and_writes_nothing(tmp_path, content, message):
    raw = mobilenet_like(seed=19).bytes()
    (tmp_path / "m.tflite").write_bytes(content(raw))
    r = run_cli(tmp_path / "m.tflite", "-o", tmp_path / "m.safetensors")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_bad_preprocess_and_missing_output_dir(tmp_path):
    src = mobilenet_like(seed=20).save(tmp_path / "m.tflite")
    r = run_cli(src, "-o", tmp_path / "m.safetensors", "--preprocess", "resize=big")
    assert r.returncode == 1 and "--preprocess resize: expected a positive integer" in r.stderr
    r = run_cli(src, "-o", tmp_path / "nope" / "m.safetensors")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
