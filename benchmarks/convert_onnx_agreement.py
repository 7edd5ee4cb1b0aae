"""ternet vs onnxruntime on converted ONNX QDQ models, over the ImageNet dev images.

    python benchmarks/convert_onnx_agreement.py                 # Lite0 quantize_static QDQ
    python benchmarks/convert_onnx_agreement.py --layers 200    # + where the engines diverge
    python benchmarks/convert_onnx_agreement.py \
        --roundtrip weights/efficientnet_lite0_int8.safetensors

1. `lite0_int8_qdq.onnx` from `peer_models.py` (onnxruntime `quantize_static`, QDQ, per-channel
   int8 weights, uint8 activations; built once into $TERNET_PEERS_CACHE) is converted with the
   Lite0 normalisation (pixel - 127) / 128, with the converter's default requantization rule for
   ONNX, onnxruntime's (`ternet.requant`; also, as `ternet_rule`, converted with ternet's rule
   for comparison). Both engines get the same quantized input: ternet's
   uint8 preprocessing of each image, and for onnxruntime (which takes float NCHW and quantizes
   it itself) those values dequantized, which its QuantizeLinear maps back to the same integers.
   Reported: top-1 / top-5 of each, top-1 agreement (also counting onnxruntime's exact ties in
   its 8-bit logits as agreeing), max |logit difference|, and for scale, the agreement of
   onnxruntime's fused integer kernels with its own unfused QDQ execution.
   With --layers N, for the first N images, per ternet node: each layer run on onnxruntime's
   own input to it (values off by 1, by more: that layer's rounding alone) and ternet's whole
   chain (values differing from onnxruntime's, the largest difference: how the single-layer
   differences grow), in the numpy reference under each requantization rule (ternet.quant.RULES),
   with the chain's top-1 agreement.
2. --roundtrip FILE: ternet's own QDQ export of FILE (`peer_models.export_ternet`, int8 and
   uint8-stored weights) converted back; every weight, bias, scale and zero point must come back
   identical and the reference engine's logits bit-identical on the dev images.

The dev images are for evaluation only: nothing is fitted to them.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def ort_clamped_logits(onnx_path: Path, theirs) -> np.ndarray:
    """Mask of onnxruntime's logits at the ends of their 8-bit range, where the model's output
    DequantizeLinear cannot express the real value (all False for a float output)."""
    import onnx
    from onnx import numpy_helper
    g = onnx.load(str(onnx_path)).graph
    last = next((n for n in g.node if g.output[0].name in n.output), None)
    if last is None or last.op_type != "DequantizeLinear" or len(last.input) < 3:
        return np.zeros(theirs.shape, bool)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    scale, zp = float(consts[last.input[1]]), consts[last.input[2]]
    info = np.iinfo(zp.dtype)
    q = np.rint(theirs / np.float32(scale)) + int(zp)
    return (q <= info.min) | (q >= info.max)


def tie_aware_agreement(ours, theirs) -> float:
    """Share of images whose ternet top-1 is one of the classes tied for onnxruntime's maximum
    (its logits are 8-bit quantized, so exact ties happen; its argmax takes the first)."""
    return float(np.mean([o.argmax() in np.flatnonzero(t == t.max())
                          for o, t in zip(ours, theirs)]))


def quantize_static_agreement(onnx_path: Path, images: Path, layers: int = 0) -> dict:
    import ternet
    from ternet.conversion import convert
    tmp = Path(tempfile.mkdtemp(prefix="ternet-onnx-"))
    out = tmp / "lite0_qdq.safetensors"
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
    clamped = ort_clamped_logits(onnx_path, theirs)
    convert(onnx_path, tmp / "ternet_rule.safetensors", preprocess=LITE0_PREPROCESS,
            arch="efficientnet_lite0", requant="ternet")
    ours_t = ternet.load(tmp / "ternet_rule.safetensors", threads=1).predict(x)
    res = {"images": len(y), "nodes": report.nodes, "notes": report.notes,
            "requant": model.file.requant,
            "ternet_top1": o1, "ternet_top5": o5, "onnxruntime_top1": t1, "onnxruntime_top5": t5,
            "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "top1_agreement_ties_counted": tie_aware_agreement(ours, theirs),
            "max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
            "onnxruntime_clamped_logits": int(clamped.sum()),
            "max_abs_logit_diff_unclamped": float(np.max(np.abs(ours - theirs)[~clamped])),
            "unfused_onnxruntime_top1_agreement":
                float(np.mean(ours.argmax(1) == unfused.argmax(1))),
            "onnxruntime_fused_vs_unfused_top1_agreement":
                float(np.mean(theirs.argmax(1) == unfused.argmax(1))),
            "ternet_rule": {
                "top1_agreement": float(np.mean(ours_t.argmax(1) == theirs.argmax(1))),
                "top1_agreement_ties_counted": tie_aware_agreement(ours_t, theirs),
                "max_abs_logit_diff": float(np.max(np.abs(ours_t - theirs))),
                "max_abs_logit_diff_unclamped": float(np.max(np.abs(ours_t - theirs)[~clamped]))}}
    if layers:
        res["layers"] = divergence_report(onnx_path, model.file, report.source_tensors, x[:layers])
    return res


def ort_layer_values(onnx_path: Path, mf, sources: dict, x_u8) -> list:
    """For each image: onnxruntime's value (uint8 NHWC) of every tensor a ternet node other than
    the classifier stands for, read as extra graph outputs of its default (fused) session, and its
    logits. Extra outputs of QuantizeLinear results leave the fusion as it is: the logits are
    checked equal to those of the unmodified model."""
    import onnx
    from onnx import helper
    m = onnx.load(str(onnx_path))
    names = [sources[n.name] for n in mf.graph[:-1]]
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    tmp = Path(tempfile.mkdtemp(prefix="ternet-onnx-layers-")) / "exposed.onnx"
    onnx.save(m, str(tmp))
    sess, plain = ort_session(tmp), ort_session(onnx_path)
    s, zp = mf.input["scale"], mf.input["zero_point"]
    out = []
    for img in x_u8:
        xf = ((img[None].astype(np.float32) - np.float32(zp)) * np.float32(s)).transpose(0, 3, 1, 2)
        feed = {sess.get_inputs()[0].name: np.ascontiguousarray(xf)}
        res = sess.run(None, feed)
        assert np.array_equal(res[0], plain.run(None, feed)[0]), "extra outputs changed onnxruntime"
        vals = {"input": img[None]}
        for node, v in zip(mf.graph[:-1], res[1:], strict=True):
            vals[node.name] = (v.transpose(0, 2, 3, 1) if v.ndim == 4 else
                               v.reshape(1, 1, 1, -1)).astype(np.uint8)
        out.append((vals, res[0][0]))
    return out


def layer_divergence(mf, ort_values: list, rule: str) -> dict:
    """Per node: values off by 1 / by more with onnxruntime's input to the node (isolated),
    values differing / the largest difference along ternet's own chain; and the chain's logits."""
    from ternet.reference import run_node
    rows = {n.name: {"op": n.op, "values": 0, "isolated_d1": 0, "isolated_dmore": 0,
                     "chain_differ": 0, "chain_max": 0} for n in mf.graph[:-1]}
    logits, isolated_logits = [], []
    mf = dataclasses.replace(mf, requant=rule)
    for theirs, _ in ort_values:
        ours = {"input": theirs["input"]}
        for node in mf.graph:
            ours[node.name] = run_node(mf, node, [ours[t] for t in node.inputs])
            if node.op == "linear":
                isolated_logits.append(run_node(mf, node, [theirs[t] for t in node.inputs])[0])
                continue
            want, r = theirs[node.name].astype(np.int16), rows[node.name]
            iso = np.abs(run_node(mf, node, [theirs[t] for t in node.inputs]) - want)
            own = np.abs(ours[node.name] - want)
            r["values"] += want.size
            r["isolated_d1"] += int(np.sum(iso == 1))
            r["isolated_dmore"] += int(np.sum(iso > 1))
            r["chain_differ"] += int(np.sum(own > 0))
            r["chain_max"] = max(r["chain_max"], int(own.max()))
        logits.append(ours[mf.graph[-1].name][0])
    return {"rows": rows, "logits": np.array(logits), "isolated_logits": np.array(isolated_logits)}


def divergence_report(onnx_path: Path, mf, sources: dict, x_u8) -> dict:
    ort_values = ort_layer_values(onnx_path, mf, sources, x_u8)
    theirs = np.array([lg for _, lg in ort_values])
    inside = ~ort_clamped_logits(onnx_path, theirs)
    res = {}
    from ternet.quant import RULES
    for rule in RULES:
        d = layer_divergence(mf, ort_values, rule)
        rows, ours = d["rows"], d["logits"]
        res[rule] = {
            "isolated_d1": sum(r["isolated_d1"] for r in rows.values()),
            "isolated_dmore": sum(r["isolated_dmore"] for r in rows.values()),
            "values": sum(r["values"] for r in rows.values()),
            "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "top1_agreement_ties_counted": tie_aware_agreement(ours, theirs),
            "max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
            "max_abs_logit_diff_unclamped": float(np.max(np.abs(ours - theirs)[inside])),
            "classifier_isolated_max_abs_diff_unclamped":
                float(np.max(np.abs(d["isolated_logits"] - theirs)[inside])),
            "layers": rows}
    return res


def print_divergence(res: dict) -> None:
    rules = list(res)
    head = "".join(f" | {r[:4] + ' iso d1':>12} {'d>1':>4} {'chain diff':>10} {'max':>4}"
                   for r in rules)
    print(f"{'layer':20} {'values':>10}{head}")
    for name, r0 in res[rules[0]]["layers"].items():
        cells = ""
        for rule in rules:
            r = res[rule]["layers"][name]
            cells += (f" | {r['isolated_d1']:12d} {r['isolated_dmore']:4d} "
                      f"{r['chain_differ']:10d} {r['chain_max']:4d}")
        print(f"{name:20} {r0['values']:10d}{cells}")
    for rule in rules:
        t = res[rule]
        print(f"{rule} rule: isolated {t['isolated_d1']} of {t['values']} values off by 1, "
              f"{t['isolated_dmore']} by more; chained top-1 agreement {t['top1_agreement']:.3f} "
              f"({t['top1_agreement_ties_counted']:.3f} counting ties), max |logit diff| "
              f"{t['max_abs_logit_diff']:.4f} ({t['max_abs_logit_diff_unclamped']:.4f} where "
              f"onnxruntime's 8-bit logits are not clamped; classifier alone on its input "
              f"{t['classifier_isolated_max_abs_diff_unclamped']:.4f})")


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
        convert(onnx_path, back, requant="ternet")      # ternet's own export: ternet's rule
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
    ap.add_argument("--layers", type=int, default=0, metavar="N",
                    help="per-layer divergence over the first N images")
    ap.add_argument("--json", type=Path, help="write the numbers here as JSON")
    ap.add_argument("--roundtrip", type=Path, metavar="FILE",
                    help="instead: ternet's QDQ export of FILE converted back")
    args = ap.parse_args(argv)
    if args.roundtrip:
        res = roundtrip(args.roundtrip, args.images)
    else:
        import peer_models
        res = quantize_static_agreement(args.onnx or peer_models.ensure("int8"), args.images,
                                        args.layers)
    summary = {k: v for k, v in res.items() if k != "layers"}
    print(json.dumps(summary, indent=1))
    if "layers" in res:
        print_divergence(res["layers"])
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
