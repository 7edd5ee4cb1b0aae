"""Model file format v1: one self-describing safetensors file (spec: docs/format.md).

`write_model` and `read_model` are the only ways in and out. `read_model` validates everything
before anything else touches the data: a shape or size from the file is never trusted until it
has been checked against the graph. Every problem raises `ModelFormatError` naming the file,
the node or tensor, and what is wrong.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelFormatError
from .quant import RULES

FORMAT_TAG = "ternet"
FORMAT_VERSION = 1
PADDINGS = ("same", "symmetric")
ACTIVATIONS = ("none", "relu", "relu6")
WEIGHT_TYPES = ("ternary", "int8", "hybrid")
INTERPOLATIONS = ("bilinear", "bicubic")
INT32_MAX = 2**31 - 1
_NAME = re.compile(r"[A-Za-z0-9_.]+")        # matched with fullmatch: "$" would admit a trailing newline

# Limits that keep reading any file bounded in time and memory (docs/format.md, "Limits").
MAX_HEADER_BYTES = 4 << 20          # the safetensors JSON header; the bundled models' are ~60 KB
MAX_JSON_DEPTH = 32                 # nesting of any JSON document (Python's parser recurses)
MAX_VERSION_DIGITS = 6
MAX_CHANNELS = 16384                # cin, cout, channels; and conv2d's kernel**2 * cin (its GEMM
                                    # depth), so the kernels' 16-bit row indices always suffice
MAX_VALUES = 1 << 26                # per image: any node's output, and conv2d's im2col matrix
F32_TINY = float(np.finfo(np.float32).tiny)     # 2**-126, the smallest normal float32
F32_MAX = float(np.finfo(np.float32).max)
# Every derived float32 multiplier lies in [F32_TINY, MAX_MULTIPLIER]: with |acc| < 2**31 (and
# |q - z| <= 255 in an add) every product and sum the kernels form stays finite, so the clamp
# sees no inf or NaN and the kernels' arithmetic matches the numpy references'.
MAX_MULTIPLIER = 2.0**64

# 2-bit ternary codes (BitNet I2_S style): code = w + 1; 3 is invalid.
CODE_INVALID = 3


# ---------------------------------------------------------------------------- ternary packing

def pack_ternary(w) -> np.ndarray:
    """int8 [Cout, Cin] in {-1,0,1} -> uint8 [Cout, ceil(Cin/4)]: 4 codes per byte, first in low bits."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"ternary weights must be 2-D [Cout, Cin], got shape {w.shape}")
    if not np.all((w >= -1) & (w <= 1)):
        raise ValueError("ternary weights must be in {-1, 0, +1}")
    cout, cin = w.shape
    nb = -(-cin // 4)
    codes = np.ones((cout, nb * 4), np.uint8)           # padding code 1 = weight 0
    codes[:, :cin] = (w.astype(np.int16) + 1).astype(np.uint8)
    c = codes.reshape(cout, nb, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def ternary_codes(packed, cin: int) -> np.ndarray:
    """uint8 [Cout, nb] -> 2-bit codes uint8 [Cout, nb*4] (including padding positions)."""
    p = np.asarray(packed, np.uint8)
    return np.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(p.shape[0], -1)


def unpack_ternary(packed, cin: int) -> np.ndarray:
    """uint8 [Cout, ceil(Cin/4)] -> int8 [Cout, Cin]; raises ValueError on an invalid code."""
    codes = ternary_codes(packed, cin)
    if np.any(codes == CODE_INVALID):
        raise ValueError("invalid 2-bit code 3")
    return (codes[:, :cin].astype(np.int8) - 1).astype(np.int8)


# ---------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple
    attrs: dict
    out_shape: tuple = ()          # (H, W, C) of this node's output, filled in by validation

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": self.attrs}


@dataclass(frozen=True)
class ModelFile:
    path: str
    arch: str
    graph: tuple                   # of Node, execution order
    tensors: dict                  # name -> np.ndarray (validated dtype and shape)
    input: dict                    # height, width, channels, layout, dtype, scale, zero_point
    preprocess: dict
    labels: tuple
    provenance: dict
    metrics: dict | None = None
    metadata: dict = field(default_factory=dict)
    requant: str = "ternet"        # the requantization rule (quant.RULES; `ternet.requant`)

    def tensor(self, node: Node, fld: str) -> np.ndarray:
        return self.tensors[f"{node.name}.{fld}"]

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------- writing

def write_model(path, *, arch: str, graph, tensors: dict, input_spec: dict, preprocess: dict,
                labels, provenance: dict, metrics: dict | None = None,
                requant: str = "ternet") -> None:
    """Validate, then write one model file. graph: list of node dicts or Nodes. requant: the
    requantization rule (quant.RULES); written only when not the default "ternet"."""
    from safetensors.numpy import save_file

    nodes = [n.to_json() if isinstance(n, Node) else dict(n) for n in graph]
    meta = {
        "format": FORMAT_TAG,
        "ternet.format_version": str(FORMAT_VERSION),
        "ternet.arch": str(arch),
        "ternet.graph": json.dumps(nodes),
        "ternet.input": json.dumps(input_spec),
        "ternet.preprocess": json.dumps(preprocess),
        "ternet.labels": json.dumps(list(labels)),
        "ternet.provenance": json.dumps(provenance),
    }
    if metrics is not None:
        meta["ternet.metrics"] = json.dumps(metrics)
    if requant != "ternet":
        meta["ternet.requant"] = str(requant)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    validate(str(path), meta, arrays)          # never write a file we would refuse to read
    save_file(arrays, str(path), metadata=meta)


# ---------------------------------------------------------------------------- reading

def read_model(path) -> ModelFile:
    """Read and fully validate a model file; raises ModelFormatError (or FileNotFoundError)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file")
    if p.is_dir():
        raise ModelFormatError(f"{p}: is a directory, not a model file")
    _check_header(p)
    try:
        from safetensors import safe_open
        with safe_open(str(p), framework="np") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers/data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFormatError(f"{p}: not a readable safetensors file ({msg})") from None
    return validate(str(p), meta, arrays)


def _check_header(p: Path) -> None:
    """What the safetensors reader takes on trust: a bounded header length, and a JSON header
    with bounded nesting and no repeated key (a JSON parser would silently keep the last one)."""
    bad = "not a readable safetensors file"
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(p, bad, "shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            _fail(p, bad, f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        raw = f.read(n)
    if len(raw) < n:
        _fail(p, bad, f"header length {n} but the file ends {len(raw)} bytes later")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail(p, bad, "header is not valid UTF-8")
    if not isinstance(_parse_json(p, f"{bad}: header", text), dict):
        _fail(p, bad, "header is not a JSON object")


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside JSON strings, in linear time and without recursion
    (int32 work arrays: a few times the text's size)."""
    b = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)   # the bytes that matter
    if not len(b):                                                       # are ASCII in UTF-8
        return 0
    pos = np.arange(len(b), dtype=np.int32)
    last_other = np.maximum.accumulate(np.where(b == ord("\\"), np.int32(-1), pos))
    escaped = np.zeros(len(b), bool)              # preceded by an odd run of backslashes
    escaped[1:] = (pos[:-1] - last_other[:-1]) % 2 == 1
    quote = (b == ord('"')) & ~escaped
    in_string = (np.cumsum(quote, dtype=np.int32) - quote) % 2 == 1
    step = np.where(in_string, np.int8(0), ((b == ord("[")) | (b == ord("{"))).view(np.int8)
                    - ((b == ord("]")) | (b == ord("}"))).view(np.int8))
    return int(np.cumsum(step, dtype=np.int32).max())


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_show(k)}")
        d[k] = v
    return d


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(path, where, text: str):
    """Strict JSON: nesting at most MAX_JSON_DEPTH, no repeated keys, no NaN or Infinity."""
    if not isinstance(text, str):
        _fail(path, where, f"expected a JSON string, got {type(text).__name__}")
    if _json_depth(text) > MAX_JSON_DEPTH:
        _fail(path, where, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as e:           # JSONDecodeError, a repeated key, an int over 4300 digits
        _fail(path, where, f"invalid JSON ({str(e).splitlines()[0]})")


def _show(v, limit: int = 60) -> str:
    """repr(v), cut short: error messages stay one readable line whatever the file holds."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _fail(path, where, problem):
    raise ModelFormatError(f"{path}: {where}: {problem}")


def _json_key(path, meta, key, kind, required=True):
    if key not in meta:
        if required:
            _fail(path, f"metadata key {key!r}", "missing")
        return None
    v = _parse_json(path, f"metadata key {key!r}", meta[key])
    if not isinstance(v, kind):
        _fail(path, f"metadata key {key!r}", f"expected a JSON {kind.__name__}, got {type(v).__name__}")
    return v


def _is_number(v, integer: bool = False) -> bool:
    """A JSON int, or (unless integer) a finite JSON float. Python ints are unbounded and always
    finite (math.isfinite would overflow on a huge one); bool is not a number here."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return not integer and isinstance(v, float) and math.isfinite(v)


def _num(path, where, d, key, lo=None, hi=None, integer=False):
    v = d.get(key) if isinstance(d, dict) else None
    if not _is_number(v, integer):
        _fail(path, where, f"{key!r} must be {'an integer' if integer else 'a finite number'}, "
              f"got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):     # exact, even for huge ints
        _fail(path, where, f"{key!r} = {_show(v)} out of range [{lo}, {hi}]")
    return v


def _choice(path, where, d, key, choices):
    v = d.get(key)
    if not isinstance(v, str) or v not in choices:
        _fail(path, where, f"{key!r} must be one of {list(choices)}, got {_show(v)}")
    return v


def _normal_f32(a) -> np.ndarray:
    """Elementwise: a float32 value that is finite, positive and normal (>= 2**-126)."""
    return np.isfinite(a) & (a >= np.float32(F32_TINY))


def _check_multiplier(path, where, what, rule, *scales) -> None:
    """The float32 multiplier(s) `rule` (a ternet.quant function) derives from the scales must lie
    in [2**-126, MAX_MULTIPLIER]; computed exactly as the runners will compute them."""
    with np.errstate(over="ignore", under="ignore"):      # overflow is the finding, not a warning
        m = np.asarray(rule(*scales), np.float32).reshape(-1)
    ok = _normal_f32(m) & (m <= np.float32(MAX_MULTIPLIER))
    if not np.all(ok):
        _fail(path, where, f"{what} {float(m[~ok][0]):g} (float32) is outside [2**-126, 2**64]: "
              "the scales are too far apart")


def _check_im2col(path, where, k, cin, ho, wo) -> None:
    """conv2d runs as im2col + GEMM: bound the GEMM depth and the per-image im2col matrix."""
    if k * k * cin > MAX_CHANNELS:
        _fail(path, where, f"kernel {k}x{k} x cin {cin} = {k * k * cin} exceeds {MAX_CHANNELS}")
    if ho * wo * k * k * cin > MAX_VALUES:
        _fail(path, where, f"its im2col matrix ({ho}x{wo} x {k * k * cin}) has more than "
              f"{MAX_VALUES} values")


def validate(path: str, meta: dict, arrays: dict) -> ModelFile:
    """Check metadata, graph, shapes and tensors; return the parsed ModelFile."""
    if meta.get("format") != FORMAT_TAG:
        _fail(path, "metadata key 'format'", f"expected {FORMAT_TAG!r}, got "
              f"{_show(meta.get('format'))} (not a ternet model file)")
    ver = meta.get("ternet.format_version")
    if not isinstance(ver, str) or not re.fullmatch(f"[0-9]{{1,{MAX_VERSION_DIGITS}}}", ver):
        _fail(path, "metadata key 'ternet.format_version'",
              f"missing or not an integer of at most {MAX_VERSION_DIGITS} ASCII digits: "
              f"{_show(ver)}")
    if int(ver) != FORMAT_VERSION:
        _fail(path, "format version", f"file has version {ver}, this ternet reads version "
              f"{FORMAT_VERSION}" + ("; upgrade ternet" if int(ver) > FORMAT_VERSION else ""))
    arch = meta.get("ternet.arch")
    if not isinstance(arch, str) or not arch:
        _fail(path, "metadata key 'ternet.arch'", "missing or empty")
    graph = _json_key(path, meta, "ternet.graph", list)
    inp = _json_key(path, meta, "ternet.input", dict)
    pre = _json_key(path, meta, "ternet.preprocess", dict)
    labels = _json_key(path, meta, "ternet.labels", list)
    prov = _json_key(path, meta, "ternet.provenance", dict)
    metrics = _json_key(path, meta, "ternet.metrics", dict, required=False)
    requant = meta.get("ternet.requant", "ternet")
    if requant not in RULES:
        _fail(path, "metadata key 'ternet.requant'", f"unknown requantization rule "
              f"{_show(requant)}; expected one of {', '.join(RULES)}")
    if "producer" not in prov:
        _fail(path, "metadata key 'ternet.provenance'", "needs a 'producer' entry")
    if not all(isinstance(x, str) for x in labels):
        _fail(path, "metadata key 'ternet.labels'", "every label must be a string")

    w = "input spec"
    H = _num(path, w, inp, "height", 1, 4096, True)
    W = _num(path, w, inp, "width", 1, 4096, True)
    _num(path, w, inp, "channels", 3, 3, True)
    if inp.get("layout") != "NHWC" or inp.get("dtype") != "uint8":
        _fail(path, w, "layout must be 'NHWC' and dtype 'uint8'")
    # a normal float32 (quantize_activation divides by float32(scale)): the input can't be NaN
    _num(path, w, inp, "scale", F32_TINY, F32_MAX)
    _num(path, w, inp, "zero_point", 0, 255, True)

    w = "preprocess spec"
    crop = _num(path, w, pre, "crop", 1, 4096, True)
    resize = _num(path, w, pre, "resize", 1, 8192, True)
    if crop != H or crop != W:
        _fail(path, w, f"crop {crop} does not match the input size {H}x{W}")
    if resize < crop:
        _fail(path, w, f"resize {resize} is smaller than crop {crop}")
    _choice(path, w, pre, "interpolation", INTERPOLATIONS)
    if pre.get("colour", "RGB") != "RGB":
        _fail(path, w, f"colour must be 'RGB', got {_show(pre.get('colour'))}")
    # applied in float32: mean finite there, std a normal float32, so (x - mean) / std is no NaN
    for key, lo in (("mean", -F32_MAX), ("std", F32_TINY)):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(t) for t in v)):
            _fail(path, w, f"{key!r} must be a list of 3 numbers")
        if not all(lo <= t <= F32_MAX for t in v):
            _fail(path, w, f"{key!r} values must lie in [{lo:g}, {F32_MAX:g}], got {_show(v)}")

    nodes, used = _validate_graph(path, graph, arrays, (H, W, 3),
                                  (float(inp["scale"]), inp["zero_point"]), requant)
    extra = sorted(set(arrays) - used)
    if extra:
        _fail(path, f"tensor {_show(extra[0])}", "not used by any graph node")
    if len(labels) != nodes[-1].attrs["cout"]:
        _fail(path, "metadata key 'ternet.labels'",
              f"{len(labels)} labels for a classifier with {nodes[-1].attrs['cout']} outputs")
    return ModelFile(path=path, arch=arch, graph=tuple(nodes), tensors=arrays, input=inp,
                     preprocess=pre, labels=tuple(labels), provenance=prov, metrics=metrics,
                     metadata=dict(meta), requant=requant)


