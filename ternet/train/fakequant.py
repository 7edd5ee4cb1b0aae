"""`QuantGraph`: a folded network with ternet's quantization, in three modes.

* `float`: the folded float network (no quantization), for checks and as the teacher's twin.
* `fake`: differentiable fake quantization for QAT: weights int8 / ternary / hybrid per node
  with a straight-through estimator, uint8 per-tensor activations whose clamp bounds implement
  ReLU6 exactly as `quant.activation_bounds` does.
* `int`: exact emulation of the integer pipeline (input: uint8 values as a float tensor). The
  integer parameters come from `int_params()`, which uses `ternet.quant` and is also what the
  exporter writes, so engine and emulation share every number. Accumulators are integer-valued
  float64 (exact), converted to float32 and requantized with the same float32 ops in the same
  order as `quant.requant_ref` / `add_ref` / `pool_multiplier` / `logit_scale`.

Weights are stored folded, in torch layout, as parameters; activation ranges (lo, hi) per node
output as buffers; per-node weight mode ('int8' / 'ternary' / 'hybrid' + int8-row mask).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ternet import ops, quant
from .fold import FoldedNode
from .models import pad_input

WEIGHTED = ops.names(weighted=True)         # ops with weight, bias and weight_scale tensors


def requantized(op: str) -> bool:
    """Has a uint8 output with its own scale and zero point (not the float32 logits)."""
    return ops.get(op).requantized


def key(name: str) -> str:
    return name.replace(".", "__")


# ---------------------------------------------------------------------------- weight quantizers

@torch.no_grad()
def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8, mirroring quant.quantize_weights_int8 -> (q f64, s f32)."""
    w64 = w.detach().double().reshape(w.shape[0], -1)
    amax = w64.abs().amax(1)
    s = torch.where(amax > 0, amax / quant.WMAX, torch.ones_like(amax)).float()
    q = torch.clamp(torch.round(w64 / s.double()[:, None]), -quant.WMAX, quant.WMAX)
    return q.reshape(w.shape), s


