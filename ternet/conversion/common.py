"""What every source format shares: the ternet graph being built, labels, preprocessing, writing.

A reader (TFLite, ONNX) walks its graph and calls `GraphBuilder` once per ternet node, in the
source's own integer terms (int8 weights, int32 biases, scales); the builder turns them into
ternet's conventions (docs/format.md):

* activations become uint8: an int8 zero point z becomes z + 128, and every int8 value q the
  uint8 value q + 128, so `scale * (q - z)` is unchanged and the integer arithmetic is identical;
* a 1x1 stride-1 convolution becomes `pointwise`; if every output channel's int8 weights lie in
  {-q, 0, +q} it is written as packed ternary with weight scale `s_w * q` and bias `bias / q`
  (rounded to the nearest integer when q does not divide it; the largest such change, in units
  of the layer's output step, is reported);
* the classifier's 1001st class is dropped when it is the TF-slim background class.

Nothing reaches the destination path until the whole file has been built and validated:
`write_atomic` writes a temporary file beside it and renames it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from ..quant import activation_bounds

INTERPOLATIONS = ("bilinear", "bicubic")
INT32_MAX = 2**31 - 1
DEAD_FILTER_STEPS = 0.01     # weights that can move an output by less than this are noise
CLAMP_MARGIN = 1e-3          # output steps kept from a clamp bound (float rounding of acc * m)
STANDARD_CROP_RATIO = 224 / 256        # resize shorter side to crop / 0.875, then centre crop


class ConversionError(ModelFormatError):
    """The source model cannot be converted: one line naming the file, op or tensor and why."""


@dataclass(frozen=True)
class Value:
    """An activation tensor in ternet's terms: the node that makes it and its uint8 qparams."""
    node: str              # ternet node name, "input" for the graph input
    scale: float
    zero_point: int        # uint8 domain, [0, 255]
    shape: tuple           # (H, W, C)


@dataclass
class ConversionReport:
    """What `convert` did: printed by the CLI, returned by `ternet.convert`."""
    source: str
    output: str
    nodes: int = 0
    ternary_layers: list = field(default_factory=list)     # ternet node names
    background_dropped: bool = False
    notes: list = field(default_factory=list)               # one line each
    source_tensors: dict = field(default_factory=dict)      # ternet node -> source tensor (id/name)

    def lines(self) -> list[str]:
        out = [f"converted {self.source} -> {self.output} ({self.nodes} nodes)"]
        if self.ternary_layers:
            out.append(f"{len(self.ternary_layers)} pointwise layer(s) written as packed ternary "
                       f"(int8 weights in {{-q, 0, +q}} per output channel): "
                       + ", ".join(self.ternary_layers))
        return out + list(self.notes)


def int8_to_uint8_zero_point(zp: int, dtype: str, where: str) -> int:
    """A per-tensor activation zero point in ternet's uint8 domain (int8: + 128)."""
    z = int(zp) + (128 if dtype == "int8" else 0)
    if dtype not in ("int8", "uint8") or not 0 <= z <= 255:
        raise ConversionError(f"{where}: zero point {zp} of a {dtype} activation is out of range")
    return z


