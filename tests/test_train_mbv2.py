"""ternet.train's MobileNetV2 from an int8 TFLite file (tflite_weights.py): a tiny MobileNetV2 is
written as an int8 TFLite graph here, read back through the mapping and compared with a float
reference of that graph; TF 'SAME' padding; refusals; and, when present, the real file."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tflite")
pytest.importorskip("flatbuffers")

import torch.nn.functional as F  # noqa: E402

from ternet.train.fakequant import QuantGraph, int8_weight  # noqa: E402
from ternet.train.files import InputFileError  # noqa: E402
from ternet.train.fold import fold_model  # noqa: E402
from ternet.train.models import MBV2_INPUT, MobileNetV2, pad_input  # noqa: E402
from ternet.train.tflite_weights import mobilenet_v2_from_tflite  # noqa: E402
from ternet.quant import conv_padding  # noqa: E402
from tflite_build import OpSpec, TensorSpec, build_tflite  # noqa: E402

TINY = dict(num_classes=5, width=0.25, blocks=[(1, 8, 1, 1), (6, 8, 2, 2)], last=16)
SAME, ACT = 0, {"none": 0, "relu6": 3}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = SHARED / "models" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"


def tf_same(x, k, stride):
    """Zero padding by TensorFlow's SAME rule, written from its definition: output ceil(n / s),
    total padding max((out - 1) s + k - n, 0), the smaller half before."""
    pads = []
    for n in (x.shape[3], x.shape[2]):                  # F.pad order: width, then height
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_same_padding_matches_tensorflow_rule(size, k, stride):
    gen = torch.Generator().manual_seed(size * 10 + k + stride)
    x = torch.randn(1, 4, size, size, generator=gen)
    w = torch.randn(4, 1, k, k, generator=gen)
    want = F.conv2d(tf_same(x, k, stride), w, stride=stride, groups=4)
    got = F.conv2d(pad_input(x, "same", k, stride), w, stride=stride, groups=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if stride == 1:                                      # torch's own 'same' (stride 1 only)
        torch.testing.assert_close(got, F.conv2d(x, w, padding="same", groups=4), rtol=0, atol=0)


class TinyFile:
    """A random tiny MobileNetV2, BN-folded and quantized per channel to int8, written as a TFLite
    graph in execution order (like Google's file: SAME convolutions with fused ReLU6, ADD, MEAN,
    a 1x1-conv classifier with a background class first). `layers` keeps each weighted layer's
    int8 weights, scales and int32 bias as written; `ops` the graph in float for the reference."""

    def __init__(self, seed=0, classes_in_file=None, **arch):
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        spec = dict(TINY, **arch)
        net = MobileNetV2(padding="same", **spec).eval()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
        self.classes = classes_in_file or spec["num_classes"] + 1
        self.tensors, self.ops, self.layers, self.float_ops = [], [], {}, []
        size = 16
        self.input = self._tensor("image", (1, size, size, 3), "uint8", scales=[MBV2_INPUT[0]],
                                  zero_points=[MBV2_INPUT[1]])
        act = {"input": (self.input, size, MBV2_INPUT[0])}       # node -> (tensor, size, scale)
        for n in fold_model(net):
            act[n.name] = self._node(n, act)
        self.output = act["fc"][0]

    def _tensor(self, name, shape, dtype, data=None, scales=None, zero_points=None, qdim=0):
        self.tensors.append(TensorSpec(name, tuple(shape), dtype, data, scales, zero_points, qdim))
        return len(self.tensors) - 1

    def _act(self, name, size, c):
        scale = float(np.float32(self.rng.uniform(0.02, 0.1)))        # as the file stores it
        return self._tensor(name, (1, size, size, c), "int8", scales=[scale], zero_points=[0]), scale

    def _node(self, n, act):
        x, size, s_in = act[n.inputs[0]]
        a = n.attrs
        if n.op == "add":
            y, s = self._act(n.name, size, a.get("channels", self.tensors[x].shape[3]))
            self.ops.append(OpSpec("ADD", [x, act[n.inputs[1]][0]], [y], "AddOptions",
                                   {"FusedActivationFunction": 0}))
            self.float_ops.append(("add", n.inputs, n.name))
            return y, size, s
        if n.op == "global_avg_pool":
            axes = self._tensor(n.name + "/axes", (2,), "int32", np.array([1, 2], np.int32))
            y, s = self._act(n.name, 1, self.tensors[x].shape[3])
            self.ops.append(OpSpec("MEAN", [x, axes], [y], "ReducerOptions", {"KeepDims": True}))
            self.float_ops.append(("mean", n.inputs, n.name))
            return y, 1, s
        w, b = n.weight, n.bias
        if n.op == "linear":            # 1x1 conv classifier, background row first
            w = torch.cat([torch.randn(self.classes - len(w), w.shape[1]), w])[:, :, None, None]
            b = torch.cat([torch.randn(self.classes - len(b)), b])
        q, s_w = int8_weight(w)
        bias = np.round(b.double().numpy() / (s_in * s_w.double().numpy())).astype(np.int32)
        k, stride = w.shape[-1], a.get("stride", 1)
        out = conv_padding("same", size, k, stride)[0]
        y, s = self._act(n.name, out, len(w))
        depthwise = n.op == "depthwise"
        tq = q.permute(1, 2, 3, 0) if depthwise else q.permute(0, 2, 3, 1)     # TFLite layouts
        wt = self._tensor(n.name + "/w", tq.shape, "int8", tq.numpy().astype(np.int8),
                          s_w.tolist(), [0] * len(w), 3 if depthwise else 0)
        bt = self._tensor(n.name + "/b", bias.shape, "int32", bias)
        options = {"Padding": SAME, "StrideW": stride, "StrideH": stride,
                   "FusedActivationFunction": ACT[a.get("activation", "none")]}
        if depthwise:
            options["DepthMultiplier"] = 1
        self.ops.append(OpSpec("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x, wt, bt], [y],
                               "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions", options))
        self.layers[n.name] = (q, s_w, bias, s_in)
        groups = len(w) if depthwise else 1
        self.float_ops.append(("conv", n.inputs, n.name, q * s_w.double().view(-1, 1, 1, 1),
                               torch.from_numpy(bias * s_in * s_w.double().numpy()), stride, groups,
                               a.get("activation", "none")))
        return y, out, s

    def save(self, path):
        path.write_bytes(build_tflite(self.tensors, self.ops, [self.input], [self.output]))
        return path

    def reference(self, x):
        """The file's graph in float64 (dequantized weights, TF SAME padding), background dropped."""
        vals = {"input": x.double()}
        for op in self.float_ops:
            kind, inputs, name = op[:3]
            if kind == "add":
                vals[name] = vals[inputs[0]] + vals[inputs[1]]
            elif kind == "mean":
                vals[name] = vals[inputs[0]].mean((2, 3), keepdim=True)
            else:
                w, b, stride, groups, act = op[3:]
                y = F.conv2d(tf_same(vals[inputs[0]], w.shape[-1], stride), w, b, stride, groups=groups)
                vals[name] = y.clamp(0, 6) if act == "relu6" else y
        return vals["fc"].flatten(1)[:, 1:]


