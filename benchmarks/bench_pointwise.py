"""Pointwise (1x1) kernels on the 14 MobileNetV2 layers of docs/kernels.md, against onnxruntime.

    flock /tmp/ternet-bench.lock .venv/bin/python benchmarks/bench_pointwise.py [--threads 1] [--int8]
        [--impls vnni,amx,ort] [--model efficientnet_lite0_prom] [--batch 8]

The machine is shared: always run under that `flock` so two benchmarks never overlap, and read
the load averages printed at the start and end. Batch 1, ternary weights with ~50% zeros,
full-range uint8 activations. Every kernel's output is checked against the reference (ORT's
within +-1: it rounds half to even) before timing; timings are the median of interleaved rounds.

--int8: full-range int8 weights (uniform in [-127, 127], as quant.quantize_weights_int8 makes
them); `avx2` then runs the int8 kernel avx2i8. ORT's int8-weight (u8s8) AVX2 GEMM uses the
saturating vpmaddubsw, so with such weights it is *not* exact: `ort` is timed anyway and its
mismatch reported; `ort-u8` feeds the same weights as uint8 with zero point 128, ORT's exact
(u8u8, int16 vpmaddwd) path, the like-for-like comparison.

`amx` is the AMX-INT8 kernel on every layer (what cpu.pointwise_isa chooses between it and `vnni`
is measured with this); --model takes the distinct pointwise shapes of a ternet model instead of
the MobileNetV2 list, --batch multiplies the pixels (N images of H x W).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numba
import numpy as np

from ternet import quant
from ternet.kernels import cpu, vnni
from ternet.kernels.layout import ROW_SLACK

try:
    from ternet.kernels.pointwise import make_pointwise, pointwise_ref
except ImportError:     # the portable kernels are not there yet: only the vnni/avx2 plans
    make_pointwise = None

    def pointwise_ref(x, zx, w, bias, mult, zp_out, lo, hi):
        acc = np.asarray(bias, np.int64) + (x.astype(np.int64) - zx) @ w.T.astype(np.int64)
        return quant.requant_ref(acc.astype(np.int32), mult, zp_out, lo, hi)

# (Cin, Cout, H*W)
LAYERS = [(32, 16, 112**2), (16, 96, 112**2), (96, 24, 56**2), (24, 144, 56**2), (144, 24, 56**2),
          (144, 32, 28**2), (192, 32, 28**2), (32, 192, 28**2), (384, 64, 14**2), (64, 384, 14**2),
          (576, 96, 14**2), (960, 160, 7**2), (160, 960, 7**2), (320, 1280, 7**2)]
IMPLS = ("vnni", "avx2", "addonly", "ort")
INT8_IMPLS = ("vnni", "avx2", "plain", "ort", "ort-u8")


def make_layer(cin, cout, P, seed, int8=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (P, cin), dtype=np.uint8)
    if int8:
        w = rng.integers(-127, 128, (cout, cin), dtype=np.int8)
    else:
        w = rng.choice(np.array([-1, 0, 1], np.int8), (cout, cin), p=[0.25, 0.5, 0.25])
    bias = rng.integers(-2000, 2000, cout, dtype=np.int32)
    zx, zp_out = int(rng.integers(0, 256)), int(rng.integers(64, 192))
    acc = bias + (x.astype(np.int64) - zx) @ w.T.astype(np.int64)
    # outputs spread over the uint8 range instead of saturating (cf. TFLite PickReasonableMultiplier)
    mult = (rng.uniform(0.5, 1.0, cout) * 255 / max(1, acc.max() - acc.min())).astype(np.float32)
    return x, w, bias, zx, mult, zp_out


def make_plan(impl, w, bias, zx, mult, zp_out):
    if impl == "amx":
        return vnni.make_pw_vnni(w, bias, zx, mult, zp_out, 0, 255, isa="amx", by_size=False)
    if make_pointwise is not None:
        return make_pointwise(w, bias, zx, mult, zp_out, 0, 255, impl)
    if impl in ("vnni", "avx2"):
        return vnni.make_pw_vnni(w, bias, zx, mult, zp_out, 0, 255,
                                 isa="avx512vnni" if impl == "vnni" else "avx2")
    raise RuntimeError("ternet.kernels.pointwise not available")


def model_layers(name):
    """Distinct (Cin, Cout, H*W) of the pointwise layers of a ternet model, in network order."""
    import ternet
    from ternet.ops.pointwise import PointwiseAddStep, PointwiseStep
    m = ternet.load(name)
    out = []
    for layer in m.layers:
        if isinstance(layer, (PointwiseStep, PointwiseAddStep)):
            plan = getattr(layer.plan, "pw", layer.plan)
            shape = (plan.cin, plan.cout, layer.shape.h * layer.shape.w)
            if shape not in out:
                out.append(shape)
    return out


def ort_qlinearconv(x, w, bias, zx, mult, zp_out, side, threads, u8_weights=False, batch=1):
    """com.microsoft QLinearConv channels_last=1 (NHWC), bound to preallocated input and output.
    x_scale = y_scale = 1 and w_scale = mult give y = acc * mult + zp_out, our requant up to ties.
    u8_weights: w + 128 as uint8 with zero point 128 (same products, ORT's u8u8 kernels)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    cout, cin = w.shape
    if u8_weights:
        wq, wz = (w.astype(np.int16) + 128).astype(np.uint8), np.full(cout, 128, np.uint8)
    else:
        wq, wz = w, np.zeros(cout, np.int8)
    inits = [numpy_helper.from_array(np.asarray(1.0, np.float32), "xs"),
             numpy_helper.from_array(np.asarray(zx, np.uint8), "xz"),
             numpy_helper.from_array(wq.reshape(cout, cin, 1, 1), "W"),
             numpy_helper.from_array(mult, "ws"),
             numpy_helper.from_array(wz, "wz"),
             numpy_helper.from_array(np.asarray(1.0, np.float32), "ys"),
             numpy_helper.from_array(np.asarray(zp_out, np.uint8), "yz"),
             numpy_helper.from_array(bias, "B")]
    node = helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"], ["Y"],
                            domain="com.microsoft", channels_last=1, kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node], "pw", [helper.make_tensor_value_info("X", TensorProto.UINT8, [batch, side, side, cin])],
        [helper.make_tensor_value_info("Y", TensorProto.UINT8, [batch, side, side, cout])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xin = np.ascontiguousarray(x.reshape(batch, side, side, cin))
    yout = np.empty((batch, side, side, cout), np.uint8)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(xin))
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(yout))
    return (lambda: sess.run_with_iobinding(binding)), yout.reshape(-1, cout)


