"""The `ternet` command line: classify, warmup, bench, models, info, convert.

Conventions: results go to stdout and nothing else does; notices, progress and errors go to
stderr as `ternet: ...` lines. Exit codes: 0 success, 1 a model or any input failed (the other
inputs are still processed and reported), 2 usage error, 130 interrupted. Tracebacks only with
TERNET_DEBUG=1. Heavy modules (numba, Pillow, safetensors) are imported inside the commands so
that `ternet --help` and `ternet --version` stay fast and never compile anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import config
from .errors import SettingError
from .kernels.cpu import REQUESTS
from .text import printable

PROGRESS_MIN = 8            # show a progress counter from this many images (TTY only)
COMPILE_ESTIMATE_S = 60     # cold compile measured 30-90 s on the 2-core dev box (load-dependent)


class CliError(Exception):
    """A failure reported as one `ternet: error: ...` line with exit status `code`."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def _debug() -> bool:
    return config.get("TERNET_DEBUG")          # checked at the start of main


def _err(msg: str) -> None:
    _Progress.clear_line()
    print(f"ternet: {printable(msg)}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:           # a broken install must still answer --version
        return "unknown"


# ------------------------------------------------------------------------------ helpers

class _Progress:
    """`[12/120] name` on stderr, rewritten in place; only on a TTY, only for many images."""
    _active = False

    def __init__(self, total: int, quiet: bool):
        self.total = total
        self.on = (not quiet and total >= PROGRESS_MIN and sys.stderr.isatty())

    def update(self, done: int, name: str) -> None:
        if self.on:
            line = f"[{done}/{self.total}] {printable(name)}"
            sys.stderr.write("\r\x1b[K" + line[:200])
            sys.stderr.flush()
            _Progress._active = True

    @staticmethod
    def clear_line() -> None:
        if _Progress._active:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            _Progress._active = False


def _image_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """Expand directories recursively (preprocess.IMAGE_EXTENSIONS only, sorted); files kept
    as given.

    Returns (inputs, empty_dirs)."""
    from .preprocess import IMAGE_EXTENSIONS
    out, empty = [], []
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)          # a missing or non-image file is reported when read
            continue
        found = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            found += [os.path.join(root, f) for f in files
                      if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if found:
            out += sorted(found)
        else:
            empty.append(p)
    return out, empty


def _load_model(name: str | None, threads=None, kernels=None):
    """Load a model or raise CliError with one line naming the file and the reason."""
    import ternet
    from .catalog import default_model
    from .format import ModelFormatError

    name = name or default_model()
    try:
        return ternet.load(name, threads=threads, kernels=kernels)
    except SettingError as e:                 # e.g. TERNET_NUM_THREADS=0: a usage error
        raise CliError(str(e), code=2) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError, ModelFormatError) as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"{name}: cannot read model file ({e})") from None
    except (ValueError, RuntimeError) as e:   # e.g. kernels unsupported on this CPU
        raise CliError(f"{name}: {e}") from None


def _compile_notice(model, quiet: bool, batch: int = 1):
    """Print the first-run notice if the kernel cache looks cold; return the marker key (None
    when a replay serves this batch size: then numba is not even imported)."""
    from . import jitcache
    if model.replay_ready(batch):
        return None
    sig = jitcache.model_signature(model.file)
    if not quiet and not jitcache.is_warm(model.kernels, sig):
        _err(f"compiling kernels for this CPU (first run only, ~{COMPILE_ESTIMATE_S} s)...")
    return sig


# ------------------------------------------------------------------------------ classify

def _format_table(path: str, preds) -> str:
    rows = [printable(path)]                 # paths and labels are escaped: see ternet/text.py
    for p in preds:
        label = printable(p.label)
        rows.append(f"  {p.rank:>2}  {100 * p.probability:6.2f}%  {p.index:>5}  {label}")
    return "\n".join(rows)