@pytest.fixture
def tiny(tmp_path):
    f = TinyFile()
    return f, f.save(tmp_path / "tiny.tflite")


def test_tiny_file_gives_the_dequantized_network(tiny):
    f, path = tiny
    model = mobilenet_v2_from_tflite(path, **TINY).eval()
    q, s_w, _, _ = f.layers["stem"]
    torch.testing.assert_close(model.features[0][0].weight, (q * s_w.double().view(-1, 1, 1, 1)).float(),
                               rtol=0, atol=0)
    q, s_w, bias, s_in = f.layers["fc"]
    want_w = q[1:, :, 0, 0] * s_w[1:, None].double()                 # background row dropped
    want_b = torch.from_numpy(bias[1:] * s_in * s_w[1:].double().numpy())
    torch.testing.assert_close(model.classifier[1].weight, want_w.float(), rtol=0, atol=0)
    torch.testing.assert_close(model.classifier[1].bias, want_b.float(), rtol=0, atol=0)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), f.reference(x), rtol=1e-5, atol=1e-5)


def test_folded_graph_is_the_same_network(tiny):
    """BN only carries the bias (identity, eps 0): folding returns the file's weights and biases
    unchanged, so the teacher graph of PTQ / QAT computes the model's logits (up to the order of
    float32 additions)."""
    _, path = tiny
    model = mobilenet_v2_from_tflite(path, **TINY).eval()
    folded = fold_model(model)
    for (name, op, _, _, mod, bn), node in zip(model.graph_spec(), folded):
        if bn is not None:
            torch.testing.assert_close(node.weight, mod.weight, rtol=0, atol=0)
            torch.testing.assert_close(node.bias, bn.bias, rtol=0, atol=0)
    g = QuantGraph(folded, *MBV2_INPUT)
    g.mode = "float"
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x))


