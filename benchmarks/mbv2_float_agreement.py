"""The float MobileNetV2 of ternet.train (the int8 TFLite file dequantized) against LiteRT running
that int8 file, on the ImageNet dev images (reporting only: nothing is fitted to them).

    python benchmarks/mbv2_float_agreement.py [--tflite FILE] [--shared DIR]

Both get the same uint8 inputs (ternet's preprocessing: shorter side 256, centre crop 224, raw
RGB pixels). Reported: top-1 / top-5 of each, top-1 agreement, the largest |logit difference|
with LiteRT (logits LiteRT clamps to its int8 range left out) and between the torch model and
its BN-folded QuantGraph in float mode (the teacher that PTQ / QAT use: the same network).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_agreement import accuracy, litert, litert_logits  # noqa: E402


def classifier_tensor(path) -> int:
    """The TFLite tensor holding the classifier's logits (output of the last conv / FC op)."""
    from ternet.conversion.tflite_reader import read_tflite
    ops = [op for op in read_tflite(path).ops if op.opcode in ("CONV_2D", "FULLY_CONNECTED")]
    return ops[-1].outputs[0]


def main(argv=None) -> int:
    import torch
    from ternet.train.data import load_dev, set_locations
    from ternet.train.fakequant import QuantGraph
    from ternet.train.fold import fold_model
    from ternet.train.models import (MobileNetV2, input_qparams, mbv2_tflite_path, preprocess_of,
                                     set_mbv2_tflite)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflite", help="int8 MobileNetV2 .tflite (default: as ternet.train finds it)")
    ap.add_argument("--shared", help="shared folder with the dev images (as ternet.train)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    set_locations(a.shared, None)
    set_mbv2_tflite(a.tflite)
    path = mbv2_tflite_path()
    scale, zp = input_qparams("mobilenet_v2")
    x, y, _ = load_dev(preprocess_of("mobilenet_v2"),
                       {"scale": scale, "zero_point": zp, "height": 224, "width": 224})
    model = MobileNetV2.pretrained(path)
    graph = QuantGraph(fold_model(model), scale, zp)
    graph.mode = "float"
    with torch.no_grad():
        real = (x - zp) * scale
        ours = model(real).double().numpy()
        folded = graph(real).double().numpy()
    tensor = classifier_tensor(path)
    theirs, clamped = litert_logits(litert(path, [tensor]), x.permute(0, 2, 3, 1).numpy().astype(np.uint8),
                              tensor, drop_background=True)
    f1, f5 = accuracy(ours, y)
    l1, l5 = accuracy(theirs, y)
    print(json.dumps({"images": len(y), "float_top1": f1, "float_top5": f5, "litert_top1": l1,
                      "litert_top5": l5,
                      "top1_agreement": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
                      "max_abs_logit_diff_float_vs_litert": float(np.abs(ours - theirs)[~clamped].max()),
                      "max_abs_logit_diff_folded_vs_torch": float(np.abs(ours - folded).max())},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
