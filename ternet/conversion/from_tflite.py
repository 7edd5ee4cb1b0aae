"""TFLite (full-integer quantized CNN) -> ternet graph, through `GraphBuilder`.

Supported (docs/convert.md): CONV_2D (the stem, 1x1 pointwise, any odd k <= 7 with stride 1
or 2), DEPTHWISE_CONV_2D (depth multiplier 1), ADD (same shapes), MEAN over H and W and a global
AVERAGE_POOL_2D, FULLY_CONNECTED or a 1x1 CONV_2D on the pooled vector as the classifier,
fused or standalone RELU / RELU6 (a standalone one must keep its input's quantization), PAD
before a VALID convolution (giving SAME or symmetric padding), QUANTIZE at the input (uint8 <->
int8 or float -> 8-bit), reshapes that only add or drop unit dimensions, and RESHAPE / SQUEEZE /
SOFTMAX / DEQUANTIZE / QUANTIZE after the classifier (dropped: ternet returns the classifier's
float logits). Weights int8 with zero
point 0, per channel or per tensor; activations int8 or uint8, per tensor. Anything else is a
`ConversionError` naming the op, its output tensor and the reason.
"""
from __future__ import annotations

import numpy as np

from .common import (ConversionError, GraphBuilder, Value, int8_to_uint8_zero_point,
                     padding_of_pads)
from .tflite_reader import TFLiteModel, TFLiteOp, read_tflite

ACTIVATIONS = {"NONE": "none", "RELU": "relu", "RELU6": "relu6"}
TAIL_OPS = ("RESHAPE", "SQUEEZE", "SOFTMAX", "DEQUANTIZE", "QUANTIZE")
MAX_KERNEL = 7


def build(path, builder: GraphBuilder) -> tuple[bool, dict]:
    """Fill `builder` from the .tflite file; returns (input is 8-bit raw data, ternet node ->
    TFLite tensor index holding the same values)."""
    model = read_tflite(path)
    conv = _Converter(model, builder)
    conv.run()
    return conv.raw_input, conv.sources


def _short(name: str) -> str:
    """TFLite tensor names repeat the fused ops' names joined by ';': keep the first, bounded."""
    first = name.split(";")[0]
    return first if len(first) <= 80 else first[:77] + "..."


