"""Replays: a model's kernel calls for one batch size, recorded once, replayed without numba.

Importing numba and loading even cached kernels through it costs ~0.6 s, more than the whole
rest of `ternet classify`. But once a model is built, a forward pass is a fixed sequence of
calls to compiled kernels on fixed buffers. `ternet.record` records that sequence once (after
a normal numba run): each kernel's object code, the flattened native arguments of every call
(array arguments as region + byte offset + shape + strides), and a snapshot of every memory
region the calls touch (packed weights, scratch, activation buffers). This module loads such a
record with llvmlite's MCJIT (no numba import) and replays it: copy the input in, call each
kernel through ctypes, copy the logits out.

A record is only written after it reproduced the numba path's logits bit for bit, and it is
keyed by everything the machine code depends on (ternet's sources, numba and llvmlite versions,
Python, the CPU name and features, a hash of the model's content, the kernel choice and the
batch size). Only single-threaded runs are recorded (parallel kernels need numba's threading
layer); with several threads and several images, `Model` runs one replay instance per thread on
its share of the images instead. `TERNET_REPLAY=0` turns the mechanism off, and so does a
numba whose internals are not what `ternet.numba_internals` expects. The stored replays are
capped in size (`cache_limit`); the least recently used go first.
"""
from __future__ import annotations

import ctypes
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import config, numba_internals
from .cachedir import replays_dir

FORMAT = 1
ALIGN = 64
_SOURCES = ("quant.py", "model.py", "lowering.py", "executors.py", "ops/*.py", "format.py",
            "replay.py", "record.py", "numba_internals.py", "kernels/*.py")
_CTYPES = {"u1": ctypes.c_bool, "ptr": ctypes.c_void_p, "i8": ctypes.c_int8, "u8": ctypes.c_uint8, "i16": ctypes.c_int16,
           "u16": ctypes.c_uint16, "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64,
           "u64": ctypes.c_uint64, "f32": ctypes.c_float, "f64": ctypes.c_double}


class ReplayError(RuntimeError):
    """A replay cannot be recorded or loaded (the numba path is used instead)."""


def enabled(kernels: str) -> bool:
    """Replays on? `TERNET_REPLAY` (formerly `TERNET_FROZEN`) on, not the reference kernels, no
    bounds checking, llvmlite there and numba's internals as expected (checked without
    importing numba)."""
    if not config.get("TERNET_REPLAY") or kernels == "reference":
        return False
    if os.environ.get("NUMBA_BOUNDSCHECK") or config.get("TERNET_BOUNDSCHECK"):
        return False           # debugging runs want numba's checked kernels
    return importlib.util.find_spec("llvmlite") is not None and numba_internals.self_check()


def cache_root() -> Path:
    return replays_dir()


_LLVM = None


def _llvm():
    global _LLVM
    if _LLVM is None:
        import llvmlite.binding as ll    # ~0.06 s; numba stays unimported
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        _LLVM = ll
    return _LLVM


def _stamps() -> list[str]:
    here = Path(__file__).resolve().parent
    out = []
    for pat in _SOURCES:
        for p in sorted(glob.glob(str(here / pat))):
            st = os.stat(p)
            out.append(f"{os.path.relpath(p, here)}:{st.st_size}:{st.st_mtime_ns}")
    try:
        out.append(numba_internals.version_stamp())
    except numba_internals.NumbaInternalsError as e:
        raise ReplayError(str(e)) from None
    return out


