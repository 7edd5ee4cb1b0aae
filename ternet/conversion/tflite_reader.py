"""Read a .tflite flatbuffer into plain Python objects (needs the `convert` extra: `tflite`).

    from ternet.conversion.tflite_reader import read_tflite
    m = read_tflite("model.tflite")
    for op in m.ops:                      # execution order of the main subgraph
        print(op.opcode, op.inputs, op.outputs, op.options)
    t = m.tensors[op.inputs[1]]           # TFLiteTensor
    t.name, t.shape, t.dtype, t.data      # data: numpy array for constants, else None
    t.quant.scales, t.quant.zero_points, t.quant.quantized_dimension

API
---
`read_tflite(path) -> TFLiteModel`; any problem with the file raises
`TFLiteFormatError` (a `ternet.ModelFormatError`) with one line naming the file and what is wrong.

* `TFLiteModel`: `path`, `version` (schema version), `description`, `tensors` (list, indexed
  by tensor id), `ops` (list of `TFLiteOp` in execution order), `inputs` / `outputs` (tensor ids
  of the graph), `num_subgraphs` (only subgraph 0, the main graph, is read).
* `TFLiteOp`: `index`, `opcode` (builtin name as in the TFLite schema, e.g. `"CONV_2D"`; custom
  ops are `"CUSTOM:<name>"`), `inputs` / `outputs` (tensor ids; -1 marks an omitted optional
  input), `options` (dict of the op's builtin options, keys in schema spelling, e.g.
  `{"padding": "SAME", "stride_w": 2, "stride_h": 2, "fused_activation_function": "RELU6",
  "dilation_w_factor": 1, ...}`; `padding` and `fused_activation_function` are given by name,
  vectors as lists; empty for ops without options).
* `TFLiteTensor`: `index`, `name`, `shape` (tuple of ints), `dtype` (numpy name such as `"int8"`,
  `"uint8"`, `"int32"`, `"float32"`; lower-case TFLite type name for types numpy lacks, e.g.
  `"int4"`), `data` (read-only numpy array of `shape` for tensors backed by a non-empty buffer,
  None for activations and for types numpy lacks), `quant` (`Quantization` or None).
* `Quantization`: `scales` float32 array, `zero_points` int64 array (one entry per tensor,
  or per channel along `quantized_dimension`), `quantized_dimension` int. `per_channel` is True
  when there is more than one scale.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

FILE_IDENTIFIER = b"TFL3"
_CUSTOM = 32                        # BuiltinOperator.CUSTOM
_PLACEHOLDER_FOR_GREATER = 127      # deprecated_builtin_code value meaning "see builtin_code"

# TensorType -> numpy dtype name (types missing here are reported by their TFLite name).
_NUMPY_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
                7: "int16", 9: "int8", 10: "float64", 12: "uint64", 15: "uint32", 16: "uint16"}


class TFLiteFormatError(ModelFormatError):
    """A .tflite file that cannot be read: not a flatbuffer, truncated, inconsistent."""


@dataclass(frozen=True)
class Quantization:
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int = 0

    @property
    def per_channel(self) -> bool:
        return self.scales.size > 1


@dataclass(frozen=True)
class TFLiteTensor:
    index: int
    name: str
    shape: tuple
    dtype: str
    data: np.ndarray | None = None
    quant: Quantization | None = None


@dataclass(frozen=True)
class TFLiteOp:
    index: int
    opcode: str
    inputs: tuple
    outputs: tuple
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TFLiteModel:
    path: str
    version: int
    description: str
    tensors: list
    ops: list
    inputs: tuple
    outputs: tuple
    num_subgraphs: int = 1


def _tflite_package():
    try:
        import tflite
    except ImportError:
        raise ImportError("reading .tflite files needs the 'tflite' package: "
                          "pip install 'ternet[convert]'") from None
    return tflite


def read_tflite(path) -> TFLiteModel:
    """Parse `path` (a .tflite file) into a TFLiteModel; TFLiteFormatError on a bad file."""
    tfl = _tflite_package()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    buf = p.read_bytes()
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise TFLiteFormatError(f"{p}: not a TFLite flatbuffer (file identifier "
                                f"{buf[4:8]!r}, expected {FILE_IDENTIFIER!r})")
    try:
        return _read_model(tfl, str(p), buf)
    except TFLiteFormatError:
        raise
    except Exception as e:  # flatbuffers raises struct/index/unicode errors on corrupt offsets
        raise TFLiteFormatError(f"{p}: corrupt TFLite flatbuffer ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _read_model(tfl, path: str, buf: bytes) -> TFLiteModel:
    model = tfl.Model.GetRootAs(buf, 0)
    if model.SubgraphsLength() < 1:
        raise TFLiteFormatError(f"{path}: the model has no subgraph")
    opcodes = [_opcode_name(tfl, model.OperatorCodes(i))
               for i in range(model.OperatorCodesLength())]
    sg = model.Subgraphs(0)
    tensors = [_read_tensor(path, buf, model, sg.Tensors(i), i) for i in range(sg.TensorsLength())]
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        k = op.OpcodeIndex()
        if not 0 <= k < len(opcodes):
            raise TFLiteFormatError(f"{path}: operator #{i} has opcode index {k} "
                                    f"outside the {len(opcodes)} operator codes")
        ins, outs = _int_list(op.InputsAsNumpy()), _int_list(op.OutputsAsNumpy())
        for t in ins + outs:
            if not -1 <= t < len(tensors):
                raise TFLiteFormatError(f"{path}: operator #{i} ({opcodes[k]}) refers to "
                                        f"tensor {t}, but the graph has {len(tensors)}")
        ops.append(TFLiteOp(i, opcodes[k], tuple(ins), tuple(outs), _options(tfl, op)))
    desc = model.Description()
    return TFLiteModel(path=path, version=int(model.Version()),
                       description=desc.decode("utf-8", "replace") if desc else "",
                       tensors=tensors, ops=ops, inputs=tuple(_int_list(sg.InputsAsNumpy())),
                       outputs=tuple(_int_list(sg.OutputsAsNumpy())),
                       num_subgraphs=int(model.SubgraphsLength()))


def _int_list(a) -> list:
    """flatbuffers returns 0 (not an empty array) for an absent vector."""
    return [] if isinstance(a, int) else [int(v) for v in a]


def _opcode_name(tfl, code) -> str:
    # Schema rule: the real code is the larger of the deprecated int8 field and the int32 field.
    c = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
    if c == _CUSTOM:
        name = code.CustomCode()
        return "CUSTOM:" + (name.decode("utf-8", "replace") if name else "?")
    return tfl.utils.BUILTIN_OPCODE2NAME.get(c, f"UNKNOWN_OPCODE_{c}")


def _read_tensor(path, buf, model, t, index) -> TFLiteTensor:
    name = (t.Name() or b"").decode("utf-8", "replace")
    shape = tuple(_int_list(t.ShapeAsNumpy()))
    ttype = int(t.Type())
    dtype = _NUMPY_TYPES.get(ttype) or _type_name(ttype)
    data = None
    b = t.Buffer()
    if b:
        if not 0 <= b < model.BuffersLength():
            raise TFLiteFormatError(f"{path}: tensor {name!r} refers to buffer {b}, "
                                    f"but the file has {model.BuffersLength()}")
        raw = _buffer_bytes(path, buf, model.Buffers(b), name)
        if raw is not None and ttype in _NUMPY_TYPES:
            data = _constant(path, raw, dtype, shape, name)
    return TFLiteTensor(index, name, shape, dtype, data, _quantization(t.Quantization()))


def _type_name(ttype: int) -> str:
    import tflite
    names = {v: k for k, v in vars(tflite.TensorType).items() if isinstance(v, int)}
    return names.get(ttype, f"type{ttype}").lower()


def _buffer_bytes(path, buf, b, tensor_name):
    """The bytes of a buffer: inline data, or (files > 2 GB) an offset/size into the file."""
    if b.Offset() > 1:
        off, size = int(b.Offset()), int(b.Size())
        if off + size > len(buf):
            raise TFLiteFormatError(f"{path}: tensor {tensor_name!r}: its buffer "
                                    f"[{off}, {off + size}) lies past the end of the file")
        return buf[off:off + size]
    data = b.DataAsNumpy()
    return None if isinstance(data, int) or data.size == 0 else data.tobytes()


def _constant(path, raw: bytes, dtype: str, shape: tuple, name: str) -> np.ndarray:
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise TFLiteFormatError(f"{path}: tensor {name!r}: buffer holds {len(raw)} bytes, "
                                f"shape {list(shape)} of {dtype} needs {want}")
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    a.flags.writeable = False
    return a


def _quantization(q) -> Quantization | None:
    if q is None or q.ScaleLength() == 0:
        return None
    scales = np.asarray(q.ScaleAsNumpy(), np.float32)
    zps = q.ZeroPointAsNumpy()
    zps = np.zeros(scales.shape, np.int64) if isinstance(zps, int) else np.asarray(zps, np.int64)
    return Quantization(scales, zps, int(q.QuantizedDimension()))


# ---------------------------------------------------------------------------- builtin options

_ENUM_FIELDS = {"padding": "Padding", "fused_activation_function": "ActivationFunctionType"}


def _options(tfl, op) -> dict:
    kind = int(op.BuiltinOptionsType())
    table = op.BuiltinOptions()
    if kind == 0 or table is None:
        return {}
    names = {v: k for k, v in vars(tfl.BuiltinOptions).items() if isinstance(v, int)}
    cls = getattr(tfl, names.get(kind, ""), None)
    if cls is None:
        return {}
    obj = cls()
    obj.Init(table.Bytes, table.Pos)
    return {_snake(f): _enum_name(tfl, _snake(f), v) for f, v in _fields(cls, obj)}


def _fields(cls, obj):
    """(name, value) of every scalar or numeric-vector field of a generated options class."""
    members = vars(cls)
    for f, fn in members.items():
        if (not callable(fn) or f.startswith(("_", "GetRootAs", "Init")) or
                f.endswith(("AsNumpy", "Length", "IsNone", "BufferHasIdentifier"))):
            continue
        if f + "AsNumpy" in members:
            v = getattr(obj, f + "AsNumpy")()
            yield f, [] if isinstance(v, int) else v.tolist()
        elif len(inspect.signature(fn).parameters) == 1:
            v = getattr(obj, f)()
            if isinstance(v, (bool, int, float)):
                yield f, v
            elif isinstance(v, bytes):
                yield f, v.decode("utf-8", "replace")


def _snake(camel: str) -> str:
    """Generated accessor name -> schema field name: DilationWFactor -> dilation_w_factor."""
    out = []
    for i, ch in enumerate(camel):
        starts_word = i and ch.isupper() and (
            not camel[i - 1].isupper() or (i + 1 < len(camel) and camel[i + 1].islower()))
        if starts_word:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _enum_name(tfl, key: str, v):
    enum = _ENUM_FIELDS.get(key)
    if enum is None:
        return v
    names = {val: k for k, val in vars(getattr(tfl, enum)).items() if isinstance(val, int)}
    return names.get(v, v)