def _expect(path, arrays, used, name, dtype, shape):
    if name not in arrays:
        _fail(path, f"tensor {name!r}", "missing")
    a = arrays[name]
    if a.dtype != np.dtype(dtype):
        _fail(path, f"tensor {name!r}", f"dtype {a.dtype} (expected {np.dtype(dtype)})")
    if tuple(a.shape) != tuple(shape):
        _fail(path, f"tensor {name!r}", f"shape {list(a.shape)} (expected {list(shape)})")
    used.add(name)
    return a


def _qparams(path, arrays, used, name):
    s = _expect(path, arrays, used, f"{name}.output_scale", np.float32, (1,))
    z = _expect(path, arrays, used, f"{name}.output_zero_point", np.int32, (1,))
    if not _normal_f32(s[0]):
        _fail(path, f"tensor {name + '.output_scale'!r}",
              f"must be finite and > 0 (a normal float32, >= 2**-126), got {s[0]}")
    if not 0 <= z[0] <= 255:
        _fail(path, f"tensor {name + '.output_zero_point'!r}", f"{z[0]} outside [0, 255]")
    return float(s[0]), int(z[0])


def _weight_scale(path, arrays, used, name, c):
    s = _expect(path, arrays, used, f"{name}.weight_scale", np.float32, (c,))
    if not np.all(_normal_f32(s)):
        _fail(path, f"tensor {name + '.weight_scale'!r}",
              "every scale must be finite and > 0 (a normal float32, >= 2**-126)")
    return s


