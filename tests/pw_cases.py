"""Shared test data for the pointwise kernels (add-only/plain and VNNI/AVX2 alike)."""
import contextlib
import ctypes
import mmap

import numpy as np

from ternet.kernels.layout import ROW_SLACK

POISON = 0xA5


def make_case(rng, P, cin, cout, kind, zx):
    """Full-range data: x has 0 and 255; kind ternary (~50% zeros), int8 (reaches -128 and 127)
    or hybrid (ternary rows, and about a third of the rows int8)."""
    x = rng.integers(0, 256, (P, cin), dtype=np.uint8)
    x.flat[rng.integers(0, x.size, 2)] = (0, 255)
    tern = (rng.integers(-1, 2, (cout, cin)) * (rng.random((cout, cin)) < 0.75)).astype(np.int8)
    full = rng.integers(-128, 128, (cout, cin), dtype=np.int8)
    full.flat[rng.integers(0, full.size, 2)] = (-128, 127)
    if kind == "ternary":
        w = tern
    elif kind == "int8":
        w = full
    else:
        w = np.where((rng.random(cout) < 0.35)[:, None], full, tern).astype(np.int8)
    bias = rng.integers(-50000, 50000, cout, dtype=np.int32)
    return x, w, bias


def pick_mult(rng, acc, cout):
    """Multipliers from the observed accumulator range (TFLite's PickReasonableMultiplier idea), so
    outputs spread over [0, 255] instead of saturating; sometimes a power of two, which makes
    exact .5 ties (round-half-up) frequent."""
    span = max(1, int(acc.max()) - int(acc.min()))
    if rng.random() < 0.25:
        return np.full(cout, 2.0 ** np.floor(np.log2(255 / span)), np.float32)
    return (rng.uniform(0.3, 3.0, cout) * 255 / span).astype(np.float32)


def buffers(x, P, cin_p, cout_p, rng, extra=3, out_dtype=np.uint8):
    """x in a padded buffer with garbage in its slack rows and pad columns; a poisoned output
    with `extra` sentinel rows past the P + ROW_SLACK the kernel may touch."""
    xb = rng.integers(0, 256, (P + ROW_SLACK, cin_p), dtype=np.uint8)
    xb[:P, :x.shape[1]] = x
    out = np.empty((P + ROW_SLACK + extra, cout_p), out_dtype)
    out.view(np.uint8)[...] = POISON
    return xb, out


def check_untouched(out, P):
    assert (out[P + ROW_SLACK:].view(np.uint8) == POISON).all(), "wrote past the ROW_SLACK rows"


@contextlib.contextmanager
def guarded(*shapes):
    """uint8 arrays of the given shapes, each ending right before a PROT_NONE page (Linux), so any
    read or write past its end faults."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    maps, arrs = [], []
    for shape in shapes:
        n = shape[0] * shape[1]
        npages = -(-n // page)
        mm = mmap.mmap(-1, (npages + 1) * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert libc.mprotect(ctypes.c_void_p(base + npages * page), page, 0) == 0
        arrs.append(np.frombuffer(mm, np.uint8, n, npages * page - n).reshape(shape))
        maps.append((base, npages))
    try:
        yield arrs
    finally:
        del arrs
        for base, npages in maps:
            libc.mprotect(ctypes.c_void_p(base + npages * page), page, 3)
