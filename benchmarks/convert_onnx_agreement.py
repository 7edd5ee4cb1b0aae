"""ternet vs onnxruntime on converted ONNX QDQ models, over the ImageNet dev images.

    python benchmarks/convert_onnx_agreement.py                 # Lite0 quantize_static QDQ
    python benchmarks/convert_onnx_agreement.py \
        --roundtrip weights/efficientnet_lite0_int8.safetensors

1. `lite0_int8_qdq.onnx` from `peer_models.py` (onnxruntime `quantize_static`, QDQ, per-channel
   int8 weights, uint8 activations; built once into $TERNET_PEERS_CACHE) is converted with the
   Lite0 normalisation (pixel - 127) / 128. Both engines get the same quantized input: ternet's
   uint8 preprocessing of each image, and for onnxruntime (which takes float NCHW and quantizes
   it itself) those values dequantized, which its QuantizeLinear maps back to the same integers.
   Reported: top-1 / top-5 of each, top-1 agreement (also counting onnxruntime's exact ties in
   its 8-bit logits as agreeing), max |logit difference|, and for scale, the agreement of
   onnxruntime's fused integer kernels with its own unfused QDQ execution.
2. --roundtrip FILE: ternet's own QDQ export of FILE (`peer_models.export_ternet`, int8 and
   uint8-stored weights) converted back; every weight, bias, scale and zero point must come back
   identical and the reference engine's logits bit-identical on the dev images.

The dev images are for evaluation only: nothing is fitted to them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from convert_agreement import DEV, accuracy, dev_set  # noqa: E402

LITE0_PREPROCESS = {"mean": str(127 / 255), "std": str(128 / 255)}


def ort_session(path: Path, fused: bool = True):
    """onnxruntime, 1 thread; fused: its default optimizations (QDQ -> integer kernels such as
    QLinearConv), else none (every DequantizeLinear / float op / QuantizeLinear run as written)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, x_float, fused: bool = True) -> np.ndarray:
    sess = ort_session(path, fused)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(x_float[i:i + 1])})[0]
                           for i in range(len(x_float))])


def tie_aware_agreement(ours, theirs) -> float:
    """Share of images whose ternet top-1 is one of the classes tied for onnxruntime's maximum
    (its logits are 8-bit quantized, so exact ties happen; its argmax takes the first)."""
    return float(np.mean([o.argmax() in np.flatnonzero(t == t.max())
                          for o, t in zip(ours, theirs)]))


def quantize_static_agreement(onnx_path: Path, images: Path) -> dict:
    import ternet
    from ternet.conversion import convert
    out = Path(tempfile.mkdtemp(prefix="ternet-onnx-")) / "lite0_qdq.safetensors"
    report = convert(onnx_path, out, preprocess=LITE0_PREPROCESS, arch="efficientnet_lite0")
    model = ternet.load(out, threads=1)
    x, y, _ = dev_set(model, images)
    ours = model.predict(x)
    s, zp = model.file.input["scale"], model.file.input["zero_point"]
    x_float = ((x.astype(np.float32) - np.float32(zp)) * np.float32(s)).transpose(0, 3, 1, 2)
    theirs = ort_logits(onnx_path, x_float)
    unfused = ort_logits(onnx_path, x_float, fused=False)
    o1, o5 = accuracy(ours, y)
    t1, t5 = accuracy(theirs, y)
    return {"images": len(y), "nodes": report.nodes, "notes": report.notes,
            "ternet_top1": o1, "ternet_top5": o5, "onnxruntime_top1": t1, "onnxruntime_top5": t5,
            "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "top1_agreement_ties_counted": tie_aware_agreement(ours, theirs),
            "max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
            "unfused_onnxruntime_top1_agreement":
                float(np.mean(ours.argmax(1) == unfused.argmax(1))),
            "onnxruntime_fused_vs_unfused_top1_agreement":
                float(np.mean(theirs.argmax(1) == unfused.argmax(1)))}


def roundtrip(model_file: Path, images: Path) -> dict:
    import peer_models
    import ternet
    from ternet.conversion import convert
    from ternet.format import read_model
    tmp = Path(tempfile.mkdtemp(prefix="ternet-roundtrip-"))
    orig = read_model(model_file)
    x = dev_set(ternet.load(model_file, kernels="reference"), images)[0]
    want = ternet.load(model_file, kernels="reference").predict(x)
    res = {}
    for weights in ("s8", "u8"):
        onnx_path = peer_models.export_ternet(model_file, tmp / f"{weights}.onnx",
                                              log=lambda s: None, weights=weights)
        back = tmp / f"{weights}.safetensors"
        convert(onnx_path, back)
        got = read_model(back)
        res[weights] = {"tensor_mismatches": tensor_mismatches(orig, got),
                        "logits_identical": bool(np.array_equal(
                            ternet.load(back, kernels="reference").predict(x), want))}
    return res


def tensor_mismatches(a, b) -> list:
    """Names of `a`'s tensors whose values differ in `b` (nodes matched by position)."""
    from ternet.format import pointwise_weight
    bad = []
    for na, nb in zip(a.graph, b.graph, strict=True):
        fields = ["bias", "weight_scale", "output_scale", "output_zero_point"]
        if na.op == "pointwise":
            if not np.array_equal(pointwise_weight(a, na), pointwise_weight(b, nb)):
                bad.append(f"{na.name}.weight")
        else:
            fields.append("weight")
        for f in fields:
            ka, kb = f"{na.name}.{f}", f"{nb.name}.{f}"
            if (ka in a.tensors) != (kb in b.tensors) or (
                    ka in a.tensors and not np.array_equal(a.tensors[ka], b.tensors[kb])):
                bad.append(ka)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", type=Path, help="a QDQ model (default: build peer_models' Lite0)")
    ap.add_argument("--images", type=Path, default=DEV)
    ap.add_argument("--roundtrip", type=Path, metavar="FILE",
                    help="instead: ternet's QDQ export of FILE converted back")
    args = ap.parse_args(argv)
    if args.roundtrip:
        res = roundtrip(args.roundtrip, args.images)
    else:
        import peer_models
        res = quantize_static_agreement(args.onnx or peer_models.ensure("int8"), args.images)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