def setup_layer(cin, cout, P, impls, threads, seed, int8=False, batch=1):
    """({impl: callable} for the impls that can run here, {impl: why skipped}, {impl: max |diff|}
    of ORT runs that are inexact (int8 weights only; ternary ORT must be within +-1))."""
    x, w, bias, zx, mult, zp_out = make_layer(cin, cout, P, seed, int8)
    want = pointwise_ref(x, zx, w, bias, mult, zp_out, 0, 255)
    runs, skipped, inexact = {}, {}, {}
    for impl in impls:
        try:
            if impl in ("ort", "ort-u8"):
                fn, got = ort_qlinearconv(x, w, bias, zx, mult, zp_out, math.isqrt(P // batch), threads,
                                          u8_weights=impl == "ort-u8", batch=batch)
                fn()
                diff = int(np.abs(got.astype(np.int16) - want).max())
                if diff > 1:
                    assert int8, f"{impl} differs from the reference by {diff}"
                    inexact[impl] = diff
            else:
                plan = make_plan(impl, w, bias, zx, mult, zp_out)
                xb = np.zeros((P + ROW_SLACK, plan.cin_p), np.uint8)
                xb[:P, :cin] = x
                out = np.full((P + ROW_SLACK, plan.cout_p), 0xA5, np.uint8)
                fn = (lambda plan=plan, xb=xb, out=out: plan(xb, P, out))
                fn()
                got = out[:P, :cout]
                assert np.array_equal(got, want), f"{impl} differs from the reference"
            runs[impl] = fn
        except (ImportError, RuntimeError, ValueError) as e:
            skipped[impl] = str(e).splitlines()[0][:100]
    return runs, skipped, inexact


def time_layer(runs, rounds, sample_s):
    """Median and min seconds per call, rounds interleaved across the impls."""
    reps = {}
    for impl, fn in runs.items():                     # calibrate each sample to >= sample_s
        n, t = 1, 0.0
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t = time.perf_counter() - t0
            if t >= sample_s or n >= 1 << 16:
                break
            n *= 2
        reps[impl] = n
    samples = {impl: [] for impl in runs}
    for _ in range(rounds):
        for impl, fn in runs.items():
            n = reps[impl]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[impl].append((time.perf_counter() - t0) / n)
    return {impl: (float(np.median(s)), min(s)) for impl, s in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sample-ms", type=float, default=2.0, help="minimum duration of one sample")
    ap.add_argument("--impls", help=f"default {','.join(IMPLS)}; with --int8 {','.join(INT8_IMPLS)}")
    ap.add_argument("--int8", action="store_true", help="full-range int8 weights instead of ternary")
    ap.add_argument("--model", help="the pointwise shapes of this ternet model (name or file)")
    ap.add_argument("--batch", type=int, default=1, help="images per call (P = batch * H * W)")
    args = ap.parse_args(argv)
    impls = [i for i in (args.impls or ",".join(INT8_IMPLS if args.int8 else IMPLS)).split(",") if i]
    numba.set_num_threads(args.threads)
    layers = model_layers(args.model) if args.model else LAYERS
    print(f"threads={args.threads} rounds={args.rounds} weights={'int8' if args.int8 else 'ternary'} "
          f"batch={args.batch} shapes={args.model or 'MobileNetV2'}\n"
          f"cpu: {cpu.cpu_name()} ({cpu.cpu_class()}) avx512vnni={cpu.has_avx512vnni()} "
          f"avx2={cpu.has_avx2()} amx={cpu.has_amx()} loadavg(start)={os.getloadavg()}")
    head = f"{'layer (Cin->Cout @HxW)':24}{'MMAC':>7}" + "".join(f"{i:>16}" for i in impls)
    print(head + "   (us, median / min)")
    sums = {i: [0.0, 0.0] for i in impls}
    complete = {i: True for i in impls}
    skipped_all, inexact_all = {}, {}
    for k, (cin, cout, hw) in enumerate(layers):
        P = args.batch * hw
        runs, skipped, inexact = setup_layer(cin, cout, P, impls, args.threads, seed=k, int8=args.int8,
                                             batch=args.batch)
        skipped_all.update(skipped)
        for i, d in inexact.items():
            inexact_all[i] = max(d, inexact_all.get(i, 0))
        res = time_layer(runs, args.rounds, args.sample_ms / 1e3)
        cells = []
        for i in impls:
            if i in res:
                sums[i][0] += res[i][0]
                sums[i][1] += res[i][1]
                cells.append(f"{res[i][0] * 1e6:9.1f} /{res[i][1] * 1e6:5.0f}")
            else:
                complete[i] = False
                cells.append(f"{'n/a':>16}")
        side = math.isqrt(hw)
        print(f"{f'{cin}->{cout} @{side}x{side}':24}{cin * cout * P / 1e6:7.1f}" + "".join(cells))
    for k, label in ((0, "sum (median)"), (1, "sum (min)")):
        print(label.ljust(31) + "".join(
            f"{sums[i][k] * 1e6:16.0f}" if complete[i] else f"{'n/a':>16}" for i in impls))
    for name, (a, b) in {"vnni/ort": ("vnni", "ort"), "amx/vnni": ("amx", "vnni"), "amx/ort": ("amx", "ort"),
                         "avx2/ort": ("avx2", "ort"),
                         "avx2/ort-u8": ("avx2", "ort-u8"), "plain/avx2": ("plain", "avx2"),
                         "addonly/vnni": ("addonly", "vnni"), "addonly/avx2": ("addonly", "avx2")}.items():
        if a in impls and b in impls and complete[a] and complete[b]:
            print(f"ratio {name}: {sums[a][0] / sums[b][0]:.2f} (median sums), "
                  f"{sums[a][1] / sums[b][1]:.2f} (min sums)")
    for i, why in skipped_all.items():
        print(f"skipped {i}: {why}")
    for i, d in inexact_all.items():
        print(f"INEXACT {i}: differs from the reference by up to {d} (int16 saturation)")
    print(f"loadavg(end)={os.getloadavg()}")


if __name__ == "__main__":
    main()
