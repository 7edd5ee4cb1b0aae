"""CPU feature detection and the choice of kernels (KERNEL_TABLE; see docs/kernels.md).

A feature counts only if the host CPU has it *and* numba compiles for it: `NUMBA_CPU_NAME` /
`NUMBA_CPU_FEATURES` can make numba target less (or more) than the host offers; AMX also needs
Linux to grant the process its tile state. `TERNET_KERNELS=auto|amx|vnni|avx2|addonly|plain`
overrides the automatic choice of the pointwise family.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

IMPLS = ("amx", "vnni", "avx2", "addonly", "plain")

# Features each ISA-specific micro-kernel needs (names as LLVM spells them).
ISA_FEATURES = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vnni"),
    "avx2": ("avx2",),
    "avx2i8": ("avx2",),
    "amx": ("amx-tile", "amx-int8", "avx512f", "avx512bw", "avx512vnni"),   # tails run VNNI
}

# The kernel each op runs on each CPU class (cpu_class(): the first class the CPU qualifies for).
# The one place the choice is made; TERNET_KERNELS / Model(kernels=...) override the pointwise
# family. "addonly|plain": the multiplication-free kernel for ternary (and hybrid) weights, the
# portable dense one for int8. The stem is im2col + the pointwise family's int8 GEMM (AMX plans
# run it on VNNI: 27 input channels); the classifier's sums come from the VNNI / AVX2 GEMM where
# there is one (AMX does not pay at batch sizes below 16). Measured 2026-12 on a 2-core Intel Xeon
# (AMX) with benchmarks/bench_depthwise.py and bench_pointwise.py, 1 thread (docs/kernels.md).
KERNEL_TABLE = {
    "amx":        {"pointwise": "amx",  "depthwise": "vnni", "classifier": "vnni"},
    "avx512vnni": {"pointwise": "vnni", "depthwise": "vnni", "classifier": "vnni"},
    "avx2":       {"pointwise": "avx2", "depthwise": "pairs", "classifier": "avx2"},
    "generic":    {"pointwise": "addonly|plain", "depthwise": "pairs", "classifier": "plain"},
}
# An AMX pointwise plan runs a call on AMX tiles when the layer has at least AMX_MIN_CIN input
# channels (tdpbusd multiplies 64 at a time) and the call at least AMX_MIN_PIXELS pixels (one
# 16-row tile), else on VNNI. Measured on Lite0's layers, batch 1 / 8, min us VNNI vs AMX:
# Cin 16: 165 / 229, 1287 / 2047; Cin 24: 76 / 93, 687 / 783; Cin 32: 47 / 34, 400 / 334;
# Cin 40: 42 / 31, 319 / 227; Cin >= 80: AMX 1.5-3.5x faster.
AMX_MIN_PIXELS = 16
AMX_MIN_CIN = 32

# Linux x86-64: AMX tile data must be requested per process before the first tile instruction
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM = 0x1022, 0x1023
_XFEATURE_XTILEDATA = 18


def _parse(flat: str) -> dict[str, bool]:
    """'+avx2,-avx512f' -> {'avx2': True, 'avx512f': False}"""
    out = {}
    for tok in flat.split(","):
        tok = tok.strip()
        if len(tok) > 1 and tok[0] in "+-":
            out[tok[1:]] = tok[0] == "+"
    return out


@functools.lru_cache(maxsize=None)
def host_features() -> frozenset[str]:
    """Features of the host CPU as LLVM reports them; empty if detection fails."""
    try:
        import llvmlite.binding as llb
        return frozenset(k for k, v in llb.get_host_cpu_features().items() if v)
    except Exception:   # unknown host (e.g. llvmlite built without host detection): assume nothing
        return frozenset()


@functools.lru_cache(maxsize=None)
def target_features() -> frozenset[str]:
    """Features numba generates code for (host features unless NUMBA_CPU_* say otherwise)."""
    from numba.core import config
    host = host_features()
    if config.CPU_FEATURES is None:
        return host
    # Unmentioned features keep the host's value only when the target CPU is the host itself.
    same_cpu = config.CPU_NAME is None or config.CPU_NAME.lower() == "host"
    feats = {f: True for f in host} if same_cpu else {}
    feats.update(_parse(config.CPU_FEATURES))
    return frozenset(f for f, on in feats.items() if on)


def can_compile(isa: str) -> bool:
    """numba's target has every feature `isa` needs (code may be generated, not necessarily run)."""
    return all(f in target_features() for f in ISA_FEATURES[isa])


