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


def layer_kernel(layer, batch: int) -> str:
    """Which kernel a built layer runs for a batch: 'amx', 'vnni', 'avx2', 'addonly', ... (the
    pointwise ISA an AMX plan picks for this many pixels; '+pad': depthwise with the bordered
    input copy; 'im2col+...': the stem)."""
    from .kernels import cpu
    from .kernels.vnni import ISAS, PwVnniPlan
    plan = getattr(layer.plan, "pw", layer.plan)        # PwAddPlan, ConvPlan wrap a pointwise plan
    prefix = "im2col+" if plan is not layer.plan and hasattr(layer.plan, "cols") else ""
    if isinstance(plan, PwVnniPlan):
        rows = batch * (layer.plan.Ho * layer.plan.Wo if prefix else layer.shape.h * layer.shape.w)
        return prefix + ISAS[plan._work(rows)[0]].impl
    impl = getattr(plan, "impl", None)
    if impl == "pairs":                  # the 256-bit depthwise layout: AVX2, or its portable IR
        impl = "avx2" if cpu.has_avx2() else "portable"
    if impl and getattr(plan, "padded", False):
        impl += "+pad"
    return prefix + (impl or "plain")


def bench_model(model, batch: int = 1, rounds: int = 30, seed: int = 0) -> dict:
    """{'compile_s', 'median_ms', 'min_ms', 'layers': [(name, op, median_us)], 'layer_kernels':
    [kernel of each layer], 'cpu', ...}."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch,) + model.input_shape, dtype=np.uint8)
    t = time.perf_counter()
    model.predict(x)
    compile_s = time.perf_counter() - t
    for _ in range(3):
        model.predict(x)
    med, best = _median_ms(lambda: model.predict(x), rounds)
    layers, kernels = [], []
    if model.kernels != "reference":
        v = model.arena(batch)
        v[0] = x.reshape(-1, 3)
        logits = np.empty((batch, model.num_classes), np.float32)
        steps = model.layers
        for name, layer in zip(model.layer_names, steps):
            op = layer.op
            args = (v, batch, logits) if layer is steps[-1] else (v, batch)
            us = _median_ms(lambda: layer.run(*args), max(5, rounds // 2))[0] * 1e3
            layers.append((name, op, us))
            kernels.append(layer_kernel(layer, batch))
    from .kernels import cpu
    return dict(batch=batch, threads=model.thread_count, kernels=model.kernels,
                compile_s=compile_s, median_ms=med, min_ms=best, layers=layers,
                layer_kernels=kernels, loadavg=os.getloadavg()[0],
                cpu=f"{cpu.cpu_name()} ({cpu.cpu_class()})")


def format_report(r: dict, per_layer: bool = True) -> str:
    """Human-readable report of `bench_model`'s dict: a summary line, time per op, and a
    per-layer table whose columns fit the longest layer name (fused names like 'a+b' are long)."""
    lines = [f"kernels={r['kernels']} batch={r['batch']} threads={r['threads']}: "
             f"median {r['median_ms']:.3f} ms, min {r['min_ms']:.3f} ms "
             f"(first call incl. compile/cache load {r['compile_s']:.2f} s, loadavg {r['loadavg']:.2f})"
             + (f" on {printable(r['cpu'])}" if r.get("cpu") else "")]
    if per_layer and r["layers"]:
        total = sum(us for _, _, us in r["layers"]) or 1.0
        by_op: dict = {}
        for name, op, us in r["layers"]:
            by_op[op] = by_op.get(op, 0.0) + us
        lines.append("per op: " + ", ".join(f"{op} {us / 1e3:.3f} ms ({100 * us / total:.0f}%)"
                                            for op, us in sorted(by_op.items(), key=lambda t: -t[1])))
        lines += _layer_table(r["layers"], r.get("layer_kernels"))
    return "\n".join(lines)


def _layer_table(layers, kernels=None) -> list[str]:
    """`layer  op  [kernel]  us` rows, names escaped (they come from the model file), columns
    aligned; the kernel column when `kernels` gives one per layer."""
    rows = [(printable(name), printable(op), f"{us:.1f}") for name, op, us in layers]
    header = ("layer", "op", "us")
    if kernels is not None and len(kernels) == len(rows):
        rows = [(a, b, k, c) for (a, b, c), k in zip(rows, kernels)]
        header = ("layer", "op", "kernel", "us")
    n = len(header)
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(n)]
    return ["  ".join(f"{v:<{w[i]}}" if i < n - 1 else f"{v:>{w[i]}}" for i, v in enumerate(row))
            for row in [header, *rows]]
