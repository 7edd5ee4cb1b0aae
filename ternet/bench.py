"""Latency benchmark of a loaded model: whole-network median and a per-layer breakdown.

Compile time is reported separately (first call), warm-up runs are discarded, and the
machine's load average is printed: on a shared 2-core machine it explains outliers.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .text import printable


def _median_ms(fn, rounds: int) -> tuple[float, float]:
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3), float(np.min(ts) * 1e3)


def bench_model(model, batch: int = 1, rounds: int = 30, seed: int = 0) -> dict:
    """{'compile_s', 'median_ms', 'min_ms', 'layers': [(name, op, median_us)], ...}."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch,) + model.input_shape, dtype=np.uint8)
    t = time.perf_counter()
    model.predict(x)
    compile_s = time.perf_counter() - t
    for _ in range(3):
        model.predict(x)
    med, best = _median_ms(lambda: model.predict(x), rounds)
    layers = []
    if model.kernels != "reference":
        v = model._arena(batch)
        v[0] = x.reshape(-1, 3)
        logits = np.empty((batch, model.num_classes), np.float32)
        for name, layer in zip(model.layer_names, model.layers):
            op = type(layer).__name__
            op = {"Conv": "conv2d", "Pointwise": "pointwise", "PointwiseAdd": "pointwise+add",
                  "Depthwise": "depthwise", "Add": "add", "GlobalAvgPool": "global_avg_pool",
                  "Linear": "linear"}.get(op, op)
            args = (v, batch, logits) if op == "linear" else (v, batch)
            us = _median_ms(lambda: layer.run(*args), max(5, rounds // 2))[0] * 1e3
            layers.append((name, op, us))
    return dict(batch=batch, threads=model.thread_count, kernels=model.kernels,
                compile_s=compile_s, median_ms=med, min_ms=best, layers=layers,
                loadavg=os.getloadavg()[0])


def format_report(r: dict, per_layer: bool = True) -> str:
    """Human-readable report of `bench_model`'s dict: a summary line, time per op, and a
    per-layer table whose columns fit the longest layer name (fused names like 'a+b' are long)."""
    lines = [f"kernels={r['kernels']} batch={r['batch']} threads={r['threads']}: "
             f"median {r['median_ms']:.3f} ms, min {r['min_ms']:.3f} ms "
             f"(first call incl. compile/cache load {r['compile_s']:.2f} s, loadavg {r['loadavg']:.2f})"]
    if per_layer and r["layers"]:
        total = sum(us for _, _, us in r["layers"]) or 1.0
        by_op: dict = {}
        for name, op, us in r["layers"]:
            by_op[op] = by_op.get(op, 0.0) + us
        lines.append("per op: " + ", ".join(f"{op} {us / 1e3:.3f} ms ({100 * us / total:.0f}%)"
                                            for op, us in sorted(by_op.items(), key=lambda t: -t[1])))
        lines += _layer_table(r["layers"])
    return "\n".join(lines)


def _layer_table(layers) -> list[str]:
    """`layer  op  us` rows, names escaped (they come from the model file), columns aligned."""
    rows = [(printable(name), printable(op), f"{us:.1f}") for name, op, us in layers]
    header = ("layer", "op", "us")
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}" for a, b, c in [header, *rows]]
