"""The layer-graph runner: `Model` = validated model file + layers built once + buffer arena.

`predict` reads like a forward pass: one `layer.run` per graph node over preallocated NHWC
uint8 buffers (channels padded to CH_ALIGN, rows = pixels of the whole batch + ROW_SLACK).
Buffers are reused by liveness, so a network needs only a few of them.
"""
from __future__ import annotations

import numbers
import os
import threading
import time
import weakref

import numpy as np

from . import frozen
from .errors import SettingError
from .format import ModelFile, pointwise_weight, read_model
from .kernels.layout import pad_to, rows_for
from .layers import Add, Conv, Depthwise, GlobalAvgPool, Linear, Pointwise, PointwiseAdd, Shape
from .reference import (add_params, node_qparams, padding_of, pool_params, requant_params,
                        run_reference)

KERNEL_CHOICES = ("auto", "amx", "vnni", "avx2", "addonly", "plain", "reference")
MAX_CHUNK = 32        # images per internal batch: bounds arena memory for huge batches


def pointwise_impl(requested: str, weight: str) -> str:
    """Which pointwise kernel runs a layer with `weight` in {ternary, int8, hybrid}."""
    from .kernels import cpu
    ternary = weight in ("ternary", "hybrid")
    if requested == "auto":
        return cpu.auto_impl(ternary)
    if requested == "amx":
        if not cpu.has_amx():
            raise RuntimeError("kernels='amx' needs a CPU with AMX-INT8 (and Linux granting it)")
        return "amx"
    if requested == "vnni":
        if not cpu.has_avx512vnni():
            raise RuntimeError("kernels='vnni' needs a CPU with AVX-512 VNNI; this one has none")
        return "vnni"
    if requested == "avx2":
        if not cpu.has_avx2():
            raise RuntimeError("kernels='avx2' needs a CPU with AVX2")
        return "avx2"
    if requested == "addonly":
        return "addonly" if ternary else "plain"
    return "plain"


def int8_impl(requested: str) -> str:
    """Kernel for the int8 GEMM behind the stem conv."""
    from .kernels import cpu
    if requested == "auto":
        return cpu.auto_impl(ternary=False)
    if requested == "amx" and cpu.has_amx():
        return "amx"
    if requested == "vnni" and cpu.has_avx512vnni():
        return "vnni"
    if requested == "avx2" and cpu.has_avx2():
        return "avx2"
    return "plain"


def classifier_impl(requested: str) -> str:
    """Kernel for the classifier's sums: the kernel table's for auto/amx/vnni, the AVX2 GEMM for
    avx2, the plain loop for addonly/plain."""
    from .kernels import cpu
    if requested == "avx2":
        return "avx2" if cpu.has_avx2() else "plain"
    if requested in ("auto", "amx", "vnni"):
        return cpu.KERNEL_TABLE[cpu.cpu_class()]["classifier"]
    return "plain"


def _debug_note(msg: str) -> None:
    if os.environ.get("TERNET_DEBUG"):
        import sys
        print(f"ternet: {msg}", file=sys.stderr)


def default_threads() -> int:
    """TERNET_NUM_THREADS, else 1: on a busy machine 2-thread regions stall (kernels.md 3.2).
    SettingError if it is set to anything but a positive integer."""
    env = os.environ.get("TERNET_NUM_THREADS", "").strip()
    if not env:
        return 1
    if not (env.isascii() and env.isdigit() and int(env) > 0):
        raise SettingError(f"TERNET_NUM_THREADS={env!r}: expected a positive integer")
    return int(env)


def checked_threads(threads):
    """`threads` as given to `load`: None (TERNET_NUM_THREADS, else 1) or a positive integer."""
    if threads is None:
        default_threads()                        # a bad TERNET_NUM_THREADS fails now, not later
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise SettingError(f"threads={threads!r}: expected a positive integer, or None for "
                           "$TERNET_NUM_THREADS, else 1")
    return int(threads)


# Models alive in this process, for the fork handler below.
_MODELS: "weakref.WeakSet[Model]" = weakref.WeakSet()


