"""Build small .tflite flatbuffers in tests, with no TensorFlow and no network.

    t = TensorSpec("w", (8, 1, 1, 4), "int8", data=w, scales=s, zero_points=[0] * 8)
    op = OpSpec("CONV_2D", [0, 1, 2], [3], "Conv2DOptions", {"Padding": 0, "StrideW": 1, ...})
    raw = build_tflite([t0, t1, ...], [op, ...], inputs=[0], outputs=[3])

Option names are the generated builder's field names (`Conv2DOptionsAddStrideW` -> "StrideW");
enum fields take the schema integers (Padding SAME = 0, VALID = 1; activation NONE 0, RELU 1,
RELU6 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
import tflite

TYPES = {"float32": 0, "int32": 2, "uint8": 3, "int64": 4, "int16": 7, "int8": 9}
OPCODES = {name: code for code, name in tflite.utils.BUILTIN_OPCODE2NAME.items()}


@dataclass
class TensorSpec:
    name: str
    shape: tuple
    dtype: str
    data: np.ndarray | None = None
    scales: list | None = None
    zero_points: list | None = None
    quantized_dimension: int = 0


@dataclass
class OpSpec:
    opcode: str
    inputs: list
    outputs: list
    options_type: str | None = None     # e.g. "Conv2DOptions"
    options: dict = field(default_factory=dict)


def _vector(b, values, dtype):
    return b.CreateNumpyVector(np.asarray(values, dtype))


def _quantization(b, t: TensorSpec):
    if t.scales is None:
        return None
    scale = _vector(b, t.scales, np.float32)
    zps = _vector(b, t.zero_points if t.zero_points is not None else [0] * len(t.scales), np.int64)
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale)
    tflite.QuantizationParametersAddZeroPoint(b, zps)
    tflite.QuantizationParametersAddQuantizedDimension(b, t.quantized_dimension)
    return tflite.QuantizationParametersEnd(b)


def _tensor(b, t: TensorSpec, buffer_index: int):
    name = b.CreateString(t.name)
    shape = _vector(b, t.shape, np.int32)
    quant = _quantization(b, t)
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape)
    tflite.TensorAddType(b, TYPES[t.dtype])
    tflite.TensorAddBuffer(b, buffer_index)
    tflite.TensorAddName(b, name)
    if quant is not None:
        tflite.TensorAddQuantization(b, quant)
    return tflite.TensorEnd(b)


def _options(b, op: OpSpec):
    kind = op.options_type
    vectors = {k: _vector(b, v, np.int32) for k, v in op.options.items() if isinstance(v, list)}
    getattr(tflite, f"{kind}Start")(b)
    for k, v in op.options.items():
        getattr(tflite, f"{kind}Add{k}")(b, vectors.get(k, v))
    return getattr(tflite.BuiltinOptions, kind), getattr(tflite, f"{kind}End")(b)


def _operator(b, op: OpSpec, opcode_index: int):
    ins, outs = _vector(b, op.inputs, np.int32), _vector(b, op.outputs, np.int32)
    opts = _options(b, op) if op.options_type else None
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, opcode_index)
    tflite.OperatorAddInputs(b, ins)
    tflite.OperatorAddOutputs(b, outs)
    if opts is not None:
        tflite.OperatorAddBuiltinOptionsType(b, opts[0])
        tflite.OperatorAddBuiltinOptions(b, opts[1])
    return tflite.OperatorEnd(b)


def _opcode(b, name: str):
    code = OPCODES[name]
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
    tflite.OperatorCodeAddBuiltinCode(b, code)
    tflite.OperatorCodeAddVersion(b, 1)
    return tflite.OperatorCodeEnd(b)


def _buffer(b, data):
    if data is not None:
        little = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"))
        raw = _vector(b, np.frombuffer(little.tobytes(), np.uint8), np.uint8)
    else:
        raw = None
    tflite.BufferStart(b)
    if raw is not None:
        tflite.BufferAddData(b, raw)
    return tflite.BufferEnd(b)


def _table_vector(b, start, items):
    start(b, len(items))
    for it in reversed(items):
        b.PrependUOffsetTRelative(it)
    return b.EndVector()


def build_tflite(tensors: list, ops: list, inputs: list, outputs: list) -> bytes:
    """The bytes of a one-subgraph TFLite model (schema version 3)."""
    b = flatbuffers.Builder(1024)
    constants = [t for t in tensors if t.data is not None]
    buffers = [_buffer(b, None)] + [_buffer(b, t.data) for t in constants]
    buffer_of = {id(t): i + 1 for i, t in enumerate(constants)}
    tensor_offsets = [_tensor(b, t, buffer_of.get(id(t), 0)) for t in tensors]
    names = list(dict.fromkeys(op.opcode for op in ops))
    op_offsets = [_operator(b, op, names.index(op.opcode)) for op in ops]
    code_offsets = [_opcode(b, n) for n in names]

    tensors_vec = _table_vector(b, tflite.SubGraphStartTensorsVector, tensor_offsets)
    ops_vec = _table_vector(b, tflite.SubGraphStartOperatorsVector, op_offsets)
    ins, outs = _vector(b, inputs, np.int32), _vector(b, outputs, np.int32)
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, ins)
    tflite.SubGraphAddOutputs(b, outs)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    subgraphs_vec = _table_vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
    codes_vec = _table_vector(b, tflite.ModelStartOperatorCodesVector, code_offsets)
    buffers_vec = _table_vector(b, tflite.ModelStartBuffersVector, buffers)
    desc = b.CreateString("ternet test model")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())
