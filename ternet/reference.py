"""Reference runner: executes a model file with the numpy `*_ref` ops only.

Slow and obvious, on canonical (unpadded) tensors: each node runs its op's reference step
(`ternet.ops`). It is the yardstick the fast executors (`ternet.executors`) must match bit for
bit, and what the exporter's tests compare against.
"""
from __future__ import annotations

import numpy as np

from .format import ModelFile
from .ops._base import padding_of, requant_params, value_qparams as node_qparams
from .ops.add import add_params
from .ops.global_avg_pool import pool_params

__all__ = ["run_reference", "run_node", "node_qparams", "requant_params", "padding_of",
           "add_params", "pool_params"]


def run_reference(mf: ModelFile, x: np.ndarray) -> np.ndarray:
    """x uint8 [N, H, W, 3] (quantized input) -> float32 logits [N, num_classes]."""
    vals = {"input": np.ascontiguousarray(x, np.uint8)}
    for node in mf.graph:
        vals[node.name] = run_node(mf, node, [vals[s] for s in node.inputs])
    return vals[mf.graph[-1].name]


def run_node(mf: ModelFile, node, inputs: list) -> np.ndarray:
    """One node on its input values (uint8 NHWC; the graph's own or any others of the same
    shape, e.g. another engine's, to compare layers one at a time) -> its output value."""
    from .ops import REGISTRY
    return REGISTRY[node.op].reference(mf, node, [np.ascontiguousarray(a, np.uint8) for a in inputs])
