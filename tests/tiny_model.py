"""A tiny random model with every op, written with ternet.format.write_model.

Scales are chosen so requantized activations spread over the uint8 range instead of
saturating (otherwise an end-to-end test would pass trivially). Deterministic for a seed.
"""
from __future__ import annotations

import numpy as np

from ternet import quant
from ternet.format import pack_ternary, write_model

SPREAD = 60.0   # typical |x - zx| of an activation, in quantized units


class _Builder:
    def __init__(self, rng, h, w):
        self.rng = rng
        self.graph, self.tensors = [], {}
        self.qp = {"input": (0.0187, 114)}
        self.shape = {"input": (h, w, 3)}

    def _out(self, name, fan_in, s_in, s_w, act):
        # pick s_out so acc*mult has a spread of ~50 quantized units
        s_out = float(s_in) * float(np.median(s_w)) * np.sqrt(fan_in) * SPREAD / 50.0
        zp = int(self.rng.integers(0, 12)) if act != "none" else int(self.rng.integers(100, 156))
        self.tensors[f"{name}.output_scale"] = np.array([s_out], np.float32)
        self.tensors[f"{name}.output_zero_point"] = np.array([zp], np.int32)
        self.qp[name] = (s_out, zp)

    def _common(self, name, cout, s_in):
        s_w = (0.005 + 0.01 * self.rng.random(cout)).astype(np.float32)
        self.tensors[f"{name}.weight_scale"] = s_w
        self.tensors[f"{name}.bias"] = self.rng.integers(-3000, 3000, cout).astype(np.int32)
        return s_w

    def conv(self, name, src, cout, k, stride, padding, act):
        h, w, c = self.shape[src]
        self.tensors[f"{name}.weight"] = self.rng.integers(-127, 128, (cout, k, k, c)).astype(np.int8)
        s_w = self._common(name, cout, self.qp[src][0])
        self._out(name, k * k * c * 40, self.qp[src][0], s_w, act)
        ho = quant.conv_padding(padding, h, k, stride)[0]
        wo = quant.conv_padding(padding, w, k, stride)[0]
        self._node(name, "conv2d", [src], dict(cin=c, cout=cout, kernel=k, stride=stride,
                                               padding=padding, activation=act), (ho, wo, cout))
        return name

    def dw(self, name, src, k, stride, padding, act):
        h, w, c = self.shape[src]
        self.tensors[f"{name}.weight"] = self.rng.integers(-127, 128, (k, k, c)).astype(np.int8)
        s_w = self._common(name, c, self.qp[src][0])
        self._out(name, k * k * 40, self.qp[src][0], s_w, act)
        ho = quant.conv_padding(padding, h, k, stride)[0]
        wo = quant.conv_padding(padding, w, k, stride)[0]
        self._node(name, "depthwise", [src], dict(channels=c, kernel=k, stride=stride,
                                                  padding=padding, activation=act), (ho, wo, c))
        return name

    def pw(self, name, src, cout, weight, act):
        h, w, c = self.shape[src]
        t = self.rng.choice(np.array([-1, 0, 1], np.int8), size=(cout, c), p=[0.3, 0.4, 0.3])
        if weight == "int8":
            self.tensors[f"{name}.weight"] = self.rng.integers(-127, 128, (cout, c)).astype(np.int8)
            fan = c * 40
        else:
            fan = c * 0.6 * 40 * 40
            if weight == "hybrid":
                idx = np.sort(self.rng.choice(cout, size=max(1, cout // 4), replace=False)).astype(np.int32)
                t[idx] = 0
                self.tensors[f"{name}.int8_channels"] = idx
                self.tensors[f"{name}.weight_int8"] = self.rng.integers(-20, 21, (len(idx), c)).astype(np.int8)
            self.tensors[f"{name}.weight"] = pack_ternary(t)
        s_w = self._common(name, cout, self.qp[src][0])
        if weight != "int8":
            s_w *= 40.0                       # a ternary scale is ~ the mean |w| of its channel
            self.tensors[f"{name}.weight_scale"] = s_w
        self._out(name, fan, self.qp[src][0], s_w, act)
        self._node(name, "pointwise", [src], dict(cin=c, cout=cout, weight=weight, activation=act),
                   (h, w, cout))
        return name

    def add(self, name, a, b):
        s = max(self.qp[a][0], self.qp[b][0]) * 1.5
        self.tensors[f"{name}.output_scale"] = np.array([s], np.float32)
        self.tensors[f"{name}.output_zero_point"] = np.array([128], np.int32)
        self.qp[name] = (s, 128)
        self._node(name, "add", [a, b], dict(activation="none"), self.shape[a])
        return name

    def gap(self, name, src):
        h, w, c = self.shape[src]
        s, z = self.qp[src]
        self.tensors[f"{name}.output_scale"] = np.array([s * 0.5], np.float32)
        self.tensors[f"{name}.output_zero_point"] = np.array([z], np.int32)
        self.qp[name] = (s * 0.5, z)
        self._node(name, "global_avg_pool", [src], {}, (1, 1, c))
        return name

    def linear(self, name, src, cout):
        c = self.shape[src][2]
        self.tensors[f"{name}.weight"] = self.rng.integers(-127, 128, (cout, c)).astype(np.int8)
        self._common(name, cout, self.qp[src][0])
        # logits of a few units: acc ~ sqrt(c) * SPREAD * 73 (mean |w| of uniform int8)
        s_w = 5.0 / (np.sqrt(c) * SPREAD * 73 * self.qp[src][0]) * (0.5 + self.rng.random(cout))
        self.tensors[f"{name}.weight_scale"] = s_w.astype(np.float32)
        self._node(name, "linear", [src], dict(cin=c, cout=cout), (1, 1, cout))
        return name

    def _node(self, name, op, inputs, attrs, shape):
        self.graph.append(dict(name=name, op=op, inputs=inputs, attrs=attrs))
        self.shape[name] = shape


def tiny_graph(seed: int = 0, size: int = 33, classes: int = 10, padding: str = "same"):
    """(graph, tensors, input_spec, preprocess) of a small inverted-residual network."""
    b = _Builder(np.random.default_rng(seed), size, size)
    x = b.conv("stem", "input", 20, 3, 2, padding, "relu6")
    x = b.dw("b0.dw", x, 3, 1, padding, "relu6")                      # block without expansion
    x = b.pw("b0.project", x, 12, "ternary", "none")
    y = b.pw("b1.expand", x, 36, "ternary", "relu6")                  # expansion + skip
    y = b.dw("b1.dw", y, 5, 1, padding, "relu6")
    y = b.pw("b1.project", y, 12, "hybrid", "none")
    x = b.add("b1.add", x, y)
    y = b.pw("b2.expand", x, 40, "int8", "relu6")                     # stride 2, no skip
    y = b.dw("b2.dw", y, 3, 2, padding, "relu6")
    x = b.pw("b2.project", y, 18, "ternary", "none")
    x = b.pw("head", x, 50, "ternary", "relu6")
    x = b.gap("pool", x)
    b.linear("fc", x, classes)
    return (b.graph, b.tensors) + specs(b, size)


def specs(b: _Builder, size: int):
    """(input_spec, preprocess) of a builder's graph on size x size images."""
    input_spec = dict(height=size, width=size, channels=3, layout="NHWC", dtype="uint8",
                      scale=b.qp["input"][0], zero_point=b.qp["input"][1])
    pre = dict(resize=size + 4, crop=size, interpolation="bilinear", mean=[0.485, 0.456, 0.406],
               std=[0.229, 0.224, 0.225], colour="RGB")
    return input_spec, pre


def builder(size: int, seed: int = 0) -> _Builder:
    """An empty graph on size x size images, to build a small special-purpose model with."""
    return _Builder(np.random.default_rng(seed), size, size)


def make_tiny_model(path, seed: int = 0, size: int = 33, classes: int = 10, padding: str = "same"):
    graph, tensors, input_spec, pre = tiny_graph(seed, size, classes, padding)
    write_model(path, arch="tiny_test_net", graph=graph, tensors=tensors, input_spec=input_spec,
                preprocess=pre, labels=[f"class_{i}" for i in range(classes)],
                provenance={"producer": "tests/tiny_model.py", "seed": seed})
    return path