def _reset_models_in_child() -> None:
    """A forked child inherits each model's lock (perhaps held by a parent thread that does not
    exist in the child) and its thread pool (whose threads do not exist either: a job sent to it
    would never run). Give every model a fresh lock and pool. Runs before any child thread."""
    for m in list(_MODELS):
        m._lock = threading.Lock()
        m._pool = None


os.register_at_fork(after_in_child=_reset_models_in_child)


def scratch_slot(graph) -> int:
    """Arena slot of the depthwise layers' shared bordered-input scratch: slot 0 is the graph
    input, 1..len(graph) the node values, then the scratch (`Model._arena` appends it there)."""
    return len(graph) + 1


class Model:
    """A loaded model. `predict(x_u8[N,H,W,3]) -> float32 logits [N, num_classes]`."""

    def __init__(self, mf: ModelFile, threads: int | None = None, kernels: str = "auto"):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}; expected one of {', '.join(KERNEL_CHOICES)}")
        self.file = mf
        self.kernels = kernels
        self.threads = checked_threads(threads)
        if frozen.enabled(kernels):
            frozen.cache_limit()                 # a bad TERNET_PLAN_CACHE_MB fails now
        self._lock = threading.Lock()
        self._digest = None                      # frozen.model_digest(mf), once needed
        self._views: dict[int, list] = {}
        self._frozen: dict[int, object] = {}     # batch size -> FrozenPlan, or False: use numba
        self._workers: dict[tuple, object] = {}  # (batch size, worker) -> FrozenPlan for threads > 1
        self._padded: set = set()                # batch sizes once run padded into a bigger plan
        self._pool = None
        _MODELS.add(self)
        self._built = None
        if kernels == "reference":
            self._built = ([], [], [], set())
        elif not self._frozen_available(1):      # a frozen plan makes building unnecessary
            self._built = _build(mf, kernels)

    @property
    def layers(self) -> list:
        """The layers (built on first use when a frozen plan let loading skip them)."""
        if self._built is None:
            self._built = _build(self.file, self.kernels)
        return self._built[0]

    @property
    def shapes(self) -> list:
        self.layers
        return self._built[1]

    @property
    def layer_names(self) -> list:
        """Graph node name(s) each layer computes ('a+b' for a pointwise with its add fused)."""
        self.layers
        return self._built[2]

    # ------------------------------------------------------------------ metadata
    path = property(lambda self: self.file.path)
    arch = property(lambda self: self.file.arch)
    labels = property(lambda self: list(self.file.labels))
    num_classes = property(lambda self: len(self.file.labels))
    input_shape = property(lambda self: (self.file.input["height"], self.file.input["width"], 3))

    def __repr__(self):
        return f"Model({self.path!r}, arch={self.arch!r}, kernels={self.kernels!r})"

    # ------------------------------------------------------------------ inference
    def predict(self, batch) -> np.ndarray:
        """uint8 [N, H, W, 3] quantized input (see `preprocess`) -> float32 logits [N, classes]."""
        x = np.asarray(batch)
        h, w, _ = self.input_shape
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise ValueError(f"predict expects a uint8 batch of shape (N, {h}, {w}, 3) "
                             f"(use Model.preprocess), got {x.dtype} {x.shape}")
        if self.kernels == "reference":
            return run_reference(self.file, x)
        out = np.empty((x.shape[0], self.num_classes), np.float32)
        with self._lock:
            threads = self._threads()
            can_freeze = frozen.enabled(self.kernels) and bool(self.path)
            for i in range(0, x.shape[0], MAX_CHUNK):
                xc, oc = np.ascontiguousarray(x[i:i + MAX_CHUNK]), out[i:i + MAX_CHUNK]
                if can_freeze and threads == 1:
                    self._forward_frozen(xc, oc)
                    continue
                if can_freeze and len(xc) > 1 and self._forward_images_parallel(xc, oc, threads):
                    continue
                self._set_threads(threads)             # one image, or no frozen plans: numba's
                self._forward(xc, oc)                  # threads split every layer
        return out

    def _forward_images_parallel(self, x, logits, threads: int) -> bool:
        """Several images on several threads: each thread runs its share of the batch through a
        frozen plan of its own (serial kernels, own buffers; ctypes releases the GIL), so no
        per-layer synchronisation at all, and every image is computed exactly as with 1 thread.
        False if some share has no usable frozen plan (the caller then uses numba's threads)."""
        parts = np.array_split(np.arange(len(x)), min(threads, len(x)))
        plans = []
        for w, idx in enumerate(parts):
            plan = self._worker_plan(len(idx), w, x[idx[0]:idx[-1] + 1], logits[idx[0]:idx[-1] + 1])
            if plan is None:
                return False
            plans.append(plan)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=max(1, threads - 1), thread_name_prefix="ternet")
        futures = [self._pool.submit(plan.run, x[idx[0]:idx[-1] + 1], logits[idx[0]:idx[-1] + 1])
                   for plan, idx in zip(plans[1:], parts[1:])]
        plans[0].run(x[parts[0][0]:parts[0][-1] + 1], logits[parts[0][0]:parts[0][-1] + 1])
        for f in futures:
            f.result()
        return True

    def _worker_plan(self, n: int, worker: int, x, logits):
        """Worker `worker`'s own instance of the frozen plan for n images (None: not available)."""
        key = (n, worker)
        plan = self._workers.get(key)
        if plan is None:
            if self._frozen.get(n) is None:            # never tried: load or record it
                self._set_threads(1)
                self._forward_frozen(x, logits, pad_ok=False)   # each worker needs its own n
            base = self._frozen.get(n)
            if not base:
                plan = False
            elif all(v is not base for v in self._workers.values()):
                plan = base
            else:                                      # each worker needs its own buffers
                try:
                    plan = frozen.load(self._plan_key(n)) or False
                except (OSError, frozen.FrozenError):
                    plan = False
            self._workers[key] = plan
        return plan or None

    def frozen_ready(self, n: int = 1) -> bool:
        """Will `predict` on n images replay a stored frozen plan (no numba, no compiling)?"""
        return self._frozen.get(n) not in (None, False) or self._frozen_available(n)

    def _frozen_available(self, n: int) -> bool:
        try:
            return (frozen.enabled(self.kernels) and self._threads() == 1 and bool(self.path)
                    and frozen.exists(self._plan_key(n)))
        except (OSError, frozen.FrozenError):
            return False

    def _plan_key(self, n: int) -> str:
        """The frozen plan key for n images; the model's content is hashed once."""
        if self._digest is None:
            self._digest = frozen.model_digest(self.file)
        return frozen.plan_key(self._digest, self.kernels, n)

    def _forward_frozen(self, x, logits, pad_ok: bool = True):
        """Replay the frozen plan for this batch size; without one, run numba and freeze it."""
        n = x.shape[0]
        plan = self._frozen.get(n)
        if plan is None:
            plan = False
            try:
                key = self._plan_key(n)
                plan = frozen.load(key)
            except (OSError, frozen.FrozenError) as e:
                _debug_note(f"frozen plan not loaded: {e}")
            bigger = sorted(m for m, p in self._frozen.items() if p and n < m <= 2 * n)
            if plan is None and bigger and pad_ok and n not in self._padded:
                # e.g. the last, partial batch of a directory: zero-pad it (once, at most 2x the
                # work) into a loaded plan (images are computed independently, so its logits are
                # the same) rather than import numba and record a plan for a batch size that may
                # never recur; if it does recur, it gets its own plan
                self._padded.add(n)
                m = bigger[0]
                xp = np.zeros((m,) + x.shape[1:], np.uint8)
                xp[:n] = x
                lp = np.empty((m, logits.shape[1]), np.float32)
                self._frozen[m].run(xp, lp)
                logits[...] = lp[:n]
                return
            if plan is None:        # none stored yet: numba now, and record for next time
                self._set_threads(1)
                self._forward(x, logits)
                try:
                    from .freeze import record
                    plan = record(self._forward, x, logits, key)
                except Exception as e:      # any failure only means: keep using numba
                    _debug_note(f"frozen plan not recorded: {type(e).__name__}: {e}")
                    plan = False
                self._frozen[n] = plan
                return
            self._frozen[n] = plan
        if plan is False:
            self._set_threads(1)
            self._forward(x, logits)
        else:
            plan.run(x, logits)

    def _forward(self, x, logits):
        n = x.shape[0]
        v = self._arena(n)
        v[0] = x.reshape(n * x.shape[1] * x.shape[2], 3)   # the graph input, unpadded
        for layer in self.layers[:-1]:
            layer.run(v, n)
        self.layers[-1].run(v, n, logits)

    def _threads(self) -> int:
        return int(self.threads if self.threads is not None else default_threads())

    @property
    def thread_count(self) -> int:
        """Threads predict runs on: `threads` as given to load, else TERNET_NUM_THREADS, else 1
        (`threads` itself stays None then, so that the setting is read at each predict)."""
        return self._threads()

    def _set_threads(self, t: int):
        import numba
        numba.set_num_threads(max(1, min(int(t), numba.config.NUMBA_NUM_THREADS)))

    def _arena(self, n: int) -> list:
        """2-D views [rows, cp] for every value id, over buffers shared by liveness."""
        if n in self._views:
            return self._views[n]
        graph = self.file.graph
        fused = self._built[3] if self.layers is not None else ()    # (builds the layers)
        last_use = {}
        for i, node in enumerate(graph):
            for name in node.inputs:
                last_use[name] = i
        for j in fused:                                   # fused pointwise + add at j - 1, j:
            for name in graph[j - 1].inputs:              # the conv's input is read while the
                last_use[name] = max(last_use[name], j)   # add's output is written
        ids = {node.name: i + 1 for i, node in enumerate(graph)}
        free: list[np.ndarray] = []
        live: dict[str, np.ndarray] = {}
        views: list = [None] * (len(graph) + 1)
        for i, node in enumerate(graph[:-1]):     # the classifier writes the logits array
            s = self.shapes[i + 1]
            need = rows_for(n * s.h * s.w) * s.cp
            free.sort(key=lambda b: b.size)          # best fit
            j = next((j for j, b in enumerate(free) if b.size >= need), None)
            buf = np.zeros(need, np.uint8) if j is None else free.pop(j)
            live[node.name] = buf
            views[ids[node.name]] = buf[:need].reshape(-1, s.cp)
            for name in set(node.inputs):
                if name != "input" and last_use.get(name) == i:
                    free.append(live.pop(name))
        # one scratch for the depthwise layers' bordered input copies, after every value's slot
        assert len(views) == scratch_slot(graph)
        pad = max((l.plan.padded_bytes(n) for l in self.layers if getattr(l, "pad", -1) >= 0),
                  default=0)
        views.append(np.zeros(pad, np.uint8))
        self._views[n] = views
        return views

    def warmup(self) -> float:
        """Compile (or load from cache) every kernel by running one zero image; returns seconds."""
        t = time.perf_counter()
        self.predict(np.zeros((1,) + self.input_shape, np.uint8))
        return time.perf_counter() - t

    # ------------------------------------------------------------------ images
    def preprocess(self, image) -> np.ndarray:
        """One image (path, PIL image or HxWx3 uint8 array) -> uint8 [H, W, 3] model input."""
        from .preprocess import preprocess
        return preprocess(image, self.file.preprocess, self.file.input)

    def classify(self, image, top_k: int = 5):
        """Top-k predictions (label, index, probability) for one image, or a list of them (one
        list per image) for a list or tuple of images; an empty list gives an empty list."""
        from .predictions import top_k as _top_k
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            return []
        logits = self.predict(np.stack([self.preprocess(im) for im in images]))
        res = [_top_k(row, self.file.labels, top_k) for row in logits]
        return res[0] if single else res