def _check_acc(path, name, bias, w, zx):
    """No int32 accumulator can overflow: |bias| + 255*sum|w| and the folded bias fit in int32."""
    wa = np.abs(w.reshape(w.shape[0], -1).astype(np.int64)).sum(axis=1)
    ws = w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
    b = bias.astype(np.int64)
    if np.any(np.abs(b) + 255 * wa > INT32_MAX) or np.any(np.abs(b - zx * ws) + 255 * wa > INT32_MAX):
        _fail(path, f"node {name!r}", "bias and weights can overflow the int32 accumulator")


def pointwise_weight(mf_or_arrays, node: Node) -> np.ndarray:
    """Canonical int8 [Cout, Cin] weights of a pointwise node (ternary unpacked, hybrid merged)."""
    arrays = mf_or_arrays.tensors if isinstance(mf_or_arrays, ModelFile) else mf_or_arrays
    a = node.attrs
    if a["weight"] == "int8":
        return arrays[f"{node.name}.weight"]
    w = unpack_ternary(arrays[f"{node.name}.weight"], a["cin"])
    if a["weight"] == "hybrid":
        w = w.copy()
        w[arrays[f"{node.name}.int8_channels"]] = arrays[f"{node.name}.weight_int8"]
    return w


class NodeCheck:
    """The loader's checks of one graph node, as its op's `check` (ternet.ops) uses them: every
    failure is a ModelFormatError naming the file and the node or tensor."""
    PADDINGS, ACTIVATIONS, WEIGHT_TYPES = PADDINGS, ACTIVATIONS, WEIGHT_TYPES
    MAX_CHANNELS, INT32_MAX, CODE_INVALID = MAX_CHANNELS, INT32_MAX, CODE_INVALID
    ternary_codes = staticmethod(ternary_codes)

    def __init__(self, path, arrays: dict, used: set, name: str, op: str, inputs, attrs: dict,
                 requant: str = "ternet"):
        self.path, self.arrays, self.used = path, arrays, used
        self.requant = requant           # the file's requantization rule (quant.RULES)
        self.name, self.op, self.inputs, self.attrs = name, op, tuple(inputs), attrs
        self.where = f"node {name!r}"
        self.out_qparams = None          # (scale, zero point) once output_qparams() checked them

    def node(self) -> Node:
        return Node(self.name, self.op, self.inputs, self.attrs)

    def fail(self, problem: str):
        _fail(self.path, self.where, problem)

    def fail_tensor(self, fld: str, problem: str):
        _fail(self.path, f"tensor {self.name + '.' + fld!r}", problem)

    def int(self, key: str, lo: int, hi: int) -> int:
        """An integer attribute in [lo, hi]."""
        return _num(self.path, self.where, self.attrs, key, lo, hi, True)

    def choice(self, key: str, choices) -> str:
        return _choice(self.path, self.where, self.attrs, key, choices)

    def tensor(self, fld: str, dtype, shape) -> np.ndarray:
        """The node's tensor `<name>.<fld>`, of exactly this dtype and shape; marked used."""
        return _expect(self.path, self.arrays, self.used, f"{self.name}.{fld}", dtype, shape)

    def output_qparams(self) -> tuple[float, int]:
        self.out_qparams = _qparams(self.path, self.arrays, self.used, self.name)
        return self.out_qparams

    def weight_scale(self, c: int) -> np.ndarray:
        return _weight_scale(self.path, self.arrays, self.used, self.name, c)

    def accumulator(self, bias, w, zx) -> None:
        _check_acc(self.path, self.name, bias, w, zx)

    def multiplier(self, what: str, rule, *scales) -> None:
        _check_multiplier(self.path, self.where, what, rule, *scales)

    def im2col(self, k, cin, ho, wo) -> None:
        _check_im2col(self.path, self.where, k, cin, ho, wo)


