"""`Model`: a validated model file and the executor that runs it (the public API).

`predict` sends each chunk of images down one route, chosen per call:
* kernels="reference": the numpy reference runner;
* one thread, replays on: the replay executor (a stored replay run, or numba run and recorded);
* several threads, several images, replays on: each thread its share of the images through a
  replay instance of its own;
* otherwise: the numba executor, numba's threads splitting every step.
The graph is lowered to steps (`ternet.lowering`) once, on first need: a stored replay lets a
model run without ever building them.
"""
from __future__ import annotations

import numbers
import os
import threading
import time
import weakref

import numpy as np

from . import config, replay
from .errors import SettingError
from .executors import NumbaExecutor, ReplayExecutor, reference_forward
from .format import ModelFile, read_model
from .kernels.cpu import REQUESTS
from .lowering import lower

MAX_CHUNK = 32        # images per internal batch: bounds arena memory for huge batches


def default_threads() -> int:
    """TERNET_NUM_THREADS, else 1: on a busy machine 2-thread regions stall (kernels.md 3.2).
    SettingError if it is set to anything but a positive integer."""
    return config.get("TERNET_NUM_THREADS")


def checked_kernels(kernels) -> str:
    """`kernels` as given to `load`: None (TERNET_KERNELS, else auto) or one of REQUESTS."""
    if kernels is None:
        return config.get("TERNET_KERNELS")
    if kernels not in REQUESTS:
        raise SettingError(f"kernels={kernels!r}: expected one of {', '.join(REQUESTS)}, or None "
                           "for $TERNET_KERNELS, else auto")
    return kernels


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
    exist in the child) and its replay executor's thread pool (whose threads do not exist either:
    a job sent to it would never run). Give every model a fresh lock and pool. Runs before any
    child thread."""
    for m in list(_MODELS):
        m._lock = threading.Lock()
        m._replays.pool = None


os.register_at_fork(after_in_child=_reset_models_in_child)


class Model:
    """A loaded model. `predict(x_u8[N,H,W,3]) -> float32 logits [N, num_classes]`."""

    def __init__(self, mf: ModelFile, threads: int | None = None, kernels: str | None = None):
        kernels = checked_kernels(kernels)
        self.file = mf
        self.kernels = kernels
        self.threads = checked_threads(threads)
        config.get("TERNET_DEBUG")               # a bad value fails now, not in an error path
        if replay.enabled(kernels):
            replay.cache_limit()                 # a bad TERNET_REPLAY_CACHE_MB fails now
        self._lock = threading.Lock()
        self._digest = None                      # replay.model_digest(mf), once needed
        self._program = None                     # lowering.Program, once needed
        self._numba_executor = None
        self._replays = ReplayExecutor(self._replay_key, self._run_numba_serial, self._run_numba)
        _MODELS.add(self)
        if kernels != "reference" and not self._replay_available(1):
            self.program                         # a stored replay makes building unnecessary

    @property
    def program(self):
        """The lowered graph (None for kernels='reference')."""
        if self._program is None and self.kernels != "reference":
            self._program = lower(self.file, self.kernels)
        return self._program

    @property
    def layers(self) -> list:
        """The fast steps, one per node or fused pair (built on first use)."""
        return list(self.program.steps) if self.program else []

    @property
    def layer_names(self) -> list:
        """Graph node name(s) each step computes ('a+b' for a pointwise with its add fused)."""
        return list(self.program.names) if self.program else []

    def arena(self, n: int) -> list:
        """The numba executor's buffer views for a batch of n images (slot 0: the input)."""
        return self._numba().arena(n)

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
            return reference_forward(self.file, x)
        out = np.empty((x.shape[0], self.num_classes), np.float32)
        with self._lock:
            threads = self._threads()
            replay_on = replay.enabled(self.kernels) and bool(self.path)
            for i in range(0, x.shape[0], MAX_CHUNK):
                xc, oc = np.ascontiguousarray(x[i:i + MAX_CHUNK]), out[i:i + MAX_CHUNK]
                if replay_on and threads == 1:
                    self._replays.run(xc, oc)          # replayed, or numba run and recorded
                elif replay_on and len(xc) > 1 and self._replays.run_images_parallel(xc, oc, threads):
                    pass                               # each thread its share, its own replay
                else:
                    self._set_threads(threads)         # numba's threads split every step
                    self._run_numba(xc, oc)
        return out

    def _numba(self) -> NumbaExecutor:
        if self._numba_executor is None:
            self._numba_executor = NumbaExecutor(self.program)
        return self._numba_executor

    def _run_numba(self, x, logits) -> None:
        self._numba().run(x, logits)

    def _run_numba_serial(self, x, logits) -> None:
        self._set_threads(1)
        self._run_numba(x, logits)

    def replay_ready(self, n: int = 1) -> bool:
        """Will `predict` on n images run a stored replay (no numba, no compiling)?"""
        return n in self._replays.replays or self._replay_available(n)

    def _replay_available(self, n: int) -> bool:
        try:
            return (replay.enabled(self.kernels) and self._threads() == 1 and bool(self.path)
                    and replay.exists(self._replay_key(n)))
        except (OSError, replay.ReplayError):
            return False

    def _replay_key(self, n: int) -> str:
        """The replay key for n images; the model's content is hashed once."""
        if self._digest is None:
            self._digest = replay.model_digest(self.file)
        return replay.replay_key(self._digest, self.kernels, n)

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


def load(name_or_path, threads: int | None = None, kernels: str | None = None) -> Model:
    """Load a bundled model by name or a model file by path (validated; see docs/format.md).
    `kernels`: one of kernels.cpu.REQUESTS, else $TERNET_KERNELS, else auto."""
    from .models import resolve
    return Model(read_model(resolve(name_or_path)), threads=threads, kernels=kernels)