def cmd_classify(args) -> int:
    import numpy as np

    from . import jitcache
    from .predictions import top_k

    def emit(path, preds=None, error=None):
        _Progress.clear_line()
        if args.json:
            rec = {"path": path}
            if error is None:
                rec["predictions"] = [p.as_dict() for p in preds]
            else:
                rec["error"] = error
            print(json.dumps(rec), flush=True)
        elif error is None:
            print(_format_table(path, preds) + "\n", flush=True)

    inputs, empty = _image_files(args.inputs)
    failed = len(empty)
    for d in empty:
        _err(f"error: {d}: no image files found")
        emit(d, error="no image files found")
    if not inputs:
        return 1
    model = _load_model(args.model, args.threads, args.kernels)
    labels = model.labels
    sig = None
    progress = _Progress(len(inputs), args.quiet)
    first = True

    for start in range(0, len(inputs), args.batch_size):
        chunk = inputs[start:start + args.batch_size]
        xs, errors = {}, {}          # position in chunk -> model input / error message
        for i, path in enumerate(chunk):
            progress.update(start + i + 1, path)
            try:
                xs[i] = model.preprocess(path)
            except Exception as e:     # any failure to read one image is that image's failure
                if _debug():
                    import traceback
                    traceback.print_exc()
                reason = str(e).removeprefix(f"{path}: ") or type(e).__name__
                _err(f"error: {path}: {reason}")
                errors[i] = reason
                failed += 1
        logits = {}
        if xs:                       # failed images are left out of the batch, not the batch
            if first:
                sig = _compile_notice(model, args.quiet, len(xs))
            out = model.predict(np.stack(list(xs.values())))
            logits = dict(zip(xs.keys(), out))
            if first and sig:
                jitcache.mark_warm(model.kernels, sig)
                first = False
        for i, path in enumerate(chunk):      # output in input order, failures included
            if i in errors:
                emit(path, error=errors[i])
            else:
                emit(path, preds=top_k(logits[i], labels, args.top_k))
    _Progress.clear_line()
    return 1 if failed else 0


# ------------------------------------------------------------------------------ warmup

def cmd_warmup(args) -> int:
    from . import jitcache
    model = _load_model(args.model, args.threads, args.kernels)
    sig = _compile_notice(model, args.quiet)
    seconds = model.warmup()
    if sig:
        jitcache.mark_warm(model.kernels, sig)
    print(f"kernels ready for {printable(model.path)} (kernels={model.kernels}) in {seconds:.1f} s")
    return 0


# ------------------------------------------------------------------------------ bench

def cmd_bench(args) -> int:
    from . import jitcache
    from .bench import bench_model, format_report
    model = _load_model(args.model, args.threads, args.kernels)
    sig = _compile_notice(model, args.quiet)
    r = bench_model(model, batch=args.batch_size, rounds=args.rounds)
    if sig:
        jitcache.mark_warm(model.kernels, sig)
    if args.no_layers:
        r["layers"] = []
    if args.json:
        r["model"] = str(model.path)
        r["layers"] = [{"name": n, "op": op, "kernel": k, "median_us": us}
                       for (n, op, us), k in zip(r["layers"], r.pop("layer_kernels"))]
        print(json.dumps(r))
    else:
        print(f"model: {printable(model.path)}")
        print(format_report(r, per_layer=not args.no_layers))
    return 0


# ------------------------------------------------------------------------------ models

def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_models(args) -> int:
    from .catalog import USABLE_GAP, bundled_summaries, default_model
    from .models import weights_dirs

    models = bundled_summaries()
    default = default_model() if models else None
    if args.json:
        for m in models:
            print(json.dumps(dict(m.as_dict(), default=m.name == default)))
        return 0
    if not models:
        where = ", ".join(str(d) for d in weights_dirs()) or "weights/ (missing)"
        _err(f"no bundled models found (looked in {where})")
        return 0
    header = ("name", "arch", "pointwise", "classes", "top-1", "top-5", "size", "accuracy from")
    rows = [(m.name + (" *" if m.name == default else ""), m.arch, m.pointwise,
             str(m.num_classes), _pct(m.top1), _pct(m.top5), _mb(m.size_bytes),
             m.metric_key or "-") for m in models]
    print(_table(header, rows, right={3, 4, 5, 6}))
    print("\n* default model of `ternet classify`. Accuracy as recorded in each file's "
          "ternet.metrics (key shown; dev200 = the 200-image ImageNet dev sample).")
    for m in models:
        if m.pointwise == "ternary" and m.is_imagenet and not m.usable:
            print(f"{printable(m.name)}: more than {USABLE_GAP:g} points below its FP32 reference "
                  f"({_pct(m.ref_top1)}), so not the default")
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _table(header, rows, right=frozenset()) -> str:
    """Aligned columns; cells are escaped by `printable` (they hold names from model files)."""
    cells = [[printable(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths]), *map(fmt, cells[1:])])


