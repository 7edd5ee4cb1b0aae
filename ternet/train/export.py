"""Exporter: QuantGraph -> ternet model file v1 (docs/format.md) via ternet.format.write_model.

All numbers come from `QuantGraph.int_params()` (the same ones the exact integer emulation
uses); this module only converts layouts: conv2d [cout, k, k, cin], depthwise [k, k, C],
pointwise int8 [cout, cin] / ternary packed 2-bit / hybrid (ternary + int8 rows), linear.
"""
from __future__ import annotations

import numpy as np

from ternet.format import pack_ternary, write_model
from .fakequant import WEIGHTED, QuantGraph, requantized


def model_tensors(g: QuantGraph) -> tuple[list, dict]:
    P = g.int_params()
    graph, t = [], {}
    for n in g.spec:
        name, op, p = n["name"], n["op"], P[n["name"]]
        attrs = dict(n["attrs"])
        if op in WEIGHTED:
            q = p["q"].astype(np.int8)
            if op == "conv2d":
                w = q.transpose(0, 2, 3, 1)
            elif op == "depthwise":
                w = q[:, 0].transpose(1, 2, 0)
            elif op == "pointwise":
                q2 = q.reshape(q.shape[0], -1)
                mode = g.wmode[name]
                attrs = {"cin": attrs["cin"], "cout": attrs["cout"], "weight": mode,
                         "activation": attrs["activation"]}
                if mode == "int8":
                    w = q2
                elif mode == "ternary":
                    w = pack_ternary(q2)
                else:
                    rows = p["rows"]
                    tern = q2.copy()
                    tern[rows] = 0
                    w = pack_ternary(tern)
                    t[f"{name}.int8_channels"] = rows.astype(np.int32)
                    t[f"{name}.weight_int8"] = np.ascontiguousarray(q2[rows])
            else:
                w = q
            t[f"{name}.weight"] = np.ascontiguousarray(w)
            t[f"{name}.bias"] = p["bias"].astype(np.int32)
            t[f"{name}.weight_scale"] = p["s_w"].astype(np.float32)
        if requantized(op):
            t[f"{name}.output_scale"] = np.array([p["s_out"]], np.float32)
            t[f"{name}.output_zero_point"] = np.array([p["zp"]], np.int32)
        graph.append({"name": name, "op": op, "inputs": list(n["inputs"]), "attrs": attrs})
    return graph, t


def export(g: QuantGraph, path, *, arch: str, size: int, preprocess: dict, labels, provenance: dict,
           metrics: dict | None = None) -> None:
    graph, tensors = model_tensors(g)
    input_spec = {"height": size, "width": size, "channels": 3, "layout": "NHWC", "dtype": "uint8",
                  "scale": g.input_scale, "zero_point": g.input_zp}
    write_model(path, arch=arch, graph=graph, tensors=tensors, input_spec=input_spec,
                preprocess=preprocess, labels=labels, provenance=provenance, metrics=metrics)