class _Converter:
    def __init__(self, model: TFLiteModel, builder: GraphBuilder):
        self.m = model
        self.b = builder
        self.values: dict[int, Value] = {}         # TFLite tensor -> ternet value
        self.padded: dict[int, tuple] = {}         # PAD output -> (value, (top, bottom, l, r))
        self.sources: dict[str, int] = {}
        self.tail: set[int] = set()                # tensors after the classifier
        self.raw_input = False
        self.uses = {}
        for op in model.ops:
            for t in op.inputs:
                self.uses[t] = self.uses.get(t, 0) + 1

    # ------------------------------------------------------------------ driver
    def run(self):
        m = self.m
        if m.num_subgraphs != 1:
            raise ConversionError(f"{m.path}: {m.num_subgraphs} subgraphs (control flow); only "
                                  "single-graph models convert")
        if len(m.inputs) != 1 or len(m.outputs) != 1:
            raise ConversionError(f"{m.path}: {len(m.inputs)} inputs and {len(m.outputs)} outputs; "
                                  "ternet converts image classifiers with one of each")
        self._graph_input(m.tensors[m.inputs[0]])
        for i, op in enumerate(m.ops):
            self._op(op, i)
        if not self.tail:
            raise ConversionError(f"{m.path}: no classifier (FULLY_CONNECTED, or a 1x1 CONV_2D "
                                  "on the pooled features) ends the graph")
        if m.outputs[0] not in self.tail:
            out = _short(m.tensors[m.outputs[0]].name)
            raise ConversionError(f"{m.path}: the graph output {out!r} is not the classifier's")

    def _where(self, op: TFLiteOp) -> str:
        out = self.m.tensors[op.outputs[0]].name if op.outputs else "?"
        return f"{self.m.path}: op #{op.index} {op.opcode} ({_short(out)!r})"

    def _op(self, op: TFLiteOp, i: int):
        where = self._where(op)
        if self.tail:
            return self._tail_op(op, where)
        handler = getattr(self, "_op_" + op.opcode.lower(), None)
        if handler is None:
            raise ConversionError(f"{where}: op {op.opcode} is not supported by ternet")
        handler(op, where)

    def _remaining_are_tail(self, op: TFLiteOp) -> bool:
        return all(o.opcode in TAIL_OPS for o in self.m.ops[op.index + 1:])

    # ------------------------------------------------------------------ tensors
    def _graph_input(self, t):
        if len(t.shape) != 4 or t.shape[0] != 1 or t.shape[3] != 3:
            raise ConversionError(f"{self.m.path}: input {_short(t.name)!r} has shape "
                                  f"{list(t.shape)}; expected [1, H, W, 3] (NHWC RGB)")
        if t.dtype in ("int8", "uint8"):
            scale, zp = self._qparams(t, f"{self.m.path}: input {_short(t.name)!r}")
            self.values[t.index] = self.b.input(t.shape[1], t.shape[2], scale, zp)
            self.raw_input = True
        elif t.dtype != "float32":
            raise ConversionError(f"{self.m.path}: input {_short(t.name)!r} is {t.dtype}; expected "
                                  "uint8, int8 or float32 (then quantized by the first op)")

    def _qparams(self, t, where) -> tuple[float, int]:
        """Per-tensor (scale, uint8 zero point) of an 8-bit activation tensor."""
        if t.dtype not in ("int8", "uint8"):
            raise ConversionError(f"{where}: activation tensor {_short(t.name)!r} is {t.dtype}; "
                                  "ternet's activations are 8-bit (int8 or uint8)")
        q = t.quant
        if q is None:
            raise ConversionError(f"{where}: activation tensor {_short(t.name)!r} has no "
                                  "quantization parameters")
        if q.per_channel:
            raise ConversionError(f"{where}: activation tensor {_short(t.name)!r} is quantized per "
                                  "channel; ternet's activations are per tensor")
        scale = float(q.scales[0])
        if not (np.isfinite(scale) and scale > 0):
            raise ConversionError(f"{where}: activation tensor {_short(t.name)!r} has scale "
                                  f"{scale}")
        return scale, int8_to_uint8_zero_point(q.zero_points[0], t.dtype, where)

    def _value(self, tid: int, where: str) -> Value:
        if tid in self.padded:
            raise ConversionError(f"{where}: reads the output of a PAD; ternet folds PAD only into "
                                  "the VALID convolution right after it")
        v = self.values.get(tid)
        if v is None:
            name = self.m.tensors[tid].name if tid >= 0 else "(none)"
            raise ConversionError(f"{where}: input {_short(name)!r} is not an activation of the "
                                  "graph (constant, or made by an unsupported op)")
        return v

    def _set(self, tid: int, v: Value):
        self.values[tid] = v
        self.sources[v.node] = tid

    def _weights(self, op, where, axis: int, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """int8 constant weights of op input 1 and their per-output-channel scales."""
        t = self.m.tensors[op.inputs[1]]
        w = f"{where}: weights {_short(t.name)!r}"
        if t.data is None:
            raise ConversionError(f"{w}: not a constant (weights computed at run time)")
        if t.dtype != "int8":
            raise ConversionError(f"{w}: {t.dtype}; ternet converts int8-quantized weights only "
                                  "(full-integer post-training quantization)")
        if len(t.shape) != ndim:
            raise ConversionError(f"{w}: shape {list(t.shape)}, expected {ndim} dimensions")
        q = t.quant
        cout = t.shape[axis]
        if q is None or np.any(q.zero_points != 0):
            raise ConversionError(f"{w}: weights must be symmetric (zero point 0)")
        if q.per_channel and (q.quantized_dimension != axis or q.scales.size != cout):
            raise ConversionError(f"{w}: {q.scales.size} scales along dimension "
                                  f"{q.quantized_dimension}; expected {cout} along {axis}")
        scales = np.broadcast_to(q.scales.astype(np.float32), (cout,)).copy()
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ConversionError(f"{w}: every weight scale must be finite and > 0")
        return np.array(t.data, np.int8), scales

    def _bias(self, op, where, cout: int) -> np.ndarray:
        tid = op.inputs[2] if len(op.inputs) > 2 else -1
        if tid < 0:
            return np.zeros(cout, np.int32)
        t = self.m.tensors[tid]
        if t.data is None or t.dtype != "int32" or t.shape != (cout,):
            raise ConversionError(f"{where}: bias {_short(t.name)!r} must be a constant int32 "
                                  f"[{cout}], got {t.dtype} {list(t.shape)}")
        return np.array(t.data, np.int32)

    def _out_q(self, op, where) -> tuple[float, int]:
        return self._qparams(self.m.tensors[op.outputs[0]], where)

    def _activation(self, op, where) -> str:
        act = op.options.get("fused_activation_function", "NONE")
        if act not in ACTIVATIONS:
            raise ConversionError(f"{where}: fused activation {act} is not supported "
                                  "(NONE, RELU, RELU6)")
        return ACTIVATIONS[act]

    def _check_shape(self, op, v: Value, where):
        t = self.m.tensors[op.outputs[0]]
        if tuple(t.shape) != (1,) + v.shape:
            raise ConversionError(f"{where}: output shape {list(t.shape)} in the file, but ternet "
                                  f"computes {[1, *v.shape]}")

    # ------------------------------------------------------------------ convolutions
    def _geometry(self, op, where, k: int, x_tid: int) -> tuple[Value, int, str]:
        """(input value, stride, ternet padding) of a convolution, folding a PAD before it."""
        o = op.options
        stride = o.get("stride_h", 1)
        if stride != o.get("stride_w", 1) or stride not in (1, 2):
            raise ConversionError(f"{where}: strides {o.get('stride_h')}x{o.get('stride_w')}; "
                                  "ternet supports 1x1 and 2x2")
        if o.get("dilation_h_factor", 1) != 1 or o.get("dilation_w_factor", 1) != 1:
            raise ConversionError(f"{where}: dilated convolutions are not supported")
        if x_tid in self.padded:
            x, pads = self.padded.pop(x_tid)
            if o.get("padding") != "VALID":
                raise ConversionError(f"{where}: PAD before a SAME convolution is not supported")
            return x, stride, padding_of_pads(pads, x.shape, k, stride, where)
        x = self._value(x_tid, where)
        if o.get("padding") == "SAME" or k == 1:
            return x, stride, "same"
        raise ConversionError(f"{where}: VALID padding of a {k}x{k} convolution is not supported "
                              "(ternet pads SAME, or symmetrically via a PAD op)")

    def _op_conv_2d(self, op, where):
        w, scales = self._weights(op, where, axis=0, ndim=4)
        cout, kh, kw, cin = w.shape
        if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL:
            raise ConversionError(f"{where}: kernel {kh}x{kw}; ternet supports square odd kernels "
                                  f"up to {MAX_KERNEL}x{MAX_KERNEL}")
        x_tid = op.inputs[0]
        xv = self.values.get(x_tid)
        if kh == 1 and xv is not None and xv.shape[:2] == (1, 1) and self._remaining_are_tail(op):
            return self._classifier(op, where, w.reshape(cout, cin), scales)
        x, stride, padding = self._geometry(op, where, kh, x_tid)
        if x.shape[2] != cin:
            raise ConversionError(f"{where}: weights expect {cin} input channels, the input has "
                                  f"{x.shape[2]}")
        v = self.b.conv(x, w, self._bias(op, where, cout), scales, self._out_q(op, where),
                        stride=stride, padding=padding, activation=self._activation(op, where),
                        where=where)
        self._check_shape(op, v, where)
        self._set(op.outputs[0], v)

    def _op_depthwise_conv_2d(self, op, where):
        w, scales = self._weights(op, where, axis=3, ndim=4)
        _, kh, kw, c = w.shape
        if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL:
            raise ConversionError(f"{where}: kernel {kh}x{kw}; ternet supports square odd kernels "
                                  f"up to {MAX_KERNEL}x{MAX_KERNEL}")
        x, stride, padding = self._geometry(op, where, kh, op.inputs[0])
        if x.shape[2] != c:
            raise ConversionError(f"{where}: depth multiplier {c // max(x.shape[2], 1)} (weights "
                                  f"for {c} channels, input has {x.shape[2]}); only 1 is supported")
        v = self.b.depthwise(x, w[0], self._bias(op, where, c), scales, self._out_q(op, where),
                             stride=stride, padding=padding,
                             activation=self._activation(op, where), where=where)
        self._check_shape(op, v, where)
        self._set(op.outputs[0], v)

    def _op_pad(self, op, where):
        x = self._value(op.inputs[0], where)
        p = self.m.tensors[op.inputs[1]]
        if p.data is None or p.data.shape != (4, 2):
            raise ConversionError(f"{where}: paddings must be a constant [4, 2]")
        pads = [int(v) for v in p.data.reshape(-1)]
        if pads[0:2] != [0, 0] or pads[6:8] != [0, 0] or min(pads) < 0:
            raise ConversionError(f"{where}: pads {pads}; only non-negative spatial padding is "
                                  "supported")
        out_q = self._out_q(op, where)
        if out_q != (x.scale, x.zero_point):
            raise ConversionError(f"{where}: PAD changes the quantization")
        if self.uses.get(op.outputs[0], 0) != 1:
            raise ConversionError(f"{where}: a PAD output must feed exactly one convolution")
        self.padded[op.outputs[0]] = (x, tuple(pads[2:6]))

    # ------------------------------------------------------------------ other layers
    def _op_add(self, op, where):
        a, b = (self._value(t, where) for t in op.inputs[:2])
        v = self.b.add(a, b, self._out_q(op, where), activation=self._activation(op, where),
                       where=where)
        self._set(op.outputs[0], v)

    def _op_mean(self, op, where):
        x = self._value(op.inputs[0], where)
        axes = self.m.tensors[op.inputs[1]].data
        if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [1, 2]:
            over = None if axes is None else axes.tolist()
            raise ConversionError(f"{where}: MEAN over axes {over}; only the spatial mean "
                                  "(axes 1, 2) is supported")
        self._set(op.outputs[0], self.b.global_avg_pool(x, self._out_q(op, where), where))

    def _op_average_pool_2d(self, op, where):
        x = self._value(op.inputs[0], where)
        o = op.options
        if (o.get("filter_height"), o.get("filter_width")) != x.shape[:2]:
            raise ConversionError(f"{where}: a {o.get('filter_height')}x{o.get('filter_width')} "
                                  f"average pool on {x.shape[0]}x{x.shape[1]}; only global pooling "
                                  "is supported")
        if self._activation(op, where) != "none":
            raise ConversionError(f"{where}: a fused activation on the global pool is not "
                                  "supported")
        v = self.b.global_avg_pool(x, self._out_q(op, where), where)
        self._check_shape(op, v, where)
        self._set(op.outputs[0], v)

    def _op_relu(self, op, where, act="relu"):
        x = self._value(op.inputs[0], where)
        if self.uses.get(op.inputs[0], 0) != 1:
            raise ConversionError(f"{where}: its input is also used elsewhere, so it cannot become "
                                  "the clamp of the layer before it")
        out_q = self._out_q(op, where)
        if out_q != (x.scale, x.zero_point):
            # LiteRT would round twice and clamp to the first tensor's int8 range in between
            raise ConversionError(f"{where}: a {op.opcode} that also requantizes (scale "
                                  f"{x.scale:.6g} -> {out_q[0]:.6g}) is not supported; only a "
                                  "pure clamp folds into the layer before it")
        self._set(op.outputs[0], self.b.fold_activation(x, act, where))

    def _op_relu6(self, op, where):
        self._op_relu(op, where, "relu6")

    def _op_quantize(self, op, where):
        src = self.m.tensors[op.inputs[0]]
        out_q = self._out_q(op, where)
        if op.inputs[0] == self.m.inputs[0] and src.dtype == "float32":
            t = self.m.tensors[op.outputs[0]]
            self._set(op.outputs[0], self.b.input(t.shape[1], t.shape[2], *out_q))
            return
        x = self._value(op.inputs[0], where)
        if out_q != (x.scale, x.zero_point):
            raise ConversionError(f"{where}: requantization between layers is not supported "
                                  "(only the lossless uint8 <-> int8 shift)")
        self.values[op.outputs[0]] = x

    def _op_reshape(self, op, where):
        x = self._value(op.inputs[0], where)
        t = self.m.tensors[op.outputs[0]]
        if [d for d in t.shape if d != 1] != [d for d in x.shape if d != 1]:
            raise ConversionError(f"{where}: reshape {[1, *x.shape]} -> {list(t.shape)}; only "
                                  "adding or removing unit dimensions is supported")
        if self._out_q(op, where) != (x.scale, x.zero_point):
            raise ConversionError(f"{where}: a reshape that changes the quantization")
        self.values[op.outputs[0]] = x

    _op_squeeze = _op_reshape

    def _op_fully_connected(self, op, where):
        w, scales = self._weights(op, where, axis=0, ndim=2)
        if op.options.get("weights_format", 0) != 0:
            raise ConversionError(f"{where}: shuffled FULLY_CONNECTED weights are not supported")
        if not self._remaining_are_tail(op):
            raise ConversionError(f"{where}: only the classifier may be FULLY_CONNECTED (ops other "
                                  "than reshape/softmax/(de)quantize follow it)")
        self._classifier(op, where, w, scales)

    def _classifier(self, op, where, w, scales):
        x = self._value(op.inputs[0], where)
        if self._activation(op, where) != "none":
            raise ConversionError(f"{where}: the classifier has a fused activation; ternet's "
                                  "classifier outputs logits")
        if x.shape[2] != w.shape[1]:
            raise ConversionError(f"{where}: weights expect {w.shape[1]} inputs, the input has "
                                  f"{x.shape[2]} channels")
        self.b.linear(x, w, self._bias(op, where, w.shape[0]), scales, where)
        self.sources[self.b.nodes[-1]["name"]] = op.outputs[0]
        self.tail.add(op.outputs[0])

    def _tail_op(self, op, where):
        if op.opcode not in TAIL_OPS or op.inputs[0] not in self.tail:
            raise ConversionError(f"{where}: only reshape/softmax/(de)quantize may follow the "
                                  "classifier")
        self.tail.update(op.outputs)

