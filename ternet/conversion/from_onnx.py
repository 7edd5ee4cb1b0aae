"""ONNX QDQ (QuantizeLinear / DequantizeLinear around float ops) -> ternet graph.

The form onnxruntime's `quantize_static(quant_format=QDQ)` writes, and ternet's own QDQ export
(`benchmarks/peer_models.py`): every activation is a QuantizeLinear output (uint8 or int8, per
tensor) read through a DequantizeLinear; weights and biases are integer initializers read
through a DequantizeLinear. A compute node (Conv, Add, GlobalAveragePool / ReduceMean over H
and W, Gemm) on dequantized inputs, optionally followed by Relu / Clip, and then a
QuantizeLinear, becomes one ternet node whose output quantization is that QuantizeLinear's.

Supported: Conv (group 1 = conv2d or 1x1 pointwise, group = channels = depthwise; square odd
kernels <= 7, stride 1 or 2, `pads` or `auto_pad` giving TensorFlow SAME or symmetric
padding), Add (same shapes), GlobalAveragePool, ReduceMean over axes 2 and 3, Relu and Clip that
are ReLU / ReLU6 at the output quantization, Flatten / Reshape / Squeeze of a pooled tensor,
Gemm as the classifier, then only Q/DQ, Softmax, Flatten, Reshape, Identity. Input: float32
NCHW through a QuantizeLinear, or uint8 NHWC (through a Transpose to NCHW). Anything else is a
`ConversionError` naming the node and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import (ConversionError, GraphBuilder, Value, int8_to_uint8_zero_point,
                     padding_of_pads)

MAX_KERNEL = 7
TAIL_OPS = ("QuantizeLinear", "DequantizeLinear", "Softmax", "Flatten", "Reshape", "Squeeze",
            "Identity")
VIEW_OPS = ("Flatten", "Reshape", "Squeeze", "Identity")


def _onnx_package():
    try:
        import onnx
    except ImportError:
        raise ImportError("reading .onnx files needs the 'onnx' package: "
                          "pip install 'ternet[convert]'") from None
    return onnx


def build(path, builder: GraphBuilder) -> tuple[bool, dict]:
    """Fill `builder` from the ONNX file; returns (input is 8-bit, ternet node -> ONNX tensor
    name holding the same values)."""
    onnx = _onnx_package()
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and others on a corrupt file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{path}: not a readable ONNX model ({msg})") from None
    conv = _Converter(onnx, model.graph, builder, str(path))
    conv.run()
    return conv.raw_input, conv.sources


@dataclass
class _QConst:
    """An integer initializer read through DequantizeLinear: real = scale * (q - zero_point)."""
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass
class _Pending:
    """A compute node's float result, waiting for the QuantizeLinear that gives its output."""
    emit: object                       # (out_q, activation) -> Value
    where: str
    lo: float = -np.inf                # Relu / Clip bounds seen since, in real units
    hi: float = np.inf
    clipped: bool = False


@dataclass
class _State:
    consts: dict = field(default_factory=dict)     # name -> np.ndarray
    qconsts: dict = field(default_factory=dict)    # name -> _QConst
    quant: dict = field(default_factory=dict)      # 8-bit activation name -> Value
    deq: dict = field(default_factory=dict)        # float view of an activation -> Value
    pending: dict = field(default_factory=dict)    # name -> _Pending
    raw: dict = field(default_factory=dict)        # uint8 graph input (NHWC / NCHW) -> (h, w)
    tail: set = field(default_factory=set)