def _build(mf: ModelFile, kernels: str):
    """Layers and per-value buffer shapes (index 0 = graph input)."""
    from .kernels.conv import make_conv
    from .kernels.depthwise import make_depthwise
    from .kernels.elementwise import make_add, make_gap, make_linear
    from .kernels.pointwise import make_pointwise
    from .kernels.vnni import PwVnniPlan, make_pw_add

    h, w = mf.input["height"], mf.input["width"]
    shapes = [Shape(h, w, 3, 3)]
    ids = {"input": 0}
    layers, names, fused = [], [], set()
    uses: dict = {}
    for node in mf.graph:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    for i, node in enumerate(mf.graph):
        a = node.attrs
        oh, ow, oc = node.out_shape
        out = Shape(oh, ow, oc, pad_to(oc))
        if i in fused:                       # this add runs inside the preceding pointwise layer
            ids[node.name] = i + 1
            shapes.append(out)
            continue
        src = ids[node.inputs[0]]
        s = shapes[src]
        _, zx = node_qparams(mf, node.inputs[0])
        if node.op in ("conv2d", "depthwise"):
            mult, zp, lo, hi = requant_params(mf, node)
            pt, pl, ho, wo = padding_of(node, s.h, s.w)
            wt, b = mf.tensor(node, "weight"), mf.tensor(node, "bias")
            if node.op == "conv2d":
                if s.cp != s.c:     # reads a channel-padded buffer: zero weights for the padding
                    wt = np.pad(wt, ((0, 0), (0, 0), (0, 0), (0, s.cp - s.c)))
                plan = make_conv(wt, b, zx, mult, zp, lo, hi, a["stride"], pt, pl, s.h, s.w, ho, wo,
                                 int8_impl(kernels))
                layers.append(Conv(src, i + 1, s, plan))
            else:
                plan = make_depthwise(wt, b, zx, mult, zp, lo, hi, a["stride"], pt, pl, s.h, s.w, ho, wo)
                layers.append(Depthwise(src, i + 1, s, out, plan,
                                        scratch_slot(mf.graph) if plan.padded else -1))
        elif node.op == "pointwise":     # (never on the graph input: read_model refuses that)
            mult, zp, lo, hi = requant_params(mf, node)
            plan = make_pointwise(pointwise_weight(mf, node), mf.tensor(node, "bias"), zx, mult, zp,
                                  lo, hi, pointwise_impl(kernels, a["weight"]))
            nxt = mf.graph[i + 1] if i + 1 < len(mf.graph) else None
            if (isinstance(plan, PwVnniPlan) and nxt is not None and nxt.op == "add"
                    and node.name in nxt.inputs and uses.get(node.name) == 1
                    and nxt.inputs[0] != nxt.inputs[1] and ids[_other(nxt, node.name)] != 0):
                # the residual add after a projection: fused into the conv's epilogue
                za, ma, zb, mb, zo, alo, ahi = add_params(mf, nxt)
                if nxt.inputs[1] == node.name:
                    zr, mr, zq, mq = za, ma, zb, mb
                else:
                    zr, mr, zq, mq = zb, mb, za, ma
                layers.append(PointwiseAdd(src, ids[_other(nxt, node.name)], i + 2, s,
                                           make_pw_add(plan, zr, mr, zq, mq, zo, alo, ahi)))
                names.append(f"{node.name}+{nxt.name}")
                fused.add(i + 1)
                ids[node.name] = i + 1
                shapes.append(out)
                continue
            layers.append(Pointwise(src, i + 1, s, plan))
        elif node.op == "add":
            plan = make_add(*add_params(mf, node))
            layers.append(Add(src, ids[node.inputs[1]], i + 1, s, plan))
        elif node.op == "global_avg_pool":
            plan = make_gap(s.c, s.h * s.w, zx, *pool_params(mf, node, s.h * s.w))
            layers.append(GlobalAvgPool(src, i + 1, s, plan))
        else:  # linear: the graph output
            s_in, _ = node_qparams(mf, node.inputs[0])
            plan = make_linear(mf.tensor(node, "weight"), mf.tensor(node, "bias"), zx, s_in,
                               mf.tensor(node, "weight_scale"), classifier_impl(kernels))
            layers.append(Linear(src, plan))
        names.append(node.name)
        ids[node.name] = i + 1
        shapes.append(out)
    return layers, shapes, names, fused


def _other(add_node, name: str) -> str:
    """The input of a two-input add node that is not `name`."""
    return add_node.inputs[0] if add_node.inputs[1] == name else add_node.inputs[1]


def load(name_or_path, threads: int | None = None, kernels: str = "auto") -> Model:
    """Load a bundled model by name or a model file by path (validated; see docs/format.md)."""
    from .models import resolve
    return Model(read_model(resolve(name_or_path)), threads=threads, kernels=kernels)
