"""Per-layer accounting of a model file: MACs, multiplications vs additions, storage, energy.

Pure functions over a parsed `ternet.format.ModelFile` (no kernels, no numba); each op's counts
come from its module's `cost` (`ternet.ops`). The CLI's `ternet info` formats what `analyze`
returns.

Counting rules
--------------
* A MAC is one weight x activation product summed into an accumulator, counted densely over
  the layer's weights (padding taps of convs included, the usual convention).
* int8 layers (stem conv, depthwise, int8 pointwise, classifier): every MAC is one
  multiplication and one addition.
* Ternary pointwise: a weight of +-1 is one addition (or subtraction) per output pixel and no
  multiplication; a weight of 0 is skipped (no operation). Hybrid layers count their int8
  filters as int8 and the rest as ternary.
* Residual adds and global average pooling are additions (one per input element), not MACs.
* Not counted: requantization (one multiply-add per output element, reported separately as
  `requant_outputs`), memory traffic, and activation functions (clamps).

Energy model (compute only)
---------------------------
Per-operation energies at 45 nm from M. Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014, the table PROM's float16 comparison appears to use (see
docs in shared research, papers.md 1.6): int8 add 0.03 pJ, int8 multiply 0.2 pJ, int32 add
0.1 pJ, fp16 add 0.4 pJ, fp16 multiply 1.1 pJ, fp32 add 0.9 pJ, fp32 multiply 3.7 pJ.
The baselines run the same architecture densely in floating point: a MAC is one multiply and
one add, elementwise additions one add. Two charging rules for our model's additions are
reported: "int8" (every accumulation priced as an int8 add, the PROM-style headline) and
"int32" (accumulations priced as int32 adds, closer to real int32 accumulators).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Horowitz, ISSCC 2014, 45 nm, picojoules per operation.
ENERGY_PJ = {
    "int8_add": 0.03,
    "int8_mul": 0.2,
    "int32_add": 0.1,
    "fp16_add": 0.4,
    "fp16_mul": 1.1,
    "fp32_add": 0.9,
    "fp32_mul": 3.7,
}
ENERGY_SOURCE = "Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm)"

__all__ = ["LayerInfo", "ModelInfo", "analyze", "ternary_nonzeros", "ENERGY_PJ"]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    in_shapes: tuple         # ((H, W, C), ...) of each input
    out_shape: tuple         # (H, W, C)
    weight: str              # "int8", "ternary", "hybrid" or "-" (no weights)
    macs: int                # dense multiply-accumulates
    int8_macs: int           # of which computed as int8 multiply + add
    ternary_macs: int        # of which have a ternary weight (adds or skipped)
    mults: int               # multiplications actually performed
    adds: int                # additions from MACs (int8 MACs + nonzero ternary weights)
    skipped: int             # ternary MACs with a zero weight: no operation
    elementwise_adds: int    # residual-add / pooling additions (not MACs)
    params: int              # logical weights + biases (what a float model would store)
    bytes: int               # bytes of this node's tensors in the file (packed, with scales)
    outputs: int             # output elements that are requantized (0 for the classifier)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["in_shapes"] = [list(s) for s in self.in_shapes]
        d["out_shape"] = list(self.out_shape)
        return d


@dataclass(frozen=True)
class ModelInfo:
    path: str
    arch: str
    layers: tuple            # of LayerInfo
    totals: dict             # sums of the LayerInfo counters
    storage: dict            # bytes: ours vs fp32/fp16 of the same parameter count
    energy: dict             # pJ per image under each rule, ratios to the baselines
    requant: str = "ternet"  # the file's requantization rule (quant.RULES)

    def as_dict(self) -> dict:
        return {"path": self.path, "arch": self.arch, "requant": self.requant,
                "layers": [l.as_dict() for l in self.layers],
                "totals": self.totals, "storage": self.storage, "energy": self.energy}


def ternary_nonzeros(packed: np.ndarray) -> np.ndarray:
    """Per-row count of nonzero weights in packed 2-bit codes (code 1 = zero, also padding)."""
    p = np.asarray(packed, np.uint8)
    nz = np.zeros(p.shape[0], np.int64)
    for shift in (0, 2, 4, 6):
        nz += (((p >> shift) & 3) != 1).sum(axis=1)
    return nz


def _node_bytes(mf, name: str) -> int:
    prefix = name + "."
    return int(sum(a.nbytes for k, a in mf.tensors.items() if k.startswith(prefix)))


def _layer(mf, node, in_shapes) -> LayerInfo:
    from .ops import REGISTRY
    c = REGISTRY[node.op].cost(mf, node, in_shapes)
    ho, wo, co = node.out_shape
    return LayerInfo(
        name=node.name, op=node.op, in_shapes=tuple(tuple(s) for s in in_shapes),
        out_shape=tuple(node.out_shape), weight=c.weight, macs=c.macs, int8_macs=c.int8_macs,
        ternary_macs=c.ternary_macs, mults=c.int8_macs, adds=c.int8_macs + c.ternary_adds,
        skipped=c.ternary_macs - c.ternary_adds, elementwise_adds=c.elementwise_adds,
        params=c.params, bytes=_node_bytes(mf, node.name),
        outputs=ho * wo * co if c.outputs is None else c.outputs)


def _energy(t: dict) -> dict:
    """pJ per image for our model under two accumulation prices, and the float baselines."""
    e = ENERGY_PJ
    tern_adds = t["adds"] - t["int8_macs"]           # additions from nonzero ternary weights
    ours = {}
    for acc in ("int8", "int32"):
        add = e[f"{acc}_add"]
        ours[acc] = (t["int8_macs"] * (e["int8_mul"] + add) + tern_adds * add
                     + t["elementwise_adds"] * add)
    dense = (t["int8_macs"] * (e["int8_mul"] + e["int8_add"])
             + t["ternary_macs"] * e["int8_add"] + t["elementwise_adds"] * e["int8_add"])
    fp16 = t["macs"] * (e["fp16_mul"] + e["fp16_add"]) + t["elementwise_adds"] * e["fp16_add"]
    fp32 = t["macs"] * (e["fp32_mul"] + e["fp32_add"]) + t["elementwise_adds"] * e["fp32_add"]
    # Sensitivity: requantization as one fp32 multiply + one fp32 add per output element.
    requant = t["outputs"] * (e["fp32_mul"] + e["fp32_add"])
    return {
        "unit": "pJ per image",
        "source": ENERGY_SOURCE,
        "per_op_pJ": dict(ENERGY_PJ),
        "ours_int8_accumulate": ours["int8"],
        "ours_int32_accumulate": ours["int32"],
        "ours_int8_accumulate_dense_ternary": dense,
        "requant_fp32": requant,
        "fp16_baseline": fp16,
        "fp32_baseline": fp32,
        "ratio_fp16_int8_accumulate": _ratio(fp16, ours["int8"]),
        "ratio_fp16_int32_accumulate": _ratio(fp16, ours["int32"]),
        "ratio_fp16_dense_ternary": _ratio(fp16, dense),
        "ratio_fp16_int8_accumulate_with_requant": _ratio(fp16, ours["int8"] + requant),
        "ratio_fp32_int8_accumulate": _ratio(fp32, ours["int8"]),
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def analyze(mf) -> ModelInfo:
    """Per-layer and total counts, storage and energy estimate of a parsed model file."""
    shapes = {"input": (mf.input["height"], mf.input["width"], 3)}
    layers = []
    for node in mf.graph:
        layers.append(_layer(mf, node, [shapes[s] for s in node.inputs]))
        shapes[node.name] = tuple(node.out_shape)
    keys = ("macs", "int8_macs", "ternary_macs", "mults", "adds", "skipped",
            "elementwise_adds", "params", "bytes", "outputs")
    totals = {k: int(sum(getattr(l, k) for l in layers)) for k in keys}
    tensor_bytes = int(sum(a.nbytes for a in mf.tensors.values()))
    storage = {
        "tensor_bytes": tensor_bytes,
        "fp32_bytes": 4 * totals["params"],
        "fp16_bytes": 2 * totals["params"],
        "ratio_fp32": _ratio(4 * totals["params"], tensor_bytes),
        "ratio_fp16": _ratio(2 * totals["params"], tensor_bytes),
    }
    return ModelInfo(path=str(mf.path), arch=mf.arch, layers=tuple(layers), totals=totals,
                     storage=storage, energy=_energy(totals), requant=mf.requant)