class _Converter:
    def __init__(self, onnx, graph, builder: GraphBuilder, path: str):
        self.onnx, self.g, self.b, self.path = onnx, graph, builder, path
        self.s = _State()
        self.sources: dict[str, str] = {}
        self.raw_input = False
        self.input_value: Value | None = None
        self.float_input: str | None = None
        from onnx import numpy_helper
        for t in graph.initializer:
            self.s.consts[t.name] = numpy_helper.to_array(t)

    # ------------------------------------------------------------------ driver
    def run(self):
        self._graph_input()
        for i, node in enumerate(self.g.node):
            where = f"{self.path}: node #{i} {node.op_type} {node.name or node.output[0]!r}"
            self._node(node, where)
        if not self.s.tail:
            raise ConversionError(f"{self.path}: no classifier (Gemm on the pooled features) "
                                  "ends the graph")
        if len(self.g.output) != 1 or self.g.output[0].name not in self.s.tail:
            raise ConversionError(f"{self.path}: the graph must have one output, the "
                                  "classifier's logits")

    def _graph_input(self):
        inits = {t.name for t in self.g.initializer}
        inputs = [i for i in self.g.input if i.name not in inits]
        if len(inputs) != 1:
            raise ConversionError(f"{self.path}: {len(inputs)} graph inputs; ternet converts "
                                  "image classifiers with one")
        t = inputs[0]
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in t.type.tensor_type.shape.dim]
        elem = t.type.tensor_type.elem_type
        TP = self.onnx.TensorProto
        where = f"{self.path}: input {t.name!r}"
        if elem == TP.FLOAT and len(dims) == 4 and dims[1] == 3 and dims[2] and dims[3]:
            self.float_input = t.name
            self.hw = (dims[2], dims[3])
        elif elem == TP.UINT8 and len(dims) == 4 and dims[3] == 3 and dims[1] and dims[2]:
            self.s.raw[t.name] = (dims[1], dims[2])
            self.raw_nhwc = t.name
            self.raw_input = True
        else:
            raise ConversionError(f"{where}: expected float32 [N, 3, H, W] or uint8 [N, H, W, 3], "
                                  f"got {TP.DataType.Name(elem)} {dims}")

    def _node(self, node, where):
        op = node.op_type
        if op == "Constant":
            from onnx import numpy_helper
            self.s.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            return
        if node.input and node.input[0] in self.s.tail:
            if op not in TAIL_OPS:
                raise ConversionError(f"{where}: only Q/DQ, Softmax, Flatten, Reshape and "
                                      "Identity may follow the classifier")
            self.s.tail.update(node.output)
            return
        handler = getattr(self, "_op_" + op, None)
        if handler is None:
            raise ConversionError(f"{where}: op {op} is not supported by ternet")
        handler(node, where)

    # ------------------------------------------------------------------ helpers
    def _attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def _const(self, name, where, what):
        if name not in self.s.consts:
            raise ConversionError(f"{where}: {what} {name!r} must be a constant")
        return self.s.consts[name]

    def _value(self, name, where) -> Value:
        """The activation a float input of a compute node dequantizes."""
        if name in self.s.pending:
            raise ConversionError(f"{where}: reads {name!r}, a float result that is not "
                                  "quantized first (QDQ models quantize every activation)")
        v = self.s.deq.get(name)
        if v is None:
            raise ConversionError(f"{where}: input {name!r} is not a dequantized activation")
        return v

    def _qconst(self, name, where, what) -> _QConst:
        c = self.s.qconsts.get(name)
        if c is None:
            raise ConversionError(f"{where}: {what} {name!r} must be a DequantizeLinear of an "
                                  "integer initializer (a QDQ-quantized constant)")
        return c

    def _qparams(self, node, where) -> tuple[float, int, str]:
        """(scale, zero point, dtype name) of a Q/DQ node's per-tensor parameters."""
        scale = np.asarray(self._const(node.input[1], where, "scale"), np.float32)
        zp = (np.asarray(self._const(node.input[2], where, "zero point"))
              if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8))
        if scale.size != 1 or zp.size != 1:
            raise ConversionError(f"{where}: activations must be quantized per tensor")
        s = float(scale.reshape(-1)[0])
        if not (np.isfinite(s) and s > 0):
            raise ConversionError(f"{where}: scale {s} must be finite and > 0")
        return s, int(zp.reshape(-1)[0]), zp.dtype.name

    def _u8(self, node, where) -> tuple[float, int]:
        s, zp, dtype = self._qparams(node, where)
        return float(np.float32(s)), int8_to_uint8_zero_point(zp, dtype, where)

    # ------------------------------------------------------------------ Q / DQ
    def _op_QuantizeLinear(self, node, where):
        x, out = node.input[0], node.output[0]
        out_q = self._u8(node, where)
        if x == self.float_input:
            v = self.b.input(*self.hw, *out_q)
            self.input_value = v
        elif x in self.s.pending:
            p = self.s.pending.pop(x)
            v = p.emit(out_q, self._activation(p, out_q, where))
            self.sources[v.node] = out
        elif x in self.s.deq:
            v = self.s.deq[x]
            if out_q != (v.scale, v.zero_point):
                raise ConversionError(f"{where}: requantization between layers is not supported")
        else:
            raise ConversionError(f"{where}: quantizes {x!r}, which is not the graph input or a "
                                  "supported op's result")
        self.s.quant[out] = v

    def _op_DequantizeLinear(self, node, where):
        x, out = node.input[0], node.output[0]
        if x in self.s.consts:
            self.s.qconsts[out] = self._dequantized_constant(node, where)
            return
        if x in self.s.raw:
            if self.input_value is None:
                self.input_value = self.b.input(*self.s.raw[x], *self._u8(node, where))
            v = self.input_value
        elif x in self.s.quant:
            v = self.s.quant[x]
        else:
            raise ConversionError(f"{where}: dequantizes {x!r}, which is neither a constant nor "
                                  "a quantized activation")
        if self._u8(node, where) != (v.scale, v.zero_point):
            raise ConversionError(f"{where}: dequantizes {x!r} with other parameters than it "
                                  "was quantized with")
        self.s.deq[out] = v

    def _dequantized_constant(self, node, where) -> _QConst:
        q = np.asarray(self.s.consts[node.input[0]])
        if q.dtype not in (np.int8, np.uint8, np.int32):
            raise ConversionError(f"{where}: constant {node.input[0]!r} is {q.dtype}; weights "
                                  "must be 8-bit and biases int32")
        scale = np.asarray(self._const(node.input[1], where, "scale"), np.float32)
        zp = (np.asarray(self._const(node.input[2], where, "zero point"))
              if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype))
        return _QConst(q, scale, zp, int(self._attr(node, "axis", 1)))

    # ------------------------------------------------------------------ constants as ternet wants
    def _weights(self, c: _QConst, axis: int, where) -> tuple[np.ndarray, np.ndarray]:
        """Integer weights (zero point removed, must fit int8) and per-channel scales along axis."""
        n = c.q.shape[axis]
        for a, what in ((c.scale, "scales"), (c.zero_point, "zero points")):
            if a.size not in (1, n) or (a.size == n > 1 and c.axis % c.q.ndim != axis):
                raise ConversionError(f"{where}: weight {what} must be per tensor or per output "
                                      f"channel (axis {axis}), got {a.size} along axis {c.axis}")
        shape = [1] * c.q.ndim
        shape[axis] = -1
        zp = c.zero_point.astype(np.int32).reshape(shape if c.zero_point.size > 1 else ())
        w = c.q.astype(np.int32) - zp
        if w.min() < -128 or w.max() > 127:
            raise ConversionError(f"{where}: weights minus their zero point do not fit int8")
        scales = np.broadcast_to(c.scale.reshape(-1), (n,)).astype(np.float32)
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ConversionError(f"{where}: every weight scale must be finite and > 0")
        return w.astype(np.int8), scales

    def _bias(self, node, idx, where, s_in: float, s_w: np.ndarray) -> np.ndarray:
        if len(node.input) <= idx or not node.input[idx]:
            return np.zeros(s_w.size, np.int32)
        c = self._qconst(node.input[idx], where, "bias")
        if c.q.dtype != np.int32 or c.q.shape != (s_w.size,) or np.any(c.zero_point != 0):
            raise ConversionError(f"{where}: bias must be int32 [{s_w.size}] with zero point 0")
        want = np.float64(s_in) * s_w.astype(np.float64)
        got = np.broadcast_to(c.scale.astype(np.float64).reshape(-1), want.shape)
        if not np.allclose(got, want, rtol=1e-5, atol=0):
            raise ConversionError(f"{where}: bias scale is not input scale x weight scale "
                                  "(ternet's int32 accumulator unit)")
        return c.q.astype(np.int32)

    # ------------------------------------------------------------------ compute nodes
    def _op_Conv(self, node, where):
        x = self._value(node.input[0], where)
        wc = self._qconst(node.input[1], where, "weights")
        w, s_w = self._weights(wc, 0, where)
        if w.ndim != 4:
            raise ConversionError(f"{where}: only 2-D convolutions are supported")
        cout, cin_g, kh, kw = w.shape
        group = int(self._attr(node, "group", 1))
        if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL:
            raise ConversionError(f"{where}: kernel {kh}x{kw}; ternet supports square odd kernels "
                                  f"up to {MAX_KERNEL}x{MAX_KERNEL}")
        if any(d != 1 for d in self._attr(node, "dilations", [1, 1])):
            raise ConversionError(f"{where}: dilated convolutions are not supported")
        strides = list(self._attr(node, "strides", [1, 1]))
        if strides[0] != strides[1] or strides[0] not in (1, 2):
            raise ConversionError(f"{where}: strides {strides}; ternet supports 1x1 and 2x2")
        stride = strides[0]
        padding = self._padding(node, where, x, kh, stride)
        bias = self._bias(node, 2, where, x.scale, s_w)
        c = x.shape[2]
        if group == 1 and cin_g == c:
            weight = np.ascontiguousarray(w.transpose(0, 2, 3, 1))

            def emit(out_q, act):
                return self.b.conv(x, weight, bias, s_w, out_q, stride=stride, padding=padding,
                                   activation=act, where=where)
        elif group == c == cout and cin_g == 1:
            weight = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))

            def emit(out_q, act):
                return self.b.depthwise(x, weight, bias, s_w, out_q, stride=stride,
                                        padding=padding, activation=act, where=where)
        else:
            raise ConversionError(f"{where}: group {group} with {c} input and {cout} output "
                                  "channels; only plain and depthwise (multiplier 1) convolutions")
        self.s.pending[node.output[0]] = _Pending(emit, where)

    def _padding(self, node, where, x: Value, k: int, stride: int) -> str:
        auto = self._attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto == "SAME_UPPER":
            return "same"
        if auto not in ("NOTSET", "VALID"):
            raise ConversionError(f"{where}: auto_pad {auto} is not supported")
        pads = list(self._attr(node, "pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
        if k == 1 and not any(pads):
            return "same"
        top, left, bottom, right = pads
        return padding_of_pads((top, bottom, left, right), x.shape, k, stride, where)

    def _op_Add(self, node, where):
        a, b = (self._value(n, where) for n in node.input[:2])
        self.s.pending[node.output[0]] = _Pending(
            lambda out_q, act: self.b.add(a, b, out_q, activation=act, where=where), where)

    def _op_GlobalAveragePool(self, node, where):
        x = self._value(node.input[0], where)
        self.s.pending[node.output[0]] = _Pending(
            lambda out_q, act: self._pool(x, out_q, act, where), where)

    def _op_ReduceMean(self, node, where):
        axes = self._attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(node.input[1], where, "axes").tolist()
        if sorted(int(a) % 4 for a in (axes or [])) != [2, 3]:
            raise ConversionError(f"{where}: ReduceMean over axes {axes}; only the spatial mean "
                                  "(axes 2, 3) is supported")
        self._op_GlobalAveragePool(node, where)

    def _pool(self, x, out_q, act, where):
        if act != "none":
            raise ConversionError(f"{where}: an activation after the global pool is not supported")
        return self.b.global_avg_pool(x, out_q, where)

    def _op_Relu(self, node, where):
        p = self._pending_of(node, where)
        p.lo, p.clipped = max(p.lo, 0.0), True
        self.s.pending[node.output[0]] = p

    def _op_Clip(self, node, where):
        p = self._pending_of(node, where)
        lo, hi = self._attr(node, "min"), self._attr(node, "max")
        if len(node.input) > 1 and node.input[1]:
            lo = float(np.asarray(self._const(node.input[1], where, "min")))
        if len(node.input) > 2 and node.input[2]:
            hi = float(np.asarray(self._const(node.input[2], where, "max")))
        p.lo = max(p.lo, -np.inf if lo is None else lo)
        p.hi = min(p.hi, np.inf if hi is None else hi)
        p.clipped = True
        self.s.pending[node.output[0]] = p

    def _pending_of(self, node, where) -> _Pending:
        p = self.s.pending.pop(node.input[0], None)
        if p is None:
            raise ConversionError(f"{where}: must follow a convolution or an add (its float "
                                  "result, before quantization)")
        return p

    def _activation(self, p: _Pending, out_q, where) -> str:
        """The ternet activation whose clamp bounds equal those of the Relu/Clip seen, at the
        output quantization (both rounded into it, as a runtime clamps)."""
        if not p.clipped:
            return "none"
        from ..quant import activation_bounds
        scale, zp = out_q
        lo = 0 if p.lo == -np.inf else int(np.clip(zp + np.rint(p.lo / scale), 0, 255))
        hi = 255 if p.hi == np.inf else int(np.clip(zp + np.rint(p.hi / scale), 0, 255))
        for act in ("relu6", "relu", "none"):
            if activation_bounds(act, scale, zp) == (lo, hi):
                return act
        raise ConversionError(f"{p.where}: its Relu/Clip ({p.lo:g}, {p.hi:g}) is neither ReLU nor "
                              "ReLU6 at the output quantization")

    # ------------------------------------------------------------------ views and the classifier
    def _view(self, node, where):
        x = node.input[0]
        for table in (self.s.deq, self.s.quant, self.s.raw):
            if x in table:
                v = table[x]
                if table is not self.s.raw and node.op_type != "Identity" and v.shape[:2] != (1, 1):
                    raise ConversionError(f"{where}: reshapes a {v.shape[0]}x{v.shape[1]} "
                                          "activation; only pooled (1x1) ones can be flattened")
                table[node.output[0]] = v
                return
        if x in self.s.consts:
            self.s.consts[node.output[0]] = self.s.consts[x]
            return
        raise ConversionError(f"{where}: input {x!r} is not a quantized activation")

    _op_Flatten = _op_Reshape = _op_Squeeze = _op_Identity = _view

    def _op_Transpose(self, node, where):
        x = node.input[0]
        if x not in self.s.raw or list(self._attr(node, "perm", [])) != [0, 3, 1, 2]:
            raise ConversionError(f"{where}: only the NHWC -> NCHW transpose of the uint8 input "
                                  "is supported")
        self.s.raw[node.output[0]] = self.s.raw[x]

    def _op_Gemm(self, node, where):
        x = self._value(node.input[0], where)
        if (self._attr(node, "alpha", 1.0), self._attr(node, "beta", 1.0),
                self._attr(node, "transA", 0)) != (1.0, 1.0, 0):
            raise ConversionError(f"{where}: only Gemm with alpha = beta = 1 and no transA")
        wc = self._qconst(node.input[1], where, "weights")
        trans_b = int(self._attr(node, "transB", 0))
        w, s_w = self._weights(wc, 0 if trans_b else 1, where)
        w = w if trans_b else np.ascontiguousarray(w.T)
        bias = self._bias(node, 2, where, x.scale, s_w)
        self.b.linear(x, w, bias, s_w, where)
        self.sources[self.b.nodes[-1]["name"]] = node.output[0]
        self.s.tail.add(node.output[0])
