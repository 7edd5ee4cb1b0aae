"""Record a replay (see `ternet.replay`): trace one numba forward pass, keep its kernels'
object code, their calls and a snapshot of the memory they touch; verify the replay bit for bit
against numba before writing it to the cache.

Needs numba (it runs right after a numba forward pass, inside
`numba_internals.keeping_object_code`); what it reads of numba's internals (the traced calls,
the calling convention, the code library's object code, the JIT's target) goes through
`ternet.numba_internals`. Anything unexpected raises ReplayError and the numba path simply
stays in use.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy as np

from . import numba_internals, replay
from .replay import ReplayError

_KERNELS = "ternet.kernels"


# ---------------------------------------------------------------------------------- object code

def _elf_undefined(obj: bytes) -> tuple[set, set]:
    """(undefined, defined) global symbol names of an ELF64 little-endian relocatable object."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        raise ReplayError("object code is not ELF64 little-endian")
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    undef, defined = set(), set()
    for name, typ, _f, _a, off, size, link, _i, _al, entsize in secs:
        if typ != 2:                     # SHT_SYMTAB
            continue
        stroff = secs[link][4]
        for j in range(1, size // entsize):
            st_name, st_info, _o, st_shndx = struct.unpack_from("<IBBH", obj, off + j * entsize)
            if st_info >> 4 == 0 or st_name == 0:     # local symbols are not linked
                continue
            end = obj.index(b"\0", stroff + st_name)
            sym = obj[stroff + st_name:end].decode()
            (undef if st_shndx == 0 else defined).add(sym)
    return undef, defined


def _ctype(ir_type, fe_type) -> str:
    s = str(ir_type)
    if s in ("ptr", "i8*") or s.endswith("*"):
        return "ptr"
    if s == "float":
        return "f32"
    if s == "double":
        return "f64"
    if s == "i1":
        return "u8"
    if s in ("i8", "i16", "i32", "i64"):
        signed = getattr(fe_type, "signed", True)
        return ("i" if signed else "u") + s[1:]
    raise ReplayError(f"unsupported argument type {s}")


# ---------------------------------------------------------------------------------- memory

def _extent(a: np.ndarray) -> tuple[int, int]:
    """[lo, hi) bytes an array's elements occupy."""
    base = a.__array_interface__["data"][0]
    if a.size == 0:
        return base, base
    lo = hi = base
    for n, s in zip(a.shape, a.strides):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return lo, hi + a.itemsize


class _Regions:
    """Merged memory extents of every array argument, plus the input and the logits."""

    def __init__(self, x: np.ndarray, logits: np.ndarray):
        self.spans = [list(_extent(x)), list(_extent(logits))]

    def add(self, a):
        self.spans.append(list(_extent(a)))

    def finish(self):
        fixed = self.spans[:2]
        rest = sorted(s for s in self.spans[2:] if s[1] > s[0])
        for s in rest:
            for f in fixed:
                if s[0] < f[1] and f[0] < s[1] and not (f[0] <= s[0] and s[1] <= f[1]):
                    raise ReplayError("an argument partly overlaps the input or the logits")
        merged = []
        for lo, hi in rest:
            if any(f[0] <= lo and hi <= f[1] for f in fixed):
                continue
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.regions = fixed + merged

    def locate(self, ptr: int, nbytes: int) -> list:
        for i, (lo, hi) in enumerate(self.regions):
            if lo <= ptr and ptr + nbytes <= hi:
                return [i, ptr - lo]
        if nbytes == 0:
            return [0, 0]
        raise ReplayError("an array argument outside every region")


# ---------------------------------------------------------------------------------- record

def _flatten(value, fe_type, regions: _Regions) -> list:
    types = numba_internals.numba_types()
    if isinstance(fe_type, types.Array):
        a = value
        lo, hi = _extent(a)
        data = a.__array_interface__["data"][0]
        return [0, 0, int(a.size), int(a.itemsize), regions.locate(data, hi - lo) if a.size else
                regions.locate(lo, 0), *map(int, a.shape), *map(int, a.strides)]
    if isinstance(fe_type, types.Boolean):
        return [int(bool(value))]
    if isinstance(fe_type, types.Integer):
        return [int(value)]
    if isinstance(fe_type, types.Float):
        return [float(value)]
    if isinstance(fe_type, types.BaseTuple) and len(fe_type) == len(value):
        return [v for item, t in zip(value, fe_type) for v in _flatten(item, t, regions)]
    raise ReplayError(f"unsupported kernel argument type {fe_type}")


def record(forward, x: np.ndarray, logits: np.ndarray, key: str) -> "replay.Replay":
    """Trace `forward(x, logits)` (a numba forward pass whose kernels are already compiled),
    verify the replay against it and store it under `key`."""
    types = numba_internals.numba_types()

    calls = numba_internals.trace_calls(lambda: forward(x, logits))
    if not calls:
        raise ReplayError("no kernel calls traced")
    if any(kw for _disp, _args, kw in calls):
        raise ReplayError("keyword arguments to a kernel")
    calls = [(disp, args) for disp, args, _kw in calls]
    regions = _Regions(x, logits)
    kernels, index, sigs = [], {}, []
    for disp, args in calls:
        if not getattr(disp.py_func, "__module__", "").startswith(_KERNELS):
            raise ReplayError(f"{disp.py_func.__qualname__} is not a ternet kernel")
        if numba_internals.runs_parallel(disp):
            raise ReplayError("parallel kernels are not recorded")
        sig, cres = numba_internals.compiled_overload(disp, args)
        if cres is None:
            raise ReplayError(f"no exact overload of {disp.py_func.__qualname__} for {sig}")
        if cres.signature.return_type != types.none:
            raise ReplayError(f"{disp.py_func.__qualname__} returns a value")
        for a, t in zip(args, sig):
            if isinstance(t, types.Array):
                regions.add(a)
        sigs.append(sig)
        if (id(disp), sig) not in index:
            fn_args, symbol = numba_internals.native_signature(cres, sig)
            flat_fe = []
            for t in sig:
                if isinstance(t, types.Array):
                    flat_fe += [None] * (5 + 2 * t.ndim)
                elif isinstance(t, types.BaseTuple):
                    flat_fe += list(t)
                else:
                    flat_fe.append(t)
            params = ["ptr", "ptr"] + [_ctype(ir_t, fe) for ir_t, fe in zip(fn_args[2:], flat_fe)]
            if len(fn_args) != len(flat_fe) + 2:
                raise ReplayError("argument flattening does not match numba's calling convention")
            obj = numba_internals.object_code(cres)
            undef, defined = _elf_undefined(obj)
            if symbol not in defined:
                raise ReplayError(f"{symbol[:60]} not defined in its object code")
            index[id(disp), sig] = len(kernels)
            # AMX kernels need the process's tile permission before they run (replay.Replay)
            kernels.append({"name": disp.py_func.__qualname__, "symbol": symbol, "params": params,
                            "undefined": sorted(undef), "obj": obj,
                            "amx": disp.py_func.__module__ == f"{_KERNELS}.amx"})
    regions.finish()
    rec_calls = []
    for (disp, args), sig in zip(calls, sigs):
        flat = [v for a, t in zip(args, sig) for v in _flatten(a, t, regions)]
        k = index[id(disp), sig]
        if len(flat) != len(kernels[k]["params"]) - 2:
            raise ReplayError("flattened arguments do not match the kernel's parameters")
        rec_calls.append({"kernel": k, "args": flat})

    # snapshot: the memory as the numba path leaves it is a valid state for the next forward
    import ctypes
    blob = bytearray()

    def put(data: bytes) -> int:
        blob.extend(b"\0" * (-len(blob) % replay.ALIGN))
        off = len(blob)
        blob.extend(data)
        return off

    reg_meta = []
    for i, (lo, hi) in enumerate(regions.regions):
        keep = i >= 2                   # input and logits are written per call
        reg_meta.append({"size": hi - lo, "mod": lo % replay.ALIGN,
                         "blob": put(ctypes.string_at(lo, hi - lo)) if keep else None})
    for k in kernels:
        obj = k.pop("obj")
        k["blob"], k["size"] = put(obj), len(obj)
    cpu, features = numba_internals.host_target()
    meta = {"format": replay.FORMAT, "cpu": cpu, "features": features,
            "kernels": kernels, "calls": rec_calls, "regions": reg_meta,
            "input": [0, 0, list(x.shape), x.dtype.str], "output": [1, 0, list(logits.shape), logits.dtype.str],
            "blob_size": len(blob), "blob_sha256": hashlib.sha256(blob).hexdigest()}
    meta = json.loads(json.dumps(meta))          # what load() will see

    # verify: the replay must reproduce the numba path exactly, on this input and on another
    rep = replay.Replay(meta, bytes(blob))
    rng = np.random.default_rng(0)
    for xi in (x.copy(), rng.integers(0, 256, x.shape, dtype=np.uint8)):
        want = np.empty_like(logits)
        forward(np.ascontiguousarray(xi), want)
        got = np.empty_like(logits)
        rep.run(xi, got)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            raise ReplayError("the replay does not reproduce the numba path")
    _write(key, meta, bytes(blob))
    return rep


def _write(key: str, meta: dict, blob: bytes) -> None:
    """Store the replay, then evict least recently used replays beyond the cache limit (stale
    replays of other ternet or numba versions and of edited model files would pile up
    otherwise). A replay bigger than the whole limit is not stored: it would only evict
    everything else."""
    data = json.dumps(meta).encode()
    limit = replay.cache_limit()
    if len(blob) + len(data) > limit:
        return
    meta_path, blob_path = replay.paths(key)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    # the .json last: its presence marks the replay complete
    for path, content in ((blob_path, blob), (meta_path, data)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    replay.evict(limit, keep=key)
