"""Conversion of models made elsewhere (TFLite, ONNX QDQ) into ternet model files.

Needs the optional `convert` extra; nothing here is imported by `import ternet`. The rules are
in docs/convert.md; `convert` is `ternet.convert` and behind `ternet convert`.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..quant import RULES

from .common import (ConversionError, ConversionReport, GraphBuilder, load_labels,
                     parse_preprocess, preprocess_spec, provenance, resolve_labels, write_atomic)

__all__ = ["convert", "ConversionError", "ConversionReport"]


def source_format(path: Path) -> str:
    """'tflite' (by the flatbuffer's file identifier) or 'onnx' (by the suffix)."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ConversionError(f"{path}: not a TFLite flatbuffer (no 'TFL3' identifier) and not "
                          "named .onnx; ternet converts .tflite and ONNX QDQ models")


def convert(model, out, *, labels=None, preprocess=None, arch: str | None = None,
            ternary: bool = True, metrics: dict | None = None,
            command: str | None = None, requant: str | None = None) -> ConversionReport:
    """Convert a quantized .tflite or ONNX QDQ classifier into the ternet model file `out`.

    labels: a file with one label per line, or a list of strings (default class_0, ...).
    preprocess: `key=value` strings or a dict (resize, crop, interpolation, mean, std; see
    docs/convert.md for the defaults). arch: the architecture name stored in the file (default:
    the source file's stem). ternary: write pointwise layers whose int8 weights are ternary per
    output channel as packed ternary. metrics: measured accuracies to store in the file.
    requant: the requantization rule stored in the file (ternet.quant.RULES); None: the source's
    engine's, "onnxruntime" for ONNX, "ternet" for TFLite (docs/convert.md).
    Raises ConversionError (one line: file, op or tensor, reason); writes nothing then.
    """
    src = Path(model)
    fmt = source_format(src)
    requant = default_requant(fmt) if requant is None else requant
    if requant not in RULES:
        raise ConversionError(f"{src}: unknown requantization rule {requant!r}; expected one of "
                              f"{', '.join(RULES)}")
    builder = GraphBuilder(str(src), ternary=ternary)
    if fmt == "tflite":
        from .from_tflite import build
    else:
        from .from_onnx import build
    raw_input, sources = build(src, builder)
    label_list = labels
    labels_path = None
    if isinstance(labels, (str, Path)):
        labels_path = str(labels)
        label_list = load_labels(labels)
    before = builder.nodes[-1]["attrs"]["cout"]
    final_labels = resolve_labels(builder, label_list, labels_path)
    pre, notes = preprocess_spec(parse_preprocess(preprocess), builder.input_spec, raw_input,
                                 str(src))
    report = ConversionReport(source=str(src), output=str(out), nodes=len(builder.nodes),
                              ternary_layers=list(builder.ternary_layers),
                              background_dropped=builder.nodes[-1]["attrs"]["cout"] != before,
                              source_tensors=sources)
    if report.background_dropped:
        notes.append("classifier: 1001 outputs, the first (background) dropped: 1000 classes")
    if requant != "ternet":
        notes.append(f"requantization: {requant}'s rule (ternet.requant)")
    report.notes = builder.finish_notes() + notes
    extra = {"conversion": report.lines()[1:]} if report.lines()[1:] else {}
    write_atomic(out, arch=arch or _default_arch(src), graph=builder.nodes, tensors=builder.tensors,
                 input_spec=builder.input_spec, preprocess=pre, labels=final_labels,
                 provenance=provenance(src, fmt, command, extra), metrics=metrics,
                 requant=requant)
    return report


def default_requant(fmt: str) -> str:
    """The rule a converted file gets by default: that of the engine the source format is run
    on (ONNX: onnxruntime's MLAS; TFLite: none of ternet's rules matches XNNPACK / gemmlowp
    exactly, so ternet's own)."""
    return "onnxruntime" if fmt == "onnx" else "ternet"


def _default_arch(src: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", src.stem) or "converted"
