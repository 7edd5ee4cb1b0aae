"""LiteRT (TFLite) int8 EfficientNet-Lite0 for `bench_peers.py`, built in two steps.

TensorFlow is a large install and must not enter ternet's environment, so:

1. in ternet's venv (torch, `train` extra): `python benchmarks/litert_model.py dump`
   writes the BN-folded FP32 Lite0 (`ternet.train.fold`, same weights as the ONNX peers) and the
   64 CIFAR-10 *train* calibration images of the ONNX int8 peer to `<cache>/lite0_folded.npz`;
2. in a separate venv with `tensorflow-cpu` (and `ai-edge-litert` for running it):
   `python benchmarks/litert_model.py build` rebuilds the network as a Keras model from that
   file (NHWC, TF 'same' padding = the checkpoint's TF SAME), checks it against the stored FP32
   logits, and converts it with full-integer post-training quantization (TFLiteConverter,
   per-channel int8 weights, int8 activations, representative dataset = the calibration images)
   to `<cache>/lite0_int8.tflite` with an int8 input (the float input (pixel - 127) / 128,
   quantized) and float logits out.

`bench_peers.py` then runs it with `ai_edge_litert.interpreter.Interpreter` (XNNPACK) if both
the file and the package are there.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("TERNET_PEERS_CACHE", "/work/cache/peers"))
FOLDED = CACHE / "lite0_folded.npz"
TFLITE = CACHE / "lite0_int8.tflite"


def dump() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from peer_models import cifar_calibration, to_float_nchw
    from ternet.train.fold import fold_model
    from ternet.train.models import build
    nodes = fold_model(build("efficientnet_lite0"))
    arrays, spec = {}, []
    for i, n in enumerate(nodes):
        spec.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": dict(n.attrs)})
        if n.weight is not None:
            arrays[f"w{i}"] = n.weight.detach().numpy()
            arrays[f"b{i}"] = n.bias.detach().numpy()
    calib = cifar_calibration()                                   # uint8 NHWC, as the ONNX peer
    model = build("efficientnet_lite0").eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(to_float_nchw(calib[:4]))).numpy()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(FOLDED, spec=json.dumps(spec), calib=calib, ref_logits=ref, **arrays)
    print(f"wrote {FOLDED}")


def _keras_model(d):
    import tensorflow as tf
    spec = json.loads(str(d["spec"]))
    inp = tf.keras.Input((224, 224, 3), name="input")
    vals = {"input": inp}
    for i, n in enumerate(spec):
        op, a = n["op"], n["attrs"]
        x = vals[n["inputs"][0]]
        act = a.get("activation", "none")
        if op in ("conv2d", "pointwise"):
            w = d[f"w{i}"]                                       # [cout, cin, k, k]
            layer = tf.keras.layers.Conv2D(w.shape[0], w.shape[2], strides=a.get("stride", 1),
                                           padding="same", name=f"n{i}")
            y = layer(x)
            layer.set_weights([w.transpose(2, 3, 1, 0), d[f"b{i}"]])
        elif op == "depthwise":
            w = d[f"w{i}"]                                       # [c, 1, k, k]
            layer = tf.keras.layers.DepthwiseConv2D(w.shape[2], strides=a.get("stride", 1),
                                                    padding="same", name=f"n{i}")
            y = layer(x)
            layer.set_weights([w.transpose(2, 3, 0, 1), d[f"b{i}"]])
        elif op == "add":
            y = tf.keras.layers.Add()([x, vals[n["inputs"][1]]])
        elif op == "global_avg_pool":
            y = tf.keras.layers.GlobalAveragePooling2D()(x)
        elif op == "linear":
            w = d[f"w{i}"]
            layer = tf.keras.layers.Dense(w.shape[0], name=f"n{i}")
            y = layer(tf.keras.layers.Flatten()(x))
            layer.set_weights([w.T, d[f"b{i}"]])
        else:
            raise ValueError(op)
        if act == "relu6":
            y = tf.keras.layers.ReLU(6.0)(y)
        elif act == "relu":
            y = tf.keras.layers.ReLU()(y)
        vals[n["name"]] = y
    return tf.keras.Model(inp, vals[spec[-1]["name"]])


def build() -> None:
    import tensorflow as tf
    d = np.load(FOLDED)
    model = _keras_model(d)
    calib = d["calib"]
    xf = (calib.astype(np.float32) - 127.0) / 128.0
    got = model(xf[:4]).numpy()
    err = float(np.abs(got - d["ref_logits"]).max())
    print(f"Keras vs PyTorch FP32 logits: max |diff| {err:.2e}")
    if err > 1e-2:
        raise SystemExit("Keras rebuild does not match the PyTorch model")

    def rep():
        for i in range(len(xf)):
            yield [xf[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.float32
    TFLITE.write_bytes(conv.convert())
    print(f"wrote {TFLITE} ({TFLITE.stat().st_size} bytes)")


if __name__ == "__main__":
    {"dump": dump, "build": build}[sys.argv[1]]()
