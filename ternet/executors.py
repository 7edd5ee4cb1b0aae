"""The three ways a model runs, behind one seam: `run(x, logits)` on a batch.

* `reference_forward`: the numpy reference runner (`ternet.reference`), node by node.
* `NumbaExecutor`: the lowered program's steps (`ternet.lowering`) over its arena.
* `ReplayExecutor`: per batch size, a replay (`ternet.replay`: the numba executor's kernel calls
  recorded once, replayed without numba) when one is stored or can be recorded, else the numba
  executor.
"""
from __future__ import annotations

import numpy as np

from . import config, numba_internals, replay
from .lowering import Program, arena_views


def debug_note(msg: str) -> None:
    if config.get("TERNET_DEBUG"):
        import sys
        print(f"ternet: {msg}", file=sys.stderr)


def reference_forward(mf, x: np.ndarray) -> np.ndarray:
    from .reference import run_reference
    return run_reference(mf, x)


class NumbaExecutor:
    """Runs a program's steps on numba kernels; one arena per batch size, kept."""

    def __init__(self, program: Program):
        self.program = program
        self._arenas: dict[int, list] = {}

    def arena(self, n: int) -> list:
        """The arena's slot views for a batch of n images (made once per n)."""
        views = self._arenas.get(n)
        if views is None:
            views = self._arenas[n] = arena_views(self.program, n)
        return views

    def run(self, x: np.ndarray, logits: np.ndarray) -> None:
        """x uint8 [n, H, W, 3] contiguous -> logits float32 [n, classes]."""
        n = x.shape[0]
        v = self.arena(n)
        v[0] = x.reshape(n * x.shape[1] * x.shape[2], 3)   # the graph input, unpadded
        steps = self.program.steps
        for step in steps[:-1]:
            step.run(v, n)
        steps[-1].run(v, n, logits)


class ReplayExecutor:
    """Replays per batch size. For each size n, in order: a replay already run here; else one
    stored in the cache; else (if a loaded replay for m in (n, 2n] exists, once) the batch
    zero-padded into that one; else the numba executor runs and its calls are recorded as n's
    replay. A size whose replay fails to load or record stays on numba (`numba_only`).

    `numba_run(x, logits)` runs the numba executor on one thread; `forward` is what gets traced
    when recording."""

    def __init__(self, replay_key, numba_run, forward):
        self._replay_key = replay_key      # n -> cache key
        self._numba_run = numba_run
        self._forward = forward
        self.replays: dict[int, replay.Replay] = {}
        self.numba_only: set[int] = set()
        self.padded: set[int] = set()      # sizes once run padded into a bigger replay
        self.workers: dict[tuple, replay.Replay] = {}   # (n, worker) -> its own instance
        self.no_worker_replay: set[tuple] = set()
        self.pool = None                   # ThreadPoolExecutor of run_images_parallel, once needed

    def tried(self, n: int) -> bool:
        return n in self.replays or n in self.numba_only

    def run(self, x: np.ndarray, logits: np.ndarray, pad_ok: bool = True) -> None:
        n = x.shape[0]
        if n in self.replays:
            self.replays[n].run(x, logits)
        elif n in self.numba_only:
            self._numba_run(x, logits)
        else:
            self._first_run(x, logits, pad_ok)

    def _first_run(self, x, logits, pad_ok: bool) -> None:
        n = x.shape[0]
        try:
            key = self._replay_key(n)
            rep = replay.load(key)
        except (OSError, replay.ReplayError) as e:
            debug_note(f"replay not loaded: {e}")
            self.numba_only.add(n)
            self._numba_run(x, logits)
            return
        if rep is not None:
            self.replays[n] = rep
            rep.run(x, logits)
            return
        bigger = sorted(m for m in self.replays if n < m <= 2 * n)
        if bigger and pad_ok and n not in self.padded:
            # e.g. the last, partial batch of a directory: zero-pad it (once, at most 2x the
            # work) into a loaded replay (images are computed independently, so its logits are
            # the same) rather than import numba and record a replay for a batch size that may
            # never recur; if it does recur, it gets its own replay
            self.padded.add(n)
            self._run_padded(self.replays[bigger[0]], bigger[0], x, logits)
            return
        if not numba_internals.self_check(record=True):    # imports numba, as the pass will
            self.numba_only.add(n)
            self._numba_run(x, logits)
            return
        # none stored yet: numba now, recorded for next time; the kernels this pass loads from
        # numba's cache keep their object code for the recording
        with numba_internals.keeping_object_code():
            self._numba_run(x, logits)
            try:
                from .record import record
                self.replays[n] = record(self._forward, x, logits, key)
            except Exception as e:          # any failure only means: keep using numba
                debug_note(f"replay not recorded: {type(e).__name__}: {e}")
                self.numba_only.add(n)

    @staticmethod
    def _run_padded(rep, m: int, x, logits) -> None:
        """The n < m images x through the replay for m images, zero images after them."""
        n = x.shape[0]
        xp = np.zeros((m,) + x.shape[1:], np.uint8)
        xp[:n] = x
        lp = np.empty((m, logits.shape[1]), np.float32)
        rep.run(xp, lp)
        logits[...] = lp[:n]

    def worker_replay(self, n: int, worker: int, x, logits):
        """Worker `worker`'s own instance of the replay for n images (None: there is none). The
        first worker shares the replay `run` uses; the others load their own (own buffers)."""
        key = (n, worker)
        if key in self.workers:
            return self.workers[key]
        if key in self.no_worker_replay:
            return None
        if not self.tried(n):                       # load or record it
            self.run(x, logits, pad_ok=False)       # each worker needs its own n
        base = self.replays.get(n)
        rep = None
        if base is not None and all(r is not base for r in self.workers.values()):
            rep = base
        elif base is not None:
            try:
                rep = replay.load(self._replay_key(n))
            except (OSError, replay.ReplayError):
                rep = None
        if rep is None:
            self.no_worker_replay.add(key)
        else:
            self.workers[key] = rep
        return rep

    def run_images_parallel(self, x, logits, threads: int) -> bool:
        """Several images on several threads: each thread runs its share of the batch through a
        replay of its own (serial kernels, own buffers; ctypes releases the GIL), so no
        per-layer synchronisation at all, and every image is computed exactly as with 1 thread.
        False if some share has no usable replay (the caller then uses numba's threads)."""
        parts = [(idx[0], idx[-1] + 1) for idx in np.array_split(np.arange(len(x)),
                                                                   min(threads, len(x)))]
        reps = []
        for w, (a, b) in enumerate(parts):
            rep = self.worker_replay(b - a, w, x[a:b], logits[a:b])
            if rep is None:
                return False
            reps.append(rep)
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=max(1, threads - 1), thread_name_prefix="ternet")
        futures = [self.pool.submit(rep.run, x[a:b], logits[a:b])
                   for rep, (a, b) in zip(reps[1:], parts[1:])]
        a, b = parts[0]
        reps[0].run(x[a:b], logits[a:b])
        for f in futures:
            f.result()
        return True