def can_run(isa: str) -> bool:
    """Code for `isa` can be generated and executed here."""
    return can_compile(isa) and all(f in host_features() for f in ISA_FEATURES[isa])


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor()), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_class() -> str:
    """The feature class this CPU's kernels are chosen by: amx, avx512vnni, avx2 or generic."""
    if has_amx():
        return "amx"
    if has_avx512vnni():
        return "avx512vnni"
    return "avx2" if has_avx2() else "generic"


@functools.lru_cache(maxsize=None)
def amx_permission() -> bool:
    """Ask Linux, once per process, for the AMX tile data state: arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA), then check ARCH_GET_XCOMP_PERM. False where refused (e.g. a signal stack
    too small for the extra state, or a kernel older than 5.16), on other systems, or when the
    call itself fails: callers then use the VNNI kernels. Needs no numba (replays call it)."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        if libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                        ctypes.c_ulong(_XFEATURE_XTILEDATA)) != 0:
            return False
        granted = ctypes.c_uint64(0)
        if libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_GET_XCOMP_PERM),
                        ctypes.byref(granted)) != 0:
            return False
        return bool(granted.value >> _XFEATURE_XTILEDATA & 1)
    except (OSError, AttributeError):
        return False


def has_amx() -> bool:
    """AMX-INT8 usable here: the CPU has it, numba's target has it, and Linux granted the tile
    state to this process."""
    return has_avx512vnni() and can_run("amx") and amx_permission()


def has_avx512vnni() -> bool:
    return can_run("avx512vnni")


def has_avx2() -> bool:
    return can_run("avx2")


def auto_impl(ternary: bool) -> str:
    """The fastest exact pointwise kernel family for this CPU and weight kind (KERNEL_TABLE;
    avx2 takes both kinds: vpmaddubsw for ternary, the exact vpmaddwd kernel for int8)."""
    impl = KERNEL_TABLE[cpu_class()]["pointwise"]
    if impl == "addonly|plain":
        return "addonly" if ternary else "plain"
    return impl


def depthwise_impl() -> str:
    """The fastest exact depthwise kernel layout for this CPU (KERNEL_TABLE; depthwise.DRIVERS)."""
    return KERNEL_TABLE[cpu_class()]["depthwise"]


def pointwise_isa(cin: int, cout: int, P: int) -> str:
    """AMX or VNNI for a pointwise layer of P pixels on an AMX CPU (see KERNEL_TABLE)."""
    return "amx" if P >= AMX_MIN_PIXELS and cin >= AMX_MIN_CIN else "avx512vnni"


def requested_impl() -> str:
    """The TERNET_KERNELS override: 'auto' (default) or one of IMPLS."""
    v = os.environ.get("TERNET_KERNELS", "auto").strip().lower() or "auto"
    if v != "auto" and v not in IMPLS:
        raise ValueError(f"TERNET_KERNELS={v!r}; expected auto or one of {IMPLS}")
    return v


def best_pointwise_impl(ternary: bool) -> str:
    """Fastest exact pointwise kernel for this CPU and weight kind, or the TERNET_KERNELS override.

    `avx2` covers both weight kinds (vpmaddubsw for ternary, the exact vpmaddwd kernel for int8).
    An override that cannot work raises instead of silently falling back: `addonly` needs ternary
    weights (ValueError), `vnni`/`avx2` need the CPU feature (RuntimeError)."""
    req = requested_impl()
    if req == "auto":
        return auto_impl(ternary)
    if req == "addonly" and not ternary:
        raise ValueError(f"TERNET_KERNELS={req} needs ternary weights")
    if req == "amx" and not has_amx():
        raise RuntimeError("TERNET_KERNELS=amx but this CPU (or numba's target, or Linux) gives no AMX-INT8")
    if req == "vnni" and not has_avx512vnni():
        raise RuntimeError("TERNET_KERNELS=vnni but this CPU (or numba's target) lacks AVX512-VNNI")
    if req == "avx2" and not has_avx2():
        raise RuntimeError("TERNET_KERNELS=avx2 but this CPU (or numba's target) lacks AVX2")
    return req
