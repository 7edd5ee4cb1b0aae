"""ternet vs LiteRT on a converted TFLite classifier, over the ImageNet dev images.

    python benchmarks/convert_agreement.py                       # MobileNetV2 from ../shared
    python benchmarks/convert_agreement.py --layers 20           # + per-layer rounding table
    python benchmarks/convert_agreement.py --write weights/mobilenet_v2_int8.safetensors

Both engines get the same uint8 inputs (ternet's preprocessing of each image, which for this
model is the raw RGB pixels). Reported: top-1 / top-5 of each against the labels in the file
names, top-1 agreement, the largest |logit difference| (LiteRT's int8 logits dequantized,
background dropped, against ternet's float32 logits), and with --layers N, for the first N
images, per layer how many output values differ by 1 and by more, each ternet layer run on
LiteRT's own input to that layer (so only the rounding rule of that one layer differs). The dev
images are for evaluation only: nothing here is fitted to them.

--write OUT converts the model again into OUT with these dev numbers in `ternet.metrics`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TERNET_SHARED_DIR") or ROOT.parent / "shared") / "data"
TFLITE = SHARED / "models" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
LABELS = SHARED / "models" / "imagenet_labels_1001.txt"
DEV = SHARED / "imagenet-sample-dev"
CLASSES = SHARED / "imagenet_classes.tsv"


def dev_set(model, root: Path):
    """(uint8 inputs [N, H, W, 3], true class indices [N], names) by ternet's preprocessing."""
    index = {row.split("\t")[1]: int(row.split("\t")[0])
             for row in CLASSES.read_text().splitlines()[1:]}
    paths = sorted(root.glob("*.JPEG"))
    x = np.stack([model.preprocess(str(p)) for p in paths])
    return x, np.array([index[p.name.split("_")[0]] for p in paths]), [p.name for p in paths]


def with_outputs(raw: bytes, tensors: list) -> bytes:
    """The .tflite bytes with `tensors` as the graph outputs. LiteRT's XNNPACK delegate keeps
    intermediate tensors to itself (reading them gives null or stale data) but must write graph
    outputs: a new outputs vector is appended to the file and the subgraph's field pointed at it
    (flatbuffer offsets point forward, so appending moves nothing else)."""
    import struct

    import tflite
    sg = tflite.Model.GetRootAs(raw, 0).Subgraphs(0)
    field = sg._tab.Pos + sg._tab.Offset(8)         # SubGraph.outputs: uoffset to the vector
    buf = bytearray(raw) + bytes(-len(raw) % 4)
    vec = len(buf)
    buf += struct.pack(f"<I{len(tensors)}i", len(tensors), *tensors)
    struct.pack_into("<I", buf, field, vec - field)
    return bytes(buf)


