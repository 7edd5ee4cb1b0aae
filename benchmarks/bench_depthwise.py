"""Depthwise kernel benchmark: ternet's depthwise kernels vs onnxruntime QLinearConv (group=C, NHWC).

    flock /tmp/ternet-bench.lock .venv/bin/python benchmarks/bench_depthwise.py [--reps 300]
        [--threads 1] [--impls vnni,pairs] [--pad auto|yes|no] [--batch 1] [--no-ort]

Shapes are MobileNetV2's 3x3 and EfficientNet-Lite0's 5x5 depthwise layers at 224x224, TF SAME
padding. --impls: kernel layouts of ternet.kernels.depthwise.DRIVERS (default: every one this CPU
runs natively); --pad: the bordered input copy as the plan chooses it, always, or never.
Outputs are checked before timing: ternet bit-exact against depthwise_ref; onnxruntime
(com.microsoft QLinearConv, channels_last=1: its NHWC depthwise path) within 1 of it (it rounds
half to even, ternet half up). The kernels are timed interleaved (one call each per round) and
min and median µs per layer are reported, with the CPU and the load average; on a shared machine,
run under `flock /tmp/ternet-bench.lock`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (C, H, W, stride, k): MobileNetV2 3x3 (as in research/kernels.md 5), EfficientNet-Lite0 5x5
SHAPES = [
    (96, 112, 112, 2, 3), (144, 56, 56, 1, 3), (384, 14, 14, 1, 3), (960, 7, 7, 1, 3),
    (144, 56, 56, 2, 5), (240, 28, 28, 1, 5), (480, 14, 14, 1, 5), (672, 14, 14, 2, 5),
    (1152, 7, 7, 1, 5),
    # the rest of Lite0's depthwise layers
    (32, 112, 112, 1, 3), (240, 28, 28, 2, 3), (480, 14, 14, 1, 3), (672, 14, 14, 1, 5),
    (1152, 7, 7, 1, 3),
]


def ort_depthwise(w, bias, zx, mult, zp_out, H, W, stride, pads, threads, N=1):
    """onnxruntime session computing y = sat(round(acc * mult) + zp_out), acc = bias + sum w*(x - zx)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    k, _, C = w.shape
    pt, pl, pb, pr = pads
    Ho = (H + pt + pb - k) // stride + 1
    Wo = (W + pl + pr - k) // stride + 1
    inits = [
        numpy_helper.from_array(np.asarray(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.asarray(zx, np.uint8), "xz"),
        numpy_helper.from_array(np.ascontiguousarray(w.transpose(2, 0, 1)[:, None]).astype(np.int8), "W"),
        numpy_helper.from_array(mult.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(C, np.int8), "wz"),
        numpy_helper.from_array(np.asarray(1.0, np.float32), "ys"),
        numpy_helper.from_array(np.asarray(zp_out, np.uint8), "yz"),
        numpy_helper.from_array(bias.astype(np.int32), "B"),
    ]
    node = helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"], ["Y"],
                            domain="com.microsoft", channels_last=1, group=C, kernel_shape=[k, k],
                            strides=[stride, stride], pads=[pt, pl, pb, pr])
    g = helper.make_graph([node], "dw", [helper.make_tensor_value_info("X", TensorProto.UINT8, [N, H, W, C])],
                          [helper.make_tensor_value_info("Y", TensorProto.UINT8, [N, Ho, Wo, C])], inits)
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timeit(fns, reps):
    """{name: (min, median) µs} of the callables in fns, interleaved: one call each per round."""
    for fn in fns.values():
        fn()
    ts = {name: np.empty(reps) for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name][i] = time.perf_counter() - t
    return {name: (t.min() * 1e6, np.median(t) * 1e6) for name, t in ts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--impls", help="comma-separated kernel layouts (default: all native here)")
    ap.add_argument("--pad", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()

    import numba
    from ternet import quant
    from ternet.kernels import cpu
    from ternet.kernels.depthwise import depthwise_ref, make_depthwise
    from ternet.kernels.layout import pad_to
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    impls = args.impls.split(",") if args.impls else (
        ["vnni", "pairs"] if cpu.has_avx512vnni() else ["pairs"])
    pad = {"auto": None, "yes": True, "no": False}[args.pad]
    N = args.batch

    print(f"CPU: {cpu.cpu_name()} ({cpu.cpu_class()}); load average at start: {os.getloadavg()}; "
          f"threads {args.threads}, batch {N}, pad {args.pad}, {args.reps} interleaved reps")
    cols = impls + ([] if args.no_ort else ["ort"])
    print(f"{'C,H,W,s,k':>18} {'MMAC':>6} |" + "".join(f" {c + ' min/med µs':>19} {'GMAC/s':>6} |" for c in cols))
    tot = {c: 0.0 for c in cols}
    for C, H, W, s, k in SHAPES:
        rng = np.random.default_rng(C * 1009 + H)
        Ho, pt, pb = quant.conv_padding("same", H, k, s)
        Wo, pl, pr = quant.conv_padding("same", W, k, s)
        x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
        w = rng.integers(-127, 128, (k, k, C)).astype(np.int8)
        bias = rng.integers(-3000, 3000, C).astype(np.int32)
        zx, zp_out = 100, 3
        mult = np.full(C, 0.0003, np.float32)
        ref = depthwise_ref(x, zx, w, bias, mult, zp_out, 0, 255, s, pt, pl, Ho, Wo)
        Cp = pad_to(C)
        xb = np.zeros((N, H, W, Cp), np.uint8)
        xb[..., :C] = x
        fns = {}
        for impl in impls:
            plan = make_depthwise(w, bias, zx, mult, zp_out, 0, 255, s, pt, pl, H, W, Ho, Wo,
                                  pad_input=pad, impl=impl)
            out = np.zeros((N, Ho, Wo, Cp), np.uint8)
            plan(xb, out)
            assert np.array_equal(out[..., :C], ref), (impl, C, H, W, s, k)
            fns[impl] = lambda plan=plan, out=out: plan(xb, out)
        if not args.no_ort:
            sess = ort_depthwise(w, bias, zx, mult, zp_out, H, W, s, (pt, pl, pb, pr), args.threads, N)
            y = sess.run(None, {"X": x})[0]
            d = np.abs(y.astype(np.int16) - ref)
            assert d.max() <= 1, (C, H, W, s, k, d.max())
            fns["ort"] = lambda sess=sess: sess.run(None, {"X": x})
        res = timeit(fns, args.reps)
        macs = N * C * Ho * Wo * k * k
        cells = ""
        for c in cols:
            tmin, tmed = res[c]
            tot[c] += tmin
            cells += f" {tmin:9.0f} / {tmed:7.0f} {macs / tmin / 1e3:6.1f} |"
        print(f"{f'{C},{H},{W},{s},{k}':>18} {macs / 1e6:6.2f} |" + cells)
    print(f"{'sum of mins':>18} {'':6} |" + "".join(f" {tot[c]:9.0f}{'':10} {'':6} |" for c in cols))
    for c in cols[1:]:
        print(f"sum of mins {cols[0]} / {c}: {tot[cols[0]] / tot[c]:.2f}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