@pytest.mark.parametrize("arch, problem", [
    ({"last": 24}, r"op #\d+ CONV_2D \(for head\): weights \[16, 8, 1, 1\].*needs \[24, 8, 1, 1\]"),
    ({"blocks": [(1, 8, 1, 1), (6, 8, 1, 2)]},
     r"11 convolution / fully connected ops, but MobileNetV2 has 8 weighted layers"),
    ({"classes_in_file": 5}, r"\(classifier\): weights \[5, 16\].*expected \[6, 16\]"),
])
def test_unexpected_layers_are_refused_in_one_line(tmp_path, arch, problem):
    in_file = {k: v for k, v in arch.items() if k == "classes_in_file"}
    path = TinyFile(**in_file).save(tmp_path / "odd.tflite")
    with pytest.raises(InputFileError, match=problem) as e:
        mobilenet_v2_from_tflite(path, **dict(TINY, **{k: v for k, v in arch.items() if k not in in_file}))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_cli_names_a_wrong_or_missing_tflite(tiny, tmp_path):
    from ternet.train.__main__ import main
    from ternet.train import models
    _, path = tiny
    for given, problem in ((path, "convolution / fully connected ops"),
                           (tmp_path / "nope.tflite", "no such file")):
        models._mbv2_tflite = None
        with pytest.raises(SystemExit) as e:
            main(["--arch", "mobilenet_v2", "--tflite", str(given), "ptq", "--out", str(tmp_path / "o")])
        msg = e.value.code
        assert isinstance(msg, str) and str(given) in msg and problem in msg and "\n" not in msg
    models._mbv2_tflite = None
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.skipif(not REAL.is_file(), reason="the MobileNetV2 .tflite is not in ../shared")
def test_real_file_picks_the_int8_models_classes():
    """Google's MobileNetV2: on a few dev images the float model picks the class of the same file
    converted to ternet int8 (weights/mobilenet_v2_int8.safetensors, which agrees with LiteRT on
    all 200 dev images; the float model does too, benchmarks/mbv2_float_agreement.py)."""
    import ternet
    images = sorted((SHARED / "imagenet-sample-dev").glob("*.JPEG"))[::25]
    if not images:
        pytest.skip("no dev images in ../shared")
    int8 = ternet.load(str(Path(__file__).resolve().parents[1] / "weights" / "mobilenet_v2_int8.safetensors"))
    x = np.stack([int8.preprocess(str(p)) for p in images])
    from ternet.preprocess import preprocess
    from ternet.train.models import preprocess_of
    ours_in = np.stack([preprocess(str(p), preprocess_of("mobilenet_v2"), int8.file.input) for p in images])
    np.testing.assert_array_equal(ours_in, x)           # the same raw-pixel input as the int8 file
    model = mobilenet_v2_from_tflite(REAL).eval()
    with torch.no_grad():
        ours = model((torch.from_numpy(x).permute(0, 3, 1, 2).float() - MBV2_INPUT[1]) * MBV2_INPUT[0])
    assert ours.shape == (len(images), 1000)
    np.testing.assert_array_equal(ours.argmax(1).numpy(), int8.predict(x).argmax(1))
