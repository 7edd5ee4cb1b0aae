"""Lowering: a validated graph -> a `Program`, the list of fast steps over an arena of buffers.

Each node becomes its op's step (`ternet.ops`, `Op.build`), with the kernel this CPU and the
`kernels` request choose (`cpu.pointwise_kernel`, `cpu.classifier_kernel`); a residual add right
after a pointwise conv whose kernel can take it is fused into that conv's epilogue. Values live
in arena slots (0: the graph input, 1..len(graph): the node values, then the depthwise steps'
shared scratch); `arena_views` lays the slots over buffers shared by liveness, so a network
needs only a few of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import cpu
from .kernels.layout import pad_to, rows_for
from .ops import REGISTRY, Shape


# ---------------------------------------------------------------------------- lowering

@dataclass
class BuildContext:
    """What an op's step factory sees: the model file, the kernel request, and the arena slot and
    buffer shape of every value (slot 0 is the graph input)."""
    mf: object
    kernels: str
    slots: dict               # value name -> arena slot
    shapes: list              # arena slot -> Shape
    scratch: int              # arena slot of the depthwise steps' bordered-input scratch

    def slot(self, name: str) -> int:
        return self.slots[name]

    def shape(self, name: str) -> Shape:
        return self.shapes[self.slots[name]]

    def out_shape(self, node) -> Shape:
        return self.shapes[self.slots[node.name]]

    def conv_kernel(self) -> str:
        """The int8 GEMM family behind a k x k conv's im2col (the stem)."""
        return cpu.pointwise_kernel(False, self.kernels)

    def pointwise_kernel(self, weight: str) -> str:
        """The family for a pointwise layer with `weight` in {ternary, int8, hybrid}."""
        return cpu.pointwise_kernel(weight in ("ternary", "hybrid"), self.kernels)

    def classifier_kernel(self) -> str:
        return cpu.classifier_kernel(self.kernels)


@dataclass(frozen=True)
class Program:
    """The lowered graph. `steps[:-1]` write uint8 values into arena slots, `steps[-1]` (the
    classifier) the float32 logits."""
    steps: tuple
    names: tuple              # graph node name(s) each step computes ('a+b': a fused add)
    shapes: tuple             # arena slot -> Shape of its value
    last_use: dict            # value name -> index of the last node that reads it
    graph: tuple              # the model file's nodes

    @property
    def scratch_slot(self) -> int:
        return scratch_slot(self.graph)


def scratch_slot(graph) -> int:
    """Arena slot of the depthwise steps' shared bordered-input scratch: slot 0 is the graph
    input, 1..len(graph) the node values, then the scratch."""
    return len(graph) + 1


def lower(mf, kernels: str) -> Program:
    """Build every step once (weights packed, multipliers derived, kernels chosen)."""
    graph = mf.graph
    h, w = mf.input["height"], mf.input["width"]
    slots = {"input": 0} | {node.name: i + 1 for i, node in enumerate(graph)}
    shapes = [Shape(h, w, 3, 3)] + [Shape(*n.out_shape, pad_to(n.out_shape[2])) for n in graph]
    ctx = BuildContext(mf, kernels, slots, shapes, scratch_slot(graph))
    uses: dict = {}
    for node in graph:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    last_use = {name: i for i, node in enumerate(graph) for name in node.inputs}
    steps, names = [], []
    i = 0
    while i < len(graph):
        node = graph[i]
        step = REGISTRY[node.op].build(ctx, node)
        add = _residual_add_after(graph, i, uses)
        fused = add is not None and step.with_residual_add(
            mf, add, add.inputs[1] == node.name, slots[_other(add, node.name)], slots[add.name])
        if fused:
            steps.append(fused)
            names.append(f"{node.name}+{add.name}")
            for name in node.inputs:     # the conv's input is read while the add's output
                last_use[name] = max(last_use[name], i + 1)     # is written
            i += 2
            continue
        steps.append(step)
        names.append(node.name)
        i += 1
    return Program(tuple(steps), tuple(names), tuple(shapes), last_use, tuple(graph))


def _residual_add_after(graph, i: int, uses: dict):
    """The add node after node i that its kernel may compute in node i's epilogue: node i is a
    pointwise conv read only by that add, whose other operand is another earlier value (not the
    graph input, which is never channel-padded). None if there is none."""
    node = graph[i]
    nxt = graph[i + 1] if i + 1 < len(graph) else None
    if (node.op != "pointwise" or nxt is None or nxt.op != "add" or node.name not in nxt.inputs
            or uses.get(node.name) != 1 or nxt.inputs[0] == nxt.inputs[1]
            or _other(nxt, node.name) == "input"):
        return None
    return nxt


def _other(add_node, name: str) -> str:
    """The input of a two-input add node that is not `name`."""
    return add_node.inputs[0] if add_node.inputs[1] == name else add_node.inputs[1]


# ---------------------------------------------------------------------------- arena

def arena_views(program: Program, n: int) -> list:
    """2-D views [rows, cp] for every arena slot for a batch of n images, over buffers shared by
    liveness (best fit), and the depthwise scratch in the last slot. Slot 0 (the graph input) is
    left for the caller; the classifier writes the caller's logits array."""
    graph = program.graph
    free: list[np.ndarray] = []
    live: dict[str, np.ndarray] = {}
    views: list = [None] * (len(graph) + 1)
    for i, node in enumerate(graph[:-1]):
        s = program.shapes[i + 1]
        need = rows_for(n * s.h * s.w) * s.cp
        free.sort(key=lambda b: b.size)          # best fit
        j = next((j for j, b in enumerate(free) if b.size >= need), None)
        buf = np.zeros(need, np.uint8) if j is None else free.pop(j)
        live[node.name] = buf
        views[i + 1] = buf[:need].reshape(-1, s.cp)
        for name in set(node.inputs):
            if name != "input" and program.last_use.get(name) == i:
                free.append(live.pop(name))
    assert len(views) == program.scratch_slot
    scratch = max((getattr(s, "scratch_bytes", lambda n: 0)(n) for s in program.steps), default=0)
    views.append(np.zeros(scratch, np.uint8))
    return views
