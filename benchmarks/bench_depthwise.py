"""Depthwise kernel benchmark: ternet's dw_i8_u8 vs onnxruntime QLinearConv (group=C, NHWC).

    .venv/bin/python benchmarks/bench_depthwise.py [--reps 300] [--threads 1] [--no-ort]

Shapes are MobileNetV2's 3x3 and EfficientNet-Lite0's 5x5 depthwise layers at 224x224, batch 1,
TF SAME padding. Outputs are checked before timing: ternet bit-exact against depthwise_ref;
onnxruntime (com.microsoft QLinearConv, channels_last=1: its NHWC depthwise path) within 1 of it
(it rounds half to even, ternet half up). Reports min and median µs per layer and the load
average; on a shared machine, run under `flock /tmp/ternet-bench.lock`.
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
]


def ort_depthwise(w, bias, zx, mult, zp_out, H, W, stride, pads, threads):
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
    g = helper.make_graph([node], "dw", [helper.make_tensor_value_info("X", TensorProto.UINT8, [1, H, W, C])],
                          [helper.make_tensor_value_info("Y", TensorProto.UINT8, [1, Ho, Wo, C])], inits)
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timeit(fn, reps):
    fn()
    ts = np.empty(reps)
    for i in range(reps):
        t = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t
    return ts.min() * 1e6, np.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()

    import numba
    from ternet import quant
    from ternet.kernels.depthwise import depthwise_ref, make_depthwise
    from ternet.kernels.layout import pad_to
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    print(f"load average at start: {os.getloadavg()}; threads {args.threads}")
    print(f"{'C,H,W,s,k':>20} {'MMAC':>6} | {'ternet min/med µs':>18} {'GMAC/s':>6} | "
          f"{'ORT min/med µs':>16}")
    tot_t, tot_o = 0.0, 0.0
    for C, H, W, s, k in SHAPES:
        rng = np.random.default_rng(C * 1009 + H)
        Ho, pt, pb = quant.conv_padding("same", H, k, s)
        Wo, pl, pr = quant.conv_padding("same", W, k, s)
        x = rng.integers(0, 256, (1, H, W, C), dtype=np.uint8)
        w = rng.integers(-127, 128, (k, k, C)).astype(np.int8)
        bias = rng.integers(-3000, 3000, C).astype(np.int32)
        zx, zp_out = 100, 3
        mult = np.full(C, 0.0003, np.float32)
        ref = depthwise_ref(x, zx, w, bias, mult, zp_out, 0, 255, s, pt, pl, Ho, Wo)
        plan = make_depthwise(w, bias, zx, mult, zp_out, 0, 255, s, pt, pl, H, W, Ho, Wo)
        Cp = pad_to(C)
        xb = np.zeros((1, H, W, Cp), np.uint8)
        xb[..., :C] = x
        out = np.zeros((1, Ho, Wo, Cp), np.uint8)
        plan(xb, out)
        assert np.array_equal(out[..., :C], ref), (C, H, W, s, k)
        tmin, tmed = timeit(lambda: plan(xb, out), args.reps)
        macs = C * Ho * Wo * k * k
        tot_t += tmin
        ort_s = ""
        if not args.no_ort:
            sess = ort_depthwise(w, bias, zx, mult, zp_out, H, W, s, (pt, pl, pb, pr), args.threads)
            y = sess.run(None, {"X": x})[0]
            d = np.abs(y.astype(np.int16) - ref)
            assert d.max() <= 1, (C, H, W, s, k, d.max())
            omin, omed = timeit(lambda: sess.run(None, {"X": x}), args.reps)
            tot_o += omin
            ort_s = f"{omin:7.0f} / {omed:6.0f}"
        print(f"{f'{C},{H},{W},{s},{k}':>20} {macs / 1e6:6.2f} | {tmin:8.0f} / {tmed:7.0f} "
              f"{macs / tmin / 1e3:6.1f} | {ort_s}")
    print(f"{'sum of mins':>20} {'':6} | {tot_t:8.0f}{'':10} {'':6} | {tot_o:7.0f}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