class GraphBuilder:
    """Collects ternet nodes and tensors; each method returns the `Value` its node produces."""

    def __init__(self, source: str, ternary: bool = True):
        self.source = source
        self.ternary = ternary
        self.nodes: list[dict] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.input_spec: dict | None = None
        self.ternary_layers: list[str] = []
        self.notes: list[str] = []
        self._bias_rounding = 0.0          # largest bias change of a ternary layer, output steps
        self._dead_filters = 0
        self._dead_filters_clamped = 0     # of those, outputs at a clamp bound for every input
        self._dead_filter_steps = 0.0

    # ------------------------------------------------------------------ nodes
    def input(self, height: int, width: int, scale: float, zero_point: int) -> Value:
        self.input_spec = {"height": int(height), "width": int(width), "channels": 3,
                           "layout": "NHWC", "dtype": "uint8", "scale": float(scale),
                           "zero_point": int(zero_point)}
        return Value("input", float(scale), int(zero_point), (int(height), int(width), 3))

    def conv(self, x: Value, weight, bias, weight_scale, out_q, *, stride: int, padding: str,
             activation: str, where: str) -> Value:
        """weight int8 [cout, k, k, cin]: `pointwise` when 1x1 stride 1, else `conv2d`."""
        cout, k, _, cin = weight.shape
        weight = self._dead_filters_zeroed(weight.reshape(cout, -1), bias, x, weight_scale, out_q,
                                           activation, where).reshape(weight.shape)
        if k == 1 and stride == 1 and x.node != "input":
            return self._pointwise(x, weight.reshape(cout, cin), bias, weight_scale, out_q,
                                   activation, where)
        geometry = _output_size(padding, x.shape, k, stride)
        name = self._add_node("conv2d", [x], {"cin": cin, "cout": cout, "kernel": k,
                                              "stride": stride, "padding": padding,
                                              "activation": activation})
        self._weights(name, weight, bias, weight_scale)
        return self._output(name, out_q, geometry + (cout,))

    def depthwise(self, x: Value, weight, bias, weight_scale, out_q, *, stride: int, padding: str,
                  activation: str, where: str) -> Value:
        """weight int8 [k, k, C]."""
        k, _, c = weight.shape
        weight = self._dead_filters_zeroed(weight.reshape(-1, c).T, bias, x, weight_scale, out_q,
                                           activation, where).T.reshape(weight.shape)
        geometry = _output_size(padding, x.shape, k, stride)
        name = self._add_node("depthwise", [x], {"channels": c, "kernel": k, "stride": stride,
                                                 "padding": padding, "activation": activation})
        self._weights(name, weight, bias, weight_scale)
        return self._output(name, out_q, geometry + (c,))

    def add(self, a: Value, b: Value, out_q, *, activation: str, where: str) -> Value:
        if a.shape != b.shape:
            raise ConversionError(f"{where}: operand shapes differ ({list(a.shape)} vs "
                                  f"{list(b.shape)}); broadcasting adds are not supported")
        name = self._add_node("add", [a, b], {"activation": activation})
        return self._output(name, out_q, a.shape)

    def global_avg_pool(self, x: Value, out_q, where: str) -> Value:
        name = self._add_node("global_avg_pool", [x], {})
        return self._output(name, out_q, (1, 1, x.shape[2]))

    def linear(self, x: Value, weight, bias, weight_scale, where: str) -> None:
        """The classifier (the last node): weight int8 [cout, cin], float32 logits out."""
        if x.shape[:2] != (1, 1):
            raise ConversionError(f"{where}: the classifier's input must be globally pooled "
                                  f"(1x1), got {x.shape[0]}x{x.shape[1]}")
        cout, cin = weight.shape
        name = self._add_node("linear", [x], {"cin": cin, "cout": cout})
        self._weights(name, weight, bias, weight_scale)

    def fold_activation(self, x: Value, activation: str, where: str) -> Value:
        """A standalone ReLU/ReLU6 (same quantization in and out) after the node that makes
        `x`: becomes that node's clamp; clamping twice is clamping to the tighter bounds."""
        node = next((n for n in self.nodes if n["name"] == x.node), None)
        if node is None or "activation" not in node["attrs"]:
            raise ConversionError(f"{where}: {activation} must follow a convolution or an add")
        order = ("none", "relu", "relu6")
        node["attrs"]["activation"] = max(node["attrs"]["activation"], activation, key=order.index)
        return x

    def drop_first_class(self) -> None:
        """Remove output 0 (TF-slim's background class) from the classifier."""
        name = self.nodes[-1]["name"]
        for f in ("weight", "bias", "weight_scale"):
            self.tensors[f"{name}.{f}"] = np.ascontiguousarray(self.tensors[f"{name}.{f}"][1:])
        self.nodes[-1]["attrs"]["cout"] -= 1

    # ------------------------------------------------------------------ internals
    def _add_node(self, op: str, inputs: list, attrs: dict) -> str:
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append({"name": name, "op": op, "inputs": [v.node for v in inputs],
                           "attrs": attrs})
        return name

    def _weights(self, name, weight, bias, weight_scale):
        self.tensors[f"{name}.weight"] = np.ascontiguousarray(weight, np.int8)
        self.tensors[f"{name}.bias"] = np.ascontiguousarray(bias, np.int32)
        self.tensors[f"{name}.weight_scale"] = np.ascontiguousarray(weight_scale, np.float32)

    def _output(self, name: str, out_q, shape) -> Value:
        scale, zp = out_q
        self.tensors[f"{name}.output_scale"] = np.array([scale], np.float32)
        self.tensors[f"{name}.output_zero_point"] = np.array([zp], np.int32)
        return Value(name, float(np.float32(scale)), int(zp), tuple(int(s) for s in shape))

    def _pointwise(self, x, w, bias, weight_scale, out_q, activation, where) -> Value:
        cout, cin = w.shape
        step = ternary_step(w) if self.ternary else None
        name = self._add_node("pointwise", [x], {"cin": cin, "cout": cout, "weight": "int8",
                                                 "activation": activation})
        if step is None:
            self._weights(name, w, bias, weight_scale)
        else:
            self._ternary_weights(name, x, w, bias, weight_scale, step, out_q)
        return self._output(name, out_q, x.shape[:2] + (cout,))

    def _ternary_weights(self, name, x, w, bias, weight_scale, step, out_q):
        from ..format import pack_ternary
        self.nodes[-1]["attrs"]["weight"] = "ternary"
        self.ternary_layers.append(name)
        new_bias = np.rint(np.asarray(bias, np.float64) / step)
        # the bias moves by |new_bias * q - bias| accumulator units of s_in * s_w[c] each
        moved = np.abs(new_bias * step - np.asarray(bias, np.float64))
        units = np.float64(x.scale) * np.asarray(weight_scale, np.float64) / np.float64(out_q[0])
        self._bias_rounding = max(self._bias_rounding, float(np.max(moved * units)))
        self.tensors[f"{name}.weight"] = pack_ternary(np.sign(w).astype(np.int8))
        self.tensors[f"{name}.bias"] = new_bias.astype(np.int32)
        self.tensors[f"{name}.weight_scale"] = (np.asarray(weight_scale, np.float64) *
                                                step).astype(np.float32)

    def _dead_filters_zeroed(self, w, bias, x: Value, weight_scale, out_q, activation,
                             where) -> np.ndarray:
        """w int8 [cout, K] with the weights of numerically dead filters zeroed.

        ternet's loader refuses a layer whose int32 accumulator could overflow (|bias| + 255
        sum|w|, also with the input zero point folded into the bias). Quantizers produce that
        for filters whose float weights are ~1e-9 (dead after training): a tiny weight scale
        turns an ordinary bias into a clipped ~2**31 integer. Such a channel's weights are
        zeroed (reported) if its output is the same clamp bound for every input with and
        without them, or if they can move it by less than DEAD_FILTER_STEPS output steps;
        otherwise the conversion is refused, naming the channel."""
        w64 = w.astype(np.int64)
        wa, ws, b = np.abs(w64).sum(axis=1), w64.sum(axis=1), np.asarray(bias, np.int64)
        over = ((np.abs(b) + 255 * wa > INT32_MAX) |
                (np.abs(b - x.zero_point * ws) + 255 * wa > INT32_MAX))
        if not over.any():
            return w
        m = np.float64(x.scale) * np.asarray(weight_scale, np.float64) / out_q[0]
        steps = 255 * wa * m
        # accumulator range over all inputs 0..255: b + sum(w * (x - zx))
        low = b + np.where(w64 > 0, w64 * -x.zero_point, w64 * (255 - x.zero_point)).sum(axis=1)
        high = b + np.where(w64 > 0, w64 * (255 - x.zero_point), w64 * -x.zero_point).sum(axis=1)
        lo, hi = activation_bounds(activation, out_q[0], out_q[1])
        below = (np.maximum(high, b) * m + out_q[1] + 0.5) <= lo + 1 - CLAMP_MARGIN
        above = (np.minimum(low, b) * m + out_q[1] + 0.5) >= hi + CLAMP_MARGIN
        live = np.flatnonzero(over & ~below & ~above & (steps >= DEAD_FILTER_STEPS))
        if live.size:
            c = int(live[0])
            raise ConversionError(f"{where}: output channel {c}: bias {b[c]} and its weights can "
                                  "overflow ternet's int32 accumulator")
        self._dead_filters += int(over.sum())
        self._dead_filters_clamped += int((over & (below | above)).sum())
        moving = over & ~below & ~above
        if moving.any():
            self._dead_filter_steps = max(self._dead_filter_steps, float(steps[moving].max()))
        w = w.copy()
        w[over] = 0
        return w

    def finish_notes(self) -> list[str]:
        if self._dead_filters:
            others = self._dead_filters - self._dead_filters_clamped
            self.notes.append(f"{self._dead_filters} numerically dead filter(s) (int32 bias at "
                              "its limit, weights ~0) had their weights zeroed so the accumulator "
                              f"cannot overflow: {self._dead_filters_clamped} output the same "
                              "clamp bound for every input either way" +
                              (f"; the other {others} could move their outputs by at most "
                               f"{self._dead_filter_steps:.2g} output steps" if others else ""))
        if self.ternary_layers and self._bias_rounding > 0:
            self.notes.append("ternary layers: biases not divisible by their channel's step q "
                              f"were rounded; largest change {self._bias_rounding:.3g} output "
                              "steps")
        return self.notes


