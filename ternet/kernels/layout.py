"""Buffer layout constants shared by kernels, layers and tests (see docs/kernels.md)."""
import numpy as np

CH_ALIGN = 16   # channels padded to a multiple of this in activations and prepared weights
ROW_SLACK = 8   # extra rows every 2-D activation buffer has past its P real rows
_U8 = np.dtype(np.uint8)


def pad_to(n: int, m: int = CH_ALIGN) -> int:
    return -(-n // m) * m


def rows_for(p: int) -> int:
    return p + ROW_SLACK


def check_pw_buffers(x, P, out, cin_p, cout_p, out_dtype) -> None:
    """Raise unless x u8[rows, cin_p] and out out_dtype[rows, cout_p] are C-contiguous with
    rows >= P + ROW_SLACK (the pointwise kernels address them by raw byte offsets)."""
    if x.shape[1] != cin_p or out.shape[1] != cout_p:
        raise ValueError(f"expected x[:, {cin_p}] and out[:, {cout_p}], got {x.shape} and {out.shape}")
    if P < 0 or x.shape[0] < P + ROW_SLACK or out.shape[0] < P + ROW_SLACK:
        raise ValueError(f"P={P} needs rows >= P + {ROW_SLACK}, got {x.shape[0]}, {out.shape[0]}")
    if x.dtype != _U8 or out.dtype != out_dtype:
        raise TypeError(f"expected x uint8 and out {np.dtype(out_dtype)}, got {x.dtype} and {out.dtype}")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("x and out must be C-contiguous")


def aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """C-contiguous copy of `a` starting on an `align`-byte boundary (weight vectors = cache lines)."""
    buf = np.empty(a.nbytes + align, np.uint8)
    off = -buf.ctypes.data % align
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out