def litert(path: Path, tensors: list, builtin: bool = False):
    """LiteRT, 1 thread, on the model with `tensors` exposed: the default (XNNPACK) kernels, or
    TFLite's builtin kernels (gemmlowp fixed-point requantization) with `builtin`."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kind = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else OpResolverType.AUTO
    it = Interpreter(model_content=with_outputs(path.read_bytes(), tensors), num_threads=1,
                     experimental_op_resolver_type=kind)
    it.allocate_tensors()
    return it


def litert_logits(it, x, logit_tensor: int, drop_background: bool):
    """Dequantized logits (the classifier's quantized output) for each image, and a mask of the
    ones clamped to the ends of their 8-bit range (real logits beyond what LiteRT can express)."""
    inp = it.get_input_details()[0]["index"]
    scale, zp = it.get_tensor_details()[logit_tensor]["quantization"]
    info = np.iinfo(it.get_tensor_details()[logit_tensor]["dtype"])
    out, clamped = [], []
    for img in x:
        it.set_tensor(inp, img[None])
        it.invoke()
        q = it.get_tensor(logit_tensor).reshape(-1)
        out.append((q.astype(np.float64) - zp) * scale)
        clamped.append((q == info.min) | (q == info.max))
    cut = slice(1, None) if drop_background else slice(None)
    return np.array(out)[:, cut], np.array(clamped)[:, cut]


def accuracy(logits, y) -> tuple[float, float]:
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return float(np.mean(top5[:, 0] == y)), float(np.mean(np.any(top5 == y[:, None], axis=1)))


def as_uint8(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.int16) + 128).astype(np.uint8) if a.dtype == np.int8 else a


def layer_table(mf, sources: dict, it, x, n: int) -> list[dict]:
    """Per ternet node: values differing from LiteRT by 1 / more, each layer on LiteRT's input."""
    from ternet.reference import run_node
    inp = it.get_input_details()[0]["index"]
    rows = {node.name: {"layer": node.name, "op": node.op, "values": 0, "diff1": 0, "diff_more": 0,
                        "max_logit_diff": 0.0} for node in mf.graph}
    for img in x[:n]:
        it.set_tensor(inp, img[None])
        it.invoke()
        seen = {"input": img[None]}
        for node in mf.graph:
            got = run_node(mf, node, [seen[s] for s in node.inputs])
            want = it.get_tensor(sources[node.name])
            r = rows[node.name]
            if node.op == "linear":
                scale, zp = it.get_tensor_details()[sources[node.name]]["quantization"]
                lit = (want.reshape(-1).astype(np.float64) - zp) * scale
                info = np.iinfo(want.dtype)
                inside = ((want > info.min) & (want < info.max)).reshape(-1)[-got.shape[1]:]
                lit = lit[-got.shape[1]:]                   # background dropped
                d = np.abs(got[0] - lit)[inside]            # LiteRT clamps logits to its range
                r["max_logit_diff"] = max(r["max_logit_diff"], float(np.max(d, initial=0.0)))
                continue
            want = as_uint8(want).reshape(got.shape)
            d = np.abs(got.astype(np.int16) - want.astype(np.int16))
            r["values"] += d.size
            r["diff1"] += int(np.sum(d == 1))
            r["diff_more"] += int(np.sum(d > 1))
            seen[node.name] = want
    return list(rows.values())


def compare(model, report, tflite_path: Path, x, y, builtin: bool) -> dict:
    classifier = report.source_tensors[model.file.graph[-1].name]
    it = litert(tflite_path, [classifier], builtin)
    theirs, clamped = litert_logits(it, x, classifier, report.background_dropped)
    ours = model.predict(x)
    t1, t5 = accuracy(theirs, y)
    diff = np.abs(ours - theirs)
    return {"litert_top1": t1, "litert_top5": t5,
            "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "max_abs_logit_diff": float(np.max(diff[~clamped])),
            "litert_logit_step": float(it.get_tensor_details()[classifier]["quantization"][0]),
            "litert_clamped_logits": int(clamped.sum()),
            "max_abs_logit_diff_incl_clamped": float(np.max(diff))}


def print_layers(tables: dict) -> None:
    names = list(tables)
    first = tables[names[0]]
    heads = "".join(f" {n + ' d1':>14} {n + ' d>1':>14}" for n in names)
    print(f"{'layer':22} {'op':16} {'values':>9}{heads}")
    for i, r in enumerate(first):
        cells = "".join(f" {tables[n][i]['diff1']:14d} {tables[n][i]['diff_more']:14d}"
                        for n in names)
        extra = ""
        if r["op"] == "linear":
            extra = "  max |logit diff| " + ", ".join(
                f"{n} {tables[n][i]['max_logit_diff']:.4f}" for n in names)
        print(f"{r['layer']:22} {r['op']:16} {r['values']:9d}{cells}{extra}")
    for n in names:
        t = tables[n]
        print(f"{n}: {sum(r['diff1'] for r in t)} of {sum(r['values'] for r in t)} values differ "
              f"by 1, {sum(r['diff_more'] for r in t)} by more")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflite", type=Path, default=TFLITE)
    ap.add_argument("--labels", type=Path, default=LABELS)
    ap.add_argument("--images", type=Path, default=DEV)
    ap.add_argument("--layers", type=int, default=0, metavar="N",
                    help="per-layer table over the first N images")
    ap.add_argument("--write", type=Path, metavar="OUT",
                    help="convert into OUT with the dev metrics")
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--json", type=Path, help="write the numbers here as JSON")
    args = ap.parse_args(argv)

    import ternet
    from ternet.conversion import convert
    tmp = Path(tempfile.mkdtemp(prefix="ternet-agree-")) / "model.safetensors"
    report = convert(args.tflite, tmp, labels=args.labels, arch=args.arch)
    model = ternet.load(tmp, threads=1)
    x, y, _ = dev_set(model, args.images)
    o1, o5 = accuracy(model.predict(x), y)
    res = {"images": len(y), "ternet_top1": o1, "ternet_top5": o5,
           "xnnpack": compare(model, report, args.tflite, x, y, builtin=False),
           "builtin": compare(model, report, args.tflite, x, y, builtin=True)}
    print(json.dumps(res, indent=1))
    if args.layers:
        exposed = list(report.source_tensors.values())
        tables = {kind: layer_table(model.file, report.source_tensors,
                                    litert(args.tflite, exposed, kind == "builtin"), x, args.layers)
                  for kind in ("xnnpack", "builtin")}
        res["layers"] = tables
        print_layers(tables)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.write:
        lit = res["xnnpack"]
        metrics = {"dev200_top1": o1, "dev200_top5": o5,
                   "dev200_top1_agreement_with_litert": lit["top1_agreement"],
                   "dev200_max_abs_logit_diff_vs_litert": lit["max_abs_logit_diff"],
                   "reference_litert": {"dev200_top1": lit["litert_top1"],
                                        "dev200_top5": lit["litert_top5"],
                                        "engine": "ai-edge-litert (XNNPACK), 1 thread"}}
        convert(args.tflite, args.write, labels=args.labels, arch=args.arch, metrics=metrics,
                command=f"ternet convert {args.tflite.name} -o {args.write} --labels "
                        f"{args.labels.name} --arch {args.arch}; dev metrics by "
                        f"benchmarks/convert_agreement.py --write {args.write}")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