def ternary_step(w) -> np.ndarray | None:
    """Per output channel q > 0 with every weight of the row in {-q, 0, +q}, or None if some row
    is not ternary (an all-zero row gets q = 1)."""
    a = np.abs(np.asarray(w, np.int16))
    q = a.max(axis=1)
    if not np.all((a == 0) | (a == q[:, None])):
        return None
    return np.where(q > 0, q, 1).astype(np.int64)


def _output_size(padding: str, shape, k: int, stride: int) -> tuple[int, int]:
    from ..quant import conv_padding
    return (conv_padding(padding, shape[0], k, stride)[0],
            conv_padding(padding, shape[1], k, stride)[0])


def padding_of_pads(pads, shape, k: int, stride: int, where) -> str:
    """The ternet padding that a PAD (top, bottom, left, right) + VALID convolution equals."""
    from ..quant import conv_padding
    top, bottom, left, right = pads
    for mode in ("same", "symmetric"):
        if (conv_padding(mode, shape[0], k, stride)[1:] == (top, bottom) and
                conv_padding(mode, shape[1], k, stride)[1:] == (left, right)):
            return mode
    raise ConversionError(f"{where}: pads (top, bottom, left, right) = {pads} match neither "
                          f"TensorFlow SAME nor symmetric padding of a {k}x{k}/{stride} "
                          "convolution")


