"""Layers: small frozen dataclasses built once at load time from graph nodes.

Each holds its prepared kernel plan (packed/padded weights, folded biases, precomputed
multipliers) and the ids of the values it reads and writes. `run(v, n)` gets `v`, the list of
2-D `[rows, Cp]` uint8 views of the preallocated activation buffers for a batch of `n`
images, and only calls kernels: no preparation, no allocation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    h: int
    w: int
    c: int            # real channels
    cp: int           # channels in the buffer (padded to CH_ALIGN; the graph input is not)

    def nhwc(self, buf, n):
        """The NHWC view of the first n images of a 2-D [rows, cp] buffer."""
        return buf[: n * self.h * self.w].reshape(n, self.h, self.w, self.cp)


@dataclass(frozen=True)
class Conv:
    """k x k int8 convolution (the stem): im2col + int8 GEMM."""
    src: int
    dst: int
    src_shape: Shape
    plan: object

    def run(self, v, n):
        self.plan(self.src_shape.nhwc(v[self.src], n), v[self.dst])


@dataclass(frozen=True)
class Pointwise:
    """1x1 convolution, ternary / int8 / hybrid weights."""
    src: int
    dst: int
    shape: Shape
    plan: object

    def run(self, v, n):
        self.plan(v[self.src], n * self.shape.h * self.shape.w, v[self.dst])


@dataclass(frozen=True)
class PointwiseAdd:
    """1x1 convolution with the residual add after it fused into its epilogue (see
    kernels.vnni.PwAddPlan): writes the add's output, reading the conv input and the residual."""
    src: int
    res: int
    dst: int
    shape: Shape
    plan: object

    def run(self, v, n):
        self.plan(v[self.src], n * self.shape.h * self.shape.w, v[self.dst], v[self.res])


@dataclass(frozen=True)
class Depthwise:
    src: int
    dst: int
    src_shape: Shape
    dst_shape: Shape
    plan: object
    pad: int = -1        # arena slot of the bordered-input scratch shared by the layers (-1: none)

    def run(self, v, n):
        self.plan(self.src_shape.nhwc(v[self.src], n), self.dst_shape.nhwc(v[self.dst], n),
                  v[self.pad] if self.pad >= 0 else None)


@dataclass(frozen=True)
class Add:
    """Residual add of two uint8 tensors with different scales."""
    a: int
    b: int
    dst: int
    shape: Shape
    plan: object

    def run(self, v, n):
        self.plan(v[self.a], v[self.b], n * self.shape.h * self.shape.w, v[self.dst])


@dataclass(frozen=True)
class GlobalAvgPool:
    src: int
    dst: int
    shape: Shape      # of the input
    plan: object

    def run(self, v, n):
        s = self.shape
        self.plan(v[self.src][: n * s.h * s.w].reshape(n, s.h * s.w, s.cp), v[self.dst][:n])


@dataclass(frozen=True)
class Linear:
    """int8 classifier -> float32 logits (the graph output)."""
    src: int
    plan: object

    def run(self, v, n, logits):
        self.plan(v[self.src], n, logits)