@torch.no_grad()
def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel L2-optimal ternarization: for each filter keep the k largest |w| with
    k maximising (sum of kept |w|)^2 / k, scale = mean kept |w| -> (q in {-1,0,1} f64, s f32)."""
    w64 = w.detach().double().reshape(w.shape[0], -1)
    srt, idx = w64.abs().sort(1, descending=True)
    cs = srt.cumsum(1)
    counts = torch.arange(1, w64.shape[1] + 1, dtype=torch.float64)
    kbest = (cs * cs / counts).argmax(1)
    alpha = cs.gather(1, kbest[:, None])[:, 0] / (kbest + 1).double()
    rank = torch.empty_like(idx)
    rank.scatter_(1, idx, torch.arange(w64.shape[1]).expand_as(idx).contiguous())
    q = torch.sign(w64) * (rank <= kbest[:, None])
    s = torch.where(alpha > 0, alpha, torch.ones_like(alpha)).float()
    return q.reshape(w.shape), s


def quantize_weight(w, mode: str, int8_rows: torch.Tensor | None = None):
    if mode == "int8":
        return int8_weight(w)
    qt, st = ternary_weight(w)
    if mode == "ternary":
        return qt, st
    qi, si = int8_weight(w)                      # hybrid: listed rows int8, the rest ternary
    m = int8_rows.bool()
    return torch.where(m.view(-1, *[1] * (w.dim() - 1)), qi, qt), torch.where(m, si, st)


# ---------------------------------------------------------------------------- the graph

class QuantGraph(nn.Module):
    def __init__(self, nodes: list[FoldedNode], input_scale: float, input_zp: int):
        super().__init__()
        self.spec = [dict(name=n.name, op=n.op, inputs=list(n.inputs), attrs=dict(n.attrs)) for n in nodes]
        self.input_scale, self.input_zp = float(input_scale), int(input_zp)
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.wmode: dict[str, str] = {}
        for n in nodes:
            k = key(n.name)
            if n.op in WEIGHTED:
                self.weight[k] = nn.Parameter(n.weight.detach().clone().float())
                self.bias[k] = nn.Parameter(n.bias.detach().clone().float())
                self.wmode[n.name] = "int8"
                self.register_buffer(f"rows_{k}", torch.zeros(n.weight.shape[0], dtype=torch.bool))
            if requantized(n.op):
                self.register_buffer(f"rng_{k}", torch.tensor([-1.0, 1.0], dtype=torch.float64))
        self.mode = "float"
        self._int = None
        self._last_use = self._last_uses()

    # -- bookkeeping
    def _last_uses(self):
        last = {}
        for i, n in enumerate(self.spec):
            for s in n["inputs"]:
                last[s] = i
        return last

    def nodes(self, op=None):
        return [n for n in self.spec if op is None or n["op"] == op]

    def set_wmode(self, name, mode, int8_rows=None):
        self.wmode[name] = mode
        rows = getattr(self, f"rows_{key(name)}")
        rows.zero_()
        if int8_rows is not None:
            rows[torch.as_tensor(int8_rows, dtype=torch.long)] = True
        self._int = None

    def qparams(self, name: str) -> tuple[float, int]:
        if name == "input":
            return self.input_scale, self.input_zp
        lo, hi = getattr(self, f"rng_{key(name)}").tolist()
        return quant.choose_activation_qparams(lo, hi)

    def set_range(self, name, lo, hi):
        getattr(self, f"rng_{key(name)}").copy_(torch.tensor([lo, hi], dtype=torch.float64))
        self._int = None

    def qweight(self, name):
        k = key(name)
        return quantize_weight(self.weight[k], self.wmode[name], getattr(self, f"rows_{k}"))

    # -- float / fake forward, one node at a time (calibrate.py drives these too)
    def node_pre(self, n: dict, vals: dict) -> torch.Tensor:
        """Pre-activation float output of node n given its (float or fake-quantized) inputs."""
        op, a, k = n["op"], n["attrs"], key(n["name"])
        x = vals[n["inputs"][0]]
        if op == "add":
            return x + vals[n["inputs"][1]]
        if op == "global_avg_pool":
            return x.mean((2, 3), keepdim=True)
        w, b = self.weight[k], self.bias[k]
        if self.mode == "fake":
            q, s = self.qweight(n["name"])
            wq = (q * s.double().view(-1, *[1] * (w.dim() - 1))).float()
            w = w + (wq - w).detach()                  # straight-through estimator
        if op == "linear":
            return F.linear(x.flatten(1), w, b)
        groups = a["channels"] if op == "depthwise" else 1
        stride = a.get("stride", 1)
        x = pad_input(x, a.get("padding", "same"), w.shape[-1], stride)
        return F.conv2d(x, w, b, stride, 0, 1, groups)

    def node_post(self, n: dict, y: torch.Tensor) -> torch.Tensor:
        """Activation (float mode) or activation + uint8 fake quantization (fake mode)."""
        act = n["attrs"].get("activation", "none")
        if not requantized(n["op"]):
            return y
        if self.mode == "float":
            return F.relu6(y) if act == "relu6" else (F.relu(y) if act == "relu" else y)
        s, zp = self.qparams(n["name"])
        lo, hi = quant.activation_bounds(act, s, zp)
        yc = torch.clamp(y, (lo - zp) * s, (hi - zp) * s)
        q = torch.clamp(torch.floor(y / s + (zp + 0.5)), lo, hi)
        return yc + ((q - zp) * s - yc).detach()

    def input_real(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8-valued NCHW input -> its real value scale * (q - zp)."""
        return (x_u8.float() - self.input_zp) * self.input_scale

    def block_outputs(self) -> list[str]:
        """Nodes whose output leaves their block ('blocks.3.add' -> 'blocks.4.expand'): the
        feature maps a block-level distillation compares."""
        block = {n["name"]: n["name"].rsplit(".", 1)[0] for n in self.spec}
        out = {s for n in self.spec for s in n["inputs"] if s in block and block[s] != block[n["name"]]}
        return [n["name"] for n in self.spec if n["name"] in out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float/fake: x is the real-valued NCHW input; int: x holds uint8 values (any float dtype)."""
        if self.mode == "int":
            return self.forward_int(x)
        return self.forward_taps(x, ())[0]

    def forward_taps(self, x: torch.Tensor, taps) -> tuple[torch.Tensor, dict]:
        """float/fake forward -> (logits, {name: output of that node} for the node names in taps)."""
        vals, tapped = {"input": x}, {}
        for i, n in enumerate(self.spec):
            vals[n["name"]] = self.node_post(n, self.node_pre(n, vals))
            if n["name"] in taps:
                tapped[n["name"]] = vals[n["name"]]
            for s in n["inputs"]:
                if self._last_use[s] == i:
                    del vals[s]
        return vals[self.spec[-1]["name"]], tapped

    # -- exact integer emulation
    @torch.no_grad()
    def int_params(self) -> dict:
        """Every integer / float32 number the engine uses, per node (numpy), via ternet.quant."""
        out = {}
        for n in self.spec:
            name, op, a = n["name"], n["op"], n["attrs"]
            p = {}
            s_in, zx = self.qparams(n["inputs"][0])
            p["zx"] = zx
            if op in WEIGHTED:
                k = key(name)
                if self.wmode[name] == "int8":       # the canonical numpy rule
                    w = self.weight[k].detach().numpy()
                    q, s_w = quant.quantize_weights_int8(w.reshape(w.shape[0], -1), axis=0)
                    q = q.reshape(w.shape)
                else:
                    q, s_w = self.qweight(name)
                    q, s_w = q.numpy().astype(np.int8), s_w.numpy().astype(np.float32)
                p["q"], p["s_w"] = q, s_w
                p["bias"] = quant.quantize_bias(self.bias[k].detach().numpy(), s_in, s_w)
                p["rows"] = np.flatnonzero(getattr(self, f"rows_{k}").numpy()).astype(np.int32)
            if not requantized(op):
                p["scale"] = quant.logit_scale(s_in, p["s_w"])
            else:
                s_out, zp = self.qparams(name)
                p["s_out"], p["zp"] = s_out, zp
                p["lo"], p["hi"] = quant.activation_bounds(a.get("activation", "none"), s_out, zp)
                if op in WEIGHTED:
                    p["m"] = quant.requant_multiplier(s_in, p["s_w"], s_out)
                elif op == "add":
                    sb, zb = self.qparams(n["inputs"][1])
                    p["zb"] = zb
                    p["ma"], p["mb"] = quant.add_multipliers(s_in, sb, s_out)
                else:
                    p["s_in"] = s_in
            out[name] = p
        return out

    @staticmethod
    def _requant(acc64: torch.Tensor, m, zp, lo, hi) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(m, np.float32))
        if m.dim() == 1:
            m = m.view(1, -1, *[1] * (acc64.dim() - 2))
        v = acc64.float() * m                                   # f32(acc) * m
        v = v + torch.tensor(quant.zp_bias(zp))                 # separate add
        v = torch.clamp(v, float(lo), float(hi))
        return torch.floor(v).double()

    @torch.no_grad()
    def forward_int(self, x_u8: torch.Tensor) -> torch.Tensor:
        if self._int is None:
            self._int = self.int_params()
        P = self._int
        vals = {"input": x_u8.double()}
        for i, n in enumerate(self.spec):
            name, op, a, p = n["name"], n["op"], n["attrs"], P[n["name"]]
            x = vals[n["inputs"][0]] - p["zx"]
            if op in ("conv2d", "pointwise", "depthwise"):
                groups = a["channels"] if op == "depthwise" else 1
                stride = a.get("stride", 1)
                x = pad_input(x, a.get("padding", "same"), p["q"].shape[-1], stride)   # pads x - zx with 0
                # every partial sum is an integer; below 2**24 float32 is exact in any order (no
                # Winograd for 1x1 / depthwise), else float64
                exact32 = op != "conv2d" and 255 * np.abs(p["q"]).reshape(len(p["q"]), -1).sum(1).max() < 2**24
                dt = torch.float32 if exact32 else torch.float64
                w = torch.from_numpy(p["q"]).to(dt)
                acc = F.conv2d(x.to(dt), w, None, stride, 0, 1, groups).double()
                acc = acc + torch.from_numpy(p["bias"].astype(np.float64)).view(1, -1, 1, 1)
                y = self._requant(acc, p["m"], p["zp"], p["lo"], p["hi"])
            elif op == "add":
                fa = x.float() * torch.tensor(p["ma"])
                fb = (vals[n["inputs"][1]] - p["zb"]).float() * torch.tensor(p["mb"])
                v = (fa + fb) + torch.tensor(quant.zp_bias(p["zp"]))
                y = torch.floor(torch.clamp(v, float(p["lo"]), float(p["hi"]))).double()
            elif op == "global_avg_pool":
                hw = x.shape[2] * x.shape[3]
                acc = x.sum((2, 3), keepdim=True)
                y = self._requant(acc, quant.pool_multiplier(p["s_in"], p["s_out"], hw), p["zp"], p["lo"], p["hi"])
            else:  # linear
                w = torch.from_numpy(p["q"].astype(np.float64))
                acc = x.flatten(1) @ w.t() + torch.from_numpy(p["bias"].astype(np.float64))
                y = acc.float() * torch.from_numpy(p["scale"])
            vals[name] = y
            for s in n["inputs"]:
                if self._last_use[s] == i:
                    del vals[s]
        return vals[self.spec[-1]["name"]]

    # -- checkpoint support: the graph is rebuilt from its own description
    def describe(self) -> dict:
        return {"spec": self.spec, "input": [self.input_scale, self.input_zp], "wmode": dict(self.wmode)}

    @classmethod
    def from_description(cls, d: dict, state_dict: dict) -> "QuantGraph":
        nodes = []
        for n in d["spec"]:
            k = key(n["name"])
            w = state_dict.get(f"weight.{k}")
            b = state_dict.get(f"bias.{k}")
            nodes.append(FoldedNode(n["name"], n["op"], n["inputs"], n["attrs"], w, b))
        g = cls(nodes, *d["input"])
        g.load_state_dict(state_dict)
        g.wmode.update(d["wmode"])
        return g