# ------------------------------------------------------------------------------ info

def _si(n) -> str:
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _shape(s) -> str:
    return "x".join(str(v) for v in s)


def _assumptions(info) -> list[str]:
    e = info.energy["per_op_pJ"]
    return [
        "compute only: memory traffic, requantization and activation clamps are not charged "
        "(requantization is shown separately as a sensitivity line)",
        f"per-operation energies: {info.energy['source']}: "
        + ", ".join(f"{k.replace('_', ' ')} {v} pJ" for k, v in e.items()),
        "int8 layers (stem, depthwise, int8 pointwise, classifier): a MAC = int8 multiply + "
        "one add",
        "ternary pointwise: a nonzero weight = one add per output pixel, a zero weight is "
        "skipped (no operation); no multiplications",
        "residual adds and average pooling: one add per input element",
        "'int8 accumulate': every add priced as an int8 add (PROM-style); 'int32 accumulate': "
        "every add priced as an int32 add",
        "fp16/fp32 baselines: the same architecture dense in floating point, a MAC = multiply "
        "+ add; storage = same parameter count (weights + biases) at 2/4 bytes",
    ]


def cmd_info(args) -> int:
    from .format import ModelFormatError, read_model
    from .info import analyze
    from .models import resolve

    try:
        mf = read_model(resolve(args.model))
    except (OSError, ModelFormatError) as e:
        raise CliError(str(e)) from None
    info = analyze(mf)
    if args.json:
        d = info.as_dict()
        d["assumptions"] = _assumptions(info)
        print(json.dumps(d))
        return 0
    t, s, e = info.totals, info.storage, info.energy
    out = [f"model: {printable(info.path)}", f"arch:  {printable(info.arch)}",
           f"requantization: {info.requant} rule", ""]
    if not args.summary:
        header = ("name", "op", "in", "out", "weight", "MACs", "mults", "adds", "skipped",
                  "params", "bytes")
        rows = [(l.name, l.op, ",".join(_shape(x) for x in l.in_shapes), _shape(l.out_shape),
                 l.weight, _si(l.macs), _si(l.mults), _si(l.adds + l.elementwise_adds),
                 _si(l.skipped), _si(l.params), _si(l.bytes)) for l in info.layers]
        rows.append(("total", "", "", "", "", _si(t["macs"]), _si(t["mults"]),
                     _si(t["adds"] + t["elementwise_adds"]), _si(t["skipped"]),
                     _si(t["params"]), _si(t["bytes"])))
        out += [_table(header, rows, right=set(range(5, 11))), ""]
    tern_share = t["ternary_macs"] / t["macs"] if t["macs"] else 0.0
    out += [
        f"MACs per image:       {t['macs']:,} ({100 * tern_share:.1f}% ternary)",
        f"  multiplications:    {t['mults']:,}",
        f"  additions:          {t['adds']:,} from MACs + {t['elementwise_adds']:,} elementwise",
        f"  skipped (zero w):   {t['skipped']:,}",
        f"parameters:           {t['params']:,}",
        "",
        f"storage (tensors):    {_mb(s['tensor_bytes'])}",
        f"  fp16 same arch:     {_mb(s['fp16_bytes'])}  ({s['ratio_fp16']:.2f}x smaller)",
        f"  fp32 same arch:     {_mb(s['fp32_bytes'])}  ({s['ratio_fp32']:.2f}x smaller)",
        "",
        "estimated compute energy per image:",
        f"  ours, int8 accumulate:   {e['ours_int8_accumulate'] / 1e6:9.2f} uJ   "
        f"{e['ratio_fp16_int8_accumulate']:.1f}x less than fp16",
        f"  ours, int32 accumulate:  {e['ours_int32_accumulate'] / 1e6:9.2f} uJ   "
        f"{e['ratio_fp16_int32_accumulate']:.1f}x less than fp16",
        f"  fp16 baseline:           {e['fp16_baseline'] / 1e6:9.2f} uJ",
        f"  fp32 baseline:           {e['fp32_baseline'] / 1e6:9.2f} uJ",
        f"  sensitivity: zero ternary weights not skipped -> {e['ratio_fp16_dense_ternary']:.1f}x; "
        f"requantization charged as fp32 mul+add per output -> "
        f"{e['ratio_fp16_int8_accumulate_with_requant']:.1f}x",
        "  (PROM reports 23.9x for MobileNetV2 vs fp16)",
        "",
        "assumptions:",
        *[f"  - {a}" for a in _assumptions(info)],
    ]
    print("\n".join(out))
    return 0