def _validate_graph(path, graph, arrays, in_shape, in_qp, requant="ternet"):
    from .ops import REGISTRY, Value, names
    if not graph:
        _fail(path, "graph", "is empty")
    classifier = names(classifier=True)[0]
    values = {"input": Value(in_shape, *in_qp)}
    used: set = set()
    nodes = []
    for i, raw in enumerate(graph):
        if not isinstance(raw, dict):
            _fail(path, f"graph node #{i}", "is not a JSON object")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "input":
            _fail(path, f"graph node #{i}", f"invalid name {_show(name)}")
        where = f"node {name!r}"
        if name in values:
            _fail(path, where, "duplicate node name")
        op = raw.get("op")
        if not isinstance(op, str) or op not in REGISTRY:
            _fail(path, where, f"unknown op {_show(op)} (supported: {', '.join(REGISTRY)})")
        spec = REGISTRY[op]
        inputs = raw.get("inputs")
        attrs = raw.get("attrs", {})
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
            _fail(path, where, "'inputs' must be a list of node names")
        if not isinstance(attrs, dict):
            _fail(path, where, "'attrs' must be an object")
        if len(inputs) != spec.arity:
            _fail(path, where, f"op {op!r} takes {spec.arity} input(s), got {len(inputs)}")
        for s in inputs:
            if s not in values:
                _fail(path, where, f"input {_show(s)} is not the graph input or an earlier node")
        if "input" in inputs and not spec.reads_image:
            # the fast runner keeps the image unpadded (3 channels) for the stem's im2col;
            # every other kernel reads channel-padded buffers
            readers = " or ".join(names(reads_image=True))
            _fail(path, where, f"op {op!r} cannot read the graph input (only {readers} can)")
        if not spec.classifier and i == len(graph) - 1:
            _fail(path, where, f"the last node must be the {classifier!r} classifier")
        if spec.classifier and i != len(graph) - 1:
            _fail(path, where, f"{op!r} must be the last node")
        check = NodeCheck(path, arrays, used, name, op, inputs, attrs, requant)
        out = spec.check(check, attrs, [values[s] for s in inputs])
        if out[0] * out[1] * out[2] > MAX_VALUES:
            _fail(path, where, f"output {out[0]}x{out[1]}x{out[2]} has more than {MAX_VALUES} "
                  "values")
        values[name] = Value(tuple(out), *(check.out_qparams or (float("nan"), -1)))
        nodes.append(Node(name, op, tuple(inputs), attrs, tuple(out)))
    return nodes, used