# ---------------------------------------------------------------------------- labels

def load_labels(path) -> list[str]:
    """One label per line (blank lines at the end ignored)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{p}: cannot read the labels file ({e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e})") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ConversionError(f"{p}: the labels file is empty")
    return labels


def resolve_labels(builder: GraphBuilder, labels: list | None, labels_path: str | None) -> list:
    """The classifier's labels, dropping TF-slim's background class when it is there: 1001
    outputs and either no labels, 1000 labels, or 1001 labels starting with 'background'."""
    cout = builder.nodes[-1]["attrs"]["cout"]
    where = labels_path or "labels"
    background = cout == 1001 and (labels is None or len(labels) == 1000 or
                                   labels[0].strip().lower() in ("background", "__background__"))
    if background:
        builder.drop_first_class()
        cout -= 1
        if labels is not None and len(labels) == 1001:
            labels = labels[1:]
    if labels is None:
        return [f"class_{i}" for i in range(cout)]
    if len(labels) != cout:
        less = " (1001 less the background class)" if background else ""
        raise ConversionError(f"{where}: {len(labels)} labels, but the classifier has {cout} "
                              f"outputs{less}")
    return labels


# ---------------------------------------------------------------------------- preprocessing

def raw_pixel_normalisation(scale: float, zero_point: int) -> tuple[float, float]:
    """(mean, std) under which ternet's preprocessing feeds each pixel value p as the uint8
    input p itself (the usual meaning of an 8-bit image input): with x = p / 255,
    (x - mean) / std / scale + zero_point = p  <=>  std = 1 / (255 scale),
    mean = zero_point / 255."""
    return zero_point / 255.0, 1.0 / (255.0 * scale)


def raw_pixels_exact(mean: float, std: float, scale: float, zero_point: int) -> bool:
    """Does ternet's float32 preprocessing (ternet.preprocess) map every pixel 0..255 to itself?"""
    from ..quant import quantize_activation
    p = np.arange(256, dtype=np.float32)
    x = (p / np.float32(255.0) - np.float32(mean)) / np.float32(std)
    return bool(np.array_equal(quantize_activation(x, scale, zero_point), p.astype(np.uint8)))