def cmd_convert(args) -> int:
    import shlex

    from .format import ModelFormatError
    argv = [args.source, "-o", args.output]
    if args.labels:
        argv += ["--labels", args.labels]
    if args.preprocess:
        argv += ["--preprocess", *args.preprocess]
    if args.arch:
        argv += ["--arch", args.arch]
    if args.keep_int8:
        argv.append("--keep-int8")
    if args.requant:
        argv += ["--requant", args.requant]
    try:
        from .conversion import convert
        report = convert(args.source, args.output, labels=args.labels, preprocess=args.preprocess,
                         arch=args.arch, ternary=not args.keep_int8,
                         command="ternet convert " + shlex.join(argv), requant=args.requant)
    except (OSError, ImportError, ModelFormatError) as e:   # ConversionError is a ModelFormatError
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    print("\n".join(printable(line) for line in report.lines()))
    return 0


# ------------------------------------------------------------------------------ parser

class _Parser(argparse.ArgumentParser):
    """Escapes usage errors; names the default model only when help is shown: finding it reads
    the bundled files' headers (safetensors), a cost that parsing a command line must not pay."""
    model_action = None          # this parser's --model argument, if it has one

    def format_help(self) -> str:
        if self.model_action is not None:
            self.model_action.help = _model_help()
        return super().format_help()

    def error(self, message: str):
        super().error(printable(message))   # e.g. 'unrecognized arguments: <raw file names>'


def _model_help() -> str:
    from .catalog import DEFAULT_RULE, bundled_default
    env = config.get("TERNET_MODEL")
    default = (f"$TERNET_MODEL, set to {env}" if env else
               f"$TERNET_MODEL if set, else {bundled_default()}: {DEFAULT_RULE}")
    text = f"bundled model name or .safetensors path (default: {default})"
    return printable(text).replace("%", "%%")        # argparse %-formats help strings


def _model_arg(p, positional=False):
    if positional:
        p.add_argument("model", metavar="MODEL", help="bundled model name or model file path")
    else:
        p.model_action = p.add_argument(
            "--model", "-m", metavar="NAME|PATH", default=None,
            help="bundled model name or .safetensors path (default: $TERNET_MODEL, else the "
                 "one `ternet models` marks)")


