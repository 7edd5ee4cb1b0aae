"""A float MobileNetV2 from an int8 TFLite MobileNetV2 (Google's TF2 full-integer PTQ file).

The TFLite graph is BN-folded: each convolution has int8 per-channel weights q, scales s_w and
an int32 bias b (in units of s_in * s_w). Dequantized, w = q * s_w and bias = b * s_in * s_w
are the float network the int8 file approximates. They go into `MobileNetV2(padding="same")`
(TF 'SAME' padding) layer by layer in execution order, matched by shape, stride and fused
activation: the convolutions of the TFLite graph come in the same order as `graph_spec()`'s
weighted nodes (stem, [expand], depthwise, project per block, head, classifier). Each
BatchNorm becomes the identity plus the bias (weight 1, mean 0, variance 1, eps 0), so
`fold.py` folds it back exactly. The classifier's first (background) row of the 1001 is
dropped: the 1000 classes remain in standard order.

Anything else in the file (another layer order, shape, stride, activation or padding) is an
`InputFileError` naming the file, the TFLite op and the mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import InputFileError
from .models import MobileNetV2

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
ACTIVATIONS = {"NONE": "none", "RELU6": "relu6"}


@dataclass
class FloatConv:
    """One TFLite convolution, dequantized, in torch layout ([cout, cin/groups, k, k]; the
    classifier [classes, cin])."""
    where: str                  # "op #N CONV_2D" for messages
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    activation: str             # 'relu6' | 'none' | a TFLite name this model cannot take
    padding: str                # TFLite padding, 'SAME' or 'VALID'


def mobilenet_v2_from_tflite(path, **arch) -> MobileNetV2:
    """The float MobileNetV2 ('same' padding) of the int8 TFLite file `path`; `arch`: the
    MobileNetV2 arguments (num_classes, width, blocks, last) of the network the file holds,
    by default MobileNetV2 1.0 with 1000 classes (the file has one more: background)."""
    from ternet.conversion.tflite_reader import read_tflite
    if not Path(path).is_file():
        raise InputFileError(f"{path}: no such file (the int8 MobileNetV2 .tflite; set --tflite "
                             "or TERNET_MBV2_TFLITE)")
    model = MobileNetV2(padding="same", **arch)
    load_convs(model, dequantized_convs(read_tflite(path)), str(path))
    return model


def dequantized_convs(m) -> list[FloatConv]:
    """The convolutions (and fully connected layers) of a TFLiteModel, in execution order."""
    return [_dequantize(m, op) for op in m.ops if op.opcode in CONV_OPS]


def _dequantize(m, op) -> FloatConv:
    where = f"op #{op.index} {op.opcode}"
    x, w = m.tensors[op.inputs[0]], m.tensors[op.inputs[1]]
    if w.data is None or w.dtype != "int8" or w.quant is None or x.quant is None:
        raise InputFileError(f"{m.path}: {where}: expected int8 constant weights and a quantized "
                             f"input, got {w.dtype} weights")
    axis = 3 if op.opcode == "DEPTHWISE_CONV_2D" else 0
    cout = w.shape[axis]
    if w.quant.scales.size not in (1, cout) or np.any(w.quant.zero_points != 0):
        raise InputFileError(f"{m.path}: {where}: {w.quant.scales.size} weight scales for {cout} "
                             "output channels, or a non-zero weight zero point")
    s_w = np.broadcast_to(w.quant.scales.astype(np.float64), (cout,))
    shape = [1] * w.data.ndim
    shape[axis] = cout
    wf = w.data.astype(np.float64) * s_w.reshape(shape)
    b = m.tensors[op.inputs[2]].data if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    bias = np.zeros(cout) if b is None else b.astype(np.float64) * float(x.quant.scales[0]) * s_w
    if op.opcode == "DEPTHWISE_CONV_2D":              # [1, k, k, C] -> [C, 1, k, k]
        wf = wf.transpose(3, 0, 1, 2)
    elif op.opcode == "CONV_2D":                      # [cout, k, k, cin] -> [cout, cin, k, k]
        wf = wf.transpose(0, 3, 1, 2)
    o = op.options
    return FloatConv(where, torch.from_numpy(np.ascontiguousarray(wf)).float(),
                     torch.from_numpy(bias).float(), int(o.get("stride_h", 1)),
                     ACTIVATIONS.get(o.get("fused_activation_function", "NONE"),
                                     str(o.get("fused_activation_function"))),
                     o.get("padding", "SAME"))


@torch.no_grad()
def load_convs(model: MobileNetV2, convs: list[FloatConv], source: str) -> None:
    """Copy `convs` into the weighted nodes of `model` (in graph_spec order), checking each."""
    nodes = [n for n in model.graph_spec() if n[4] is not None]
    if len(convs) != len(nodes):
        raise InputFileError(f"{source}: {len(convs)} convolution / fully connected ops, but "
                             f"MobileNetV2 has {len(nodes)} weighted layers")
    for (name, op, _, attrs, mod, bn), c in zip(nodes, convs):
        if op == "linear":
            _load_classifier(mod, c, source)
        else:
            _check_conv(name, attrs, mod, c, source)
            mod.weight.copy_(c.weight)
            _bias_as_bn(bn, c.bias)


def _check_conv(name: str, attrs: dict, conv: nn.Conv2d, c: FloatConv, source: str) -> None:
    want = (tuple(conv.weight.shape), conv.stride[0], attrs["activation"])
    got = (tuple(c.weight.shape), c.stride, c.activation)
    if got != want:
        raise InputFileError(f"{source}: {c.where} (for {name}): weights {list(got[0])}, stride "
                             f"{got[1]}, activation {got[2]}; MobileNetV2 needs {list(want[0])}, "
                             f"stride {want[1]}, activation {want[2]}")
    if conv.kernel_size[0] > 1 and c.padding != "SAME":
        raise InputFileError(f"{source}: {c.where} (for {name}): {c.padding} padding; the "
                             "MobileNetV2 mapping takes TF 'SAME' convolutions only")


def _load_classifier(fc: nn.Linear, c: FloatConv, source: str) -> None:
    """A 1x1 conv or FC of classes + 1 outputs, the first the TF-slim background class."""
    w = c.weight.reshape(c.weight.shape[0], -1)
    if tuple(w.shape) != (fc.out_features + 1, fc.in_features) or c.activation != "none":
        raise InputFileError(f"{source}: {c.where} (classifier): weights {list(w.shape)}, "
                             f"activation {c.activation}; expected [{fc.out_features + 1}, "
                             f"{fc.in_features}] (background first), activation none")
    fc.weight.copy_(w[1:])
    fc.bias.copy_(c.bias[1:])


def _bias_as_bn(bn: nn.BatchNorm2d, bias: torch.Tensor) -> None:
    """BN that adds `bias` and nothing else: y = (x - 0) / sqrt(1 + 0) * 1 + bias, exactly."""
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