def parse_preprocess(items, where: str = "--preprocess") -> dict:
    """`key=value` strings (or a dict) -> partial spec: resize, crop (ints), interpolation,
    mean, std (one number or three, comma-separated, in units of pixel / 255)."""
    if items is None:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for it in items:
            if "=" not in it:
                raise ConversionError(f"{where}: expected key=value, got {it!r}")
            k, v = it.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    spec = {}
    for k, v in pairs:
        if k in ("resize", "crop"):
            spec[k] = _positive_int(v, f"{where} {k}")
        elif k == "interpolation":
            if v not in INTERPOLATIONS:
                raise ConversionError(f"{where}: interpolation must be one of "
                                      f"{list(INTERPOLATIONS)}, got {v!r}")
            spec[k] = v
        elif k in ("mean", "std"):
            spec[k] = _three_numbers(v, f"{where} {k}")
        else:
            raise ConversionError(f"{where}: unknown key {k!r} (resize, crop, interpolation, "
                                  "mean, std)")
    return spec


def _positive_int(v, where) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: expected a positive integer, got {v!r}") from None
    if n < 1:
        raise ConversionError(f"{where}: expected a positive integer, got {n}")
    return n


def _three_numbers(v, where) -> list[float]:
    parts = v if isinstance(v, (list, tuple)) else str(v).split(",")
    try:
        nums = [float(t) for t in parts]
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: expected 1 or 3 comma-separated numbers, "
                              f"got {v!r}") from None
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or not all(np.isfinite(nums)):
        raise ConversionError(f"{where}: expected 1 or 3 finite numbers, got {v!r}")
    return nums


def preprocess_spec(given: dict, input_spec: dict, raw_pixels: bool,
                    source: str) -> tuple[dict, list]:
    """Complete preprocessing spec and notes. Defaults: crop = the input size, resize =
    crop / 0.875 (256 for 224), bilinear, and, for a model whose input is 8-bit, mean/std that
    feed raw pixel values (`raw_pixel_normalisation`). A float-input model's normalisation
    cannot be known from the file: it must be given."""
    h, w = input_spec["height"], input_spec["width"]
    if h != w:
        raise ConversionError(f"{source}: input is {h}x{w}; ternet's preprocessing centre-crops "
                              "a square")
    crop = given.get("crop", h)
    if crop != h:
        raise ConversionError(f"--preprocess crop={crop} does not match the model input {h}x{w}")
    resize = given.get("resize", int(round(crop / STANDARD_CROP_RATIO)))
    if resize < crop:
        raise ConversionError(f"--preprocess resize={resize} is smaller than crop={crop}")
    notes = []
    if "mean" in given and "std" in given:
        mean, std = given["mean"], given["std"]
    elif "mean" in given or "std" in given:
        raise ConversionError("--preprocess: give both mean and std, or neither")
    elif raw_pixels:
        m, s = raw_pixel_normalisation(input_spec["scale"], input_spec["zero_point"])
        mean, std = [m] * 3, [s] * 3
        exact = raw_pixels_exact(m, s, input_spec["scale"], input_spec["zero_point"])
        notes.append("preprocessing: raw RGB pixels as the uint8 input" +
                     ("" if exact else " (NOT exact in float32 for this input scale: some pixel "
                      "values move by one step)"))
    else:
        raise ConversionError(f"{source}: the model takes float input, whose normalisation is not "
                              "in the file: give --preprocess mean=R,G,B std=R,G,B (x = pixel/255)")
    if min(std) <= 0:
        raise ConversionError(f"--preprocess std must be > 0, got {std}")
    spec = {"resize": resize, "crop": crop, "interpolation": given.get("interpolation", "bilinear"),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "colour": "RGB"}
    return spec, notes


# ---------------------------------------------------------------------------- writing

def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(out, **model) -> None:
    """`ternet.format.write_model` into a temporary file beside `out`, then rename: a failed
    conversion leaves no file and never half of one (an existing `out` is kept until then)."""
    from ..format import write_model
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise ConversionError(f"{out}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write_model(tmp, **model)
        os.chmod(tmp, 0o666 & ~_umask())      # safetensors creates its files 0600
        os.replace(tmp, out)
    except ModelFormatError as e:       # the builder made a file the loader would refuse
        raise ConversionError(str(e).replace(str(tmp), str(out))) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def provenance(source: Path, fmt: str, command: str | None, extra: dict) -> dict:
    from datetime import datetime, timezone
    from .. import __version__
    return {"producer": f"ternet convert (ternet {__version__})", "source_format": fmt,
            "source_weights": source.name, "source_sha256": sha256_of(source),
            "command": command or "",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra}