def _run_args(p):
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="threads for the kernels (default: $TERNET_NUM_THREADS or 1)")
    p.add_argument("--kernels", choices=REQUESTS, default=None,
                   help="kernel family (default: $TERNET_KERNELS, else auto: by CPU); "
                        "'reference' runs the slow numpy reference")
    p.add_argument("--quiet", "-q", action="store_true", help="no notices or progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(                      # its subcommands' parsers are _Parsers too
        prog="ternet", description="CPU inference for PROM-quantized CNNs (ternary pointwise "
        "convolutions, int8 elsewhere).",
        epilog="Environment: TERNET_MODEL, TERNET_NUM_THREADS, TERNET_KERNELS, NUMBA_CACHE_DIR "
               "(compiled kernel cache), TERNET_CACHE_DIR and TERNET_REPLAY_CACHE_MB "
               "(replays), TERNET_DEBUG=1 (tracebacks); all of them: docs/config.md.")
    parser.add_argument("--version", action="version", version=f"ternet {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("classify", help="classify images or directories of images",
                       description="Top-k ImageNet classes of each image; directories are "
                                   "searched recursively for image files.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _model_arg(p)
    p.add_argument("--top-k", "-k", type=_positive, default=5, metavar="K",
                   help="classes per image (default 5)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image per line on stdout: {path, predictions: "
                        "[{rank, index, label, probability}]} or {path, error}")
    p.add_argument("--batch-size", "-b", type=_positive, default=8, metavar="B",
                   help="images per forward pass (default 8)")
    _run_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("warmup", help="compile and cache the kernels ahead of time",
                       description="Compile (or load from numba's cache) every kernel a model "
                                   "needs, so that the next run starts fast.")
    _model_arg(p)
    _run_args(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("models", help="list bundled models with accuracy and size")
    p.add_argument("--json", action="store_true", help="one JSON object per model per line")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="per-layer operations, storage and energy estimate",
                       description="Per-layer MACs, multiplications vs additions, parameters "
                                   "and bytes; storage vs fp16/fp32 and a compute-energy "
                                   "estimate (Horowitz ISSCC 2014, 45 nm).")
    _model_arg(p, positional=True)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--summary", action="store_true", help="totals only, no per-layer table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="latency of a model: compile time, median, per layer",
                       description="Time predict() on random input: first call (compile or "
                                   "cache load) separately, warm-up discarded, then the median "
                                   "of --rounds calls and a per-layer breakdown "
                                   "(ternet/bench.py).")
    _model_arg(p)
    p.add_argument("--batch-size", "-b", type=_positive, default=1, metavar="B")
    p.add_argument("--rounds", type=_positive, default=30, metavar="R",
                   help="timed calls after warm-up (default 30)")
    p.add_argument("--no-layers", action="store_true", help="whole network only")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _run_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="convert a quantized .tflite or ONNX QDQ classifier",
                       description="Write a ternet model file from an int8 TFLite or ONNX QDQ "
                                   "image classifier (docs/convert.md: supported ops and rules). "
                                   "Needs the 'convert' extra.")
    p.add_argument("source", metavar="MODEL", help=".tflite or .onnx file")
    p.add_argument("--output", "-o", required=True, metavar="OUT.safetensors")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default class_N)")
    p.add_argument("--preprocess", nargs="+", metavar="KEY=VALUE",
                   help="resize=N crop=N interpolation=bilinear|bicubic mean=R,G,B std=R,G,B "
                        "(pixel/255 units; default for 8-bit inputs: raw pixels, resize "
                        "crop/0.875, bilinear)")
    p.add_argument("--arch", metavar="NAME", help="architecture name stored in the file "
                                                   "(default: the source file's name)")
    p.add_argument("--keep-int8", action="store_true",
                   help="keep ternary-valued int8 pointwise weights as int8")
    p.add_argument("--requant", metavar="RULE",
                   help="requantization rule stored in the file: ternet or onnxruntime (default: "
                        "onnxruntime for ONNX, ternet for TFLite; docs/convert.md)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)          # exits 2 on usage errors
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("ternet: error: a command is required "
              "(classify, warmup, bench, models, info, convert)",
              file=sys.stderr)
        return 2
    try:
        config.get("TERNET_DEBUG")            # the error paths below read it
        return args.func(args)
    except SettingError as e:                 # a bad TERNET_* value: a usage error
        _err(f"error: {e}")
        return 2
    except CliError as e:
        if _debug():
            import traceback
            traceback.print_exc()
        _err(f"error: {e}")
        return e.code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): silence the flush at exit, report nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as e:
        if _debug():
            raise
        _err(f"error: {type(e).__name__}: {e} (set TERNET_DEBUG=1 for a traceback)")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