def model_digest(model) -> str:
    """SHA-256 of a model's content: every field of its ModelFile except the path, tensors by
    name, dtype, shape and bytes. `model`: a loaded ModelFile, or a model file path (read).

    Replays are keyed by what was loaded, not by the file's name, size or times: a file replaced
    by another of the same size with its mtime restored (`cp -p`, `rsync -t`, `tar -x`) gets a
    replay of its own, and there is no window between reading the weights and hashing them.
    Costs about 2 ms for a 5 MB model (docs/cli.md), computed once per `Model`."""
    from .format import ModelFile, read_model
    mf = model if isinstance(model, ModelFile) else read_model(model)
    h = hashlib.sha256()
    for f in dataclasses.fields(mf):
        value = getattr(mf, f.name)
        if f.name == "tensors":
            for name in sorted(value):
                a = np.ascontiguousarray(value[name])
                h.update(json.dumps([name, a.dtype.str, a.shape]).encode())
                h.update(a)
        elif f.name != "path":
            h.update(json.dumps([f.name, value], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def replay_key(digest: str, kernels: str, n: int) -> str:
    """Hash of everything a replay's machine code and memory snapshot depend on; `digest`
    is the model's `model_digest`."""
    from . import __version__
    ll = _llvm()
    import llvmlite
    parts = [f"format {FORMAT}", __version__, sys.version, llvmlite.__version__,
             ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten(),
             digest, kernels, str(n), *_stamps()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def paths(key: str) -> tuple[Path, Path]:
    root = cache_root()
    return root / f"{key}.json", root / f"{key}.bin"


# ---------------------------------------------------------------------------------- cache size

ORPHAN_AGE_S = 600      # a lone .bin or .tmp file this old is left over from a crashed writer


def cache_limit() -> int:
    """Bytes the stored replays may take: `TERNET_REPLAY_CACHE_MB` (formerly
    `TERNET_PLAN_CACHE_MB`; a whole number, 0 stores no replays; default 256)."""
    return config.get("TERNET_REPLAY_CACHE_MB") << 20


def evict(limit: int, keep: str) -> None:
    """Delete the least recently used replays (by their .json's mtime, which `load` renews)
    until the rest fit in `limit` bytes; the replay `keep` (just written) stays."""
    root = cache_root()
    stored, now = [], time.time()
    for meta in root.glob("*.json"):
        try:
            st = meta.stat()
            stored.append((st.st_mtime_ns, st.st_size + meta.with_suffix(".bin").stat().st_size, meta))
        except OSError:          # deleted meanwhile by another process, or half a replay
            continue
    stored.sort(key=lambda p: (p[2].stem != keep, -p[0]))     # keep, then newest first
    total = 0
    for _used, size, meta in stored:
        total += size
        if total > limit and meta.stem != keep:
            _unlink(meta, meta.with_suffix(".bin"))      # the .json first: no half-replay is loaded
    for p in [*root.glob("*.bin"), *root.glob(".tmp-*")]:
        try:
            if not p.with_suffix(".json").exists() and now - p.stat().st_mtime > ORPHAN_AGE_S:
                p.unlink()
        except OSError:
            pass


def _unlink(*files: Path) -> None:
    for p in files:
        try:
            p.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------- loading

_HELPERS_DONE = False


def _register_helpers(ll) -> None:
    """The C helpers numba's generated code calls (the same names numba registers)."""
    global _HELPERS_DONE
    if _HELPERS_DONE:
        return
    try:
        helpers = numba_internals.c_helpers()
    except numba_internals.NumbaInternalsError as e:
        raise ReplayError(str(e)) from None
    for name, address in helpers.items():
        ll.add_symbol(name, address)
    _HELPERS_DONE = True


def _resolve(ll, names) -> None:
    """Make sure every undefined symbol of the objects resolves; an unresolved one would abort
    the process inside LLVM, so check first and register process symbols explicitly."""
    proc = ctypes.CDLL(None)
    missing = []
    for name in names:
        if ll.address_of_symbol(name):
            continue
        try:
            ll.add_symbol(name, ctypes.addressof(ctypes.c_char.in_dll(proc, name)))
        except ValueError:
            missing.append(name)
    if missing:
        raise ReplayError(f"unresolved symbols {missing[:5]}")


class Replay:
    """A loaded replay: `run(x, logits)` for x u8[n, H, W, 3] into logits f32[n, C]."""

    def __init__(self, meta: dict, blob: bytes | memoryview):
        if meta.get("format") != FORMAT:
            raise ReplayError("format mismatch")
        ll = _llvm()
        _register_helpers(ll)
        blob = memoryview(blob)
        self.meta = meta
        # memory regions, same address modulo 64 as when recorded (kernels may rely on alignment)
        self._regions = []
        bases = []
        for r in meta["regions"]:
            raw = np.empty(r["size"] + 2 * ALIGN, np.uint8)
            off = (r["mod"] - raw.ctypes.data) % ALIGN
            view = raw[off:off + r["size"]]
            if r.get("blob") is not None:
                view[:] = np.frombuffer(blob[r["blob"]:r["blob"] + r["size"]], np.uint8)
            self._regions.append(raw)
            bases.append(view.ctypes.data)
        self.input = self._view(meta["input"], bases)
        self.output = self._view(meta["output"], bases)
        # machine code
        if any(k.get("amx") for k in meta["kernels"]):
            from .kernels.cpu import amx_permission      # ctypes only, no numba
            if not amx_permission():
                raise ReplayError("the replay uses AMX and Linux refused this process the tile state")
        _resolve(ll, sorted({s for k in meta["kernels"] for s in k["undefined"]}))
        target = ll.Target.from_default_triple()
        self._engines, fns = [], []
        for k in meta["kernels"]:
            # one engine per object: each carries its own copy of numba's runtime helpers. The
            # engine takes ownership of its target machine, so each gets its own.
            tm = target.create_target_machine(cpu=meta["cpu"], features=meta["features"], opt=3,
                                              reloc="default", codemodel="jitdefault")
            ee = ll.create_mcjit_compiler(ll.parse_assembly(""), tm)
            ee.add_object_file(ll.ObjectFileRef.from_data(bytes(blob[k["blob"]:k["blob"] + k["size"]])))
            ee.finalize_object()
            addr = ee.get_function_address(k["symbol"])
            if not addr:
                raise ReplayError(f"symbol {k['symbol'][:60]} not found")
            self._engines.append(ee)
            proto = ctypes.CFUNCTYPE(ctypes.c_int32, *[_CTYPES[t] for t in k["params"]])
            fns.append(proto(addr))
        self._ret = ctypes.create_string_buffer(64)
        self._exc = ctypes.c_void_p(0)
        head = (ctypes.addressof(self._ret), ctypes.addressof(self._exc))
        self.calls = []
        for c in meta["calls"]:
            args = list(head)
            for a in c["args"]:
                if isinstance(a, list):               # [region, offset]: a data pointer
                    args.append(bases[a[0]] + a[1])
                else:
                    args.append(a)
            self.calls.append((fns[c["kernel"]], tuple(args)))

    @staticmethod
    def _view(spec, bases):
        region, off, shape, dtype = spec
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = (ctypes.c_uint8 * n).from_address(bases[region] + off)
        return np.frombuffer(buf, np.uint8).view(dtype).reshape(shape)

    def run(self, x: np.ndarray, logits: np.ndarray) -> None:
        self.input[...] = x
        for fn, args in self.calls:
            if fn(*args):
                raise RuntimeError("a replayed kernel reported an error")
        logits[...] = self.output


def load(key: str) -> Replay | None:
    """The replay stored under `key`, or None if there is none (or it cannot be used)."""
    meta_path, blob_path = paths(key)
    try:
        meta = json.loads(meta_path.read_text())
        blob = blob_path.read_bytes()
    except (OSError, ValueError):
        return None
    if len(blob) != meta.get("blob_size") or hashlib.sha256(blob).hexdigest() != meta.get("blob_sha256"):
        return None                    # truncated or corrupted: record again
    try:
        os.utime(meta_path)            # most recently used: `evict` deletes it last
    except OSError:
        pass                           # e.g. a read-only cache: the replay is still good
    try:
        return Replay(meta, blob)
    except ReplayError:
        raise
    except Exception as e:             # e.g. a replay written by an incompatible ternet
        raise ReplayError(f"cannot load {meta_path.name}: {type(e).__name__}: {e}") from None


def exists(key: str) -> bool:
    return all(p.exists() for p in paths(key))
