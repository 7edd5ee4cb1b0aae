"""CPU feature detection and the choice of kernels (KERNEL_TABLE; see docs/kernels.md).

A feature counts only if the host CPU has it *and* numba compiles for it: `NUMBA_CPU_NAME` /
`NUMBA_CPU_FEATURES` can make numba target less (or more) than the host offers; AMX also needs
Linux to grant the process its tile state. A kernel request (`REQUESTS`: `--kernels`,
`TERNET_KERNELS`, `ternet.load(kernels=...)`) overrides the automatic choice.
Importing this module imports nothing heavy (ternet.config and the CLI import it).
"""
from __future__ import annotations

import functools
import platform
import sys

IMPLS = ("amx", "vnni", "avx2", "addonly", "plain")      # pointwise kernel families
# The one request vocabulary: what --kernels, TERNET_KERNELS and ternet.load(kernels=...) accept.
# auto: this CPU's row of KERNEL_TABLE; a family: that family's row (the CPU must qualify for it);
# reference: the numpy reference runner, which selects no kernel at all.
REQUESTS = ("auto",) + IMPLS + ("reference",)

# Features each ISA-specific micro-kernel needs (names as LLVM spells them).
ISA_FEATURES = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vnni"),
    "avx2": ("avx2",),
    "avx2i8": ("avx2",),
    "amx": ("amx-tile", "amx-int8", "avx512f", "avx512bw", "avx512vnni"),   # tails run VNNI
}

# The kernel each op runs on each CPU class (cpu_class(): the first class the CPU qualifies for).
# The one place the choice is made; a request other than auto picks its family's row
# (REQUEST_ROW; `plain` also for ternary weights). "addonly|plain": the multiplication-free
# kernel for ternary (and hybrid) weights, the portable dense one for int8. The stem is im2col +
# the pointwise family's int8 GEMM (AMX plans run it on VNNI: 27 input channels); the
# classifier's sums come from the VNNI / AVX2 GEMM where there is one (AMX does not pay at batch
# sizes below 16). Measured 2026-12 on a 2-core Intel Xeon
# (AMX) with benchmarks/bench_depthwise.py and bench_pointwise.py, 1 thread (docs/kernels.md).
KERNEL_TABLE = {
    "amx":        {"pointwise": "amx",  "depthwise": "vnni", "classifier": "vnni"},
    "avx512vnni": {"pointwise": "vnni", "depthwise": "vnni", "classifier": "vnni"},
    "avx2":       {"pointwise": "avx2", "depthwise": "pairs", "classifier": "avx2"},
    "generic":    {"pointwise": "addonly|plain", "depthwise": "pairs", "classifier": "plain"},
}
# The row each explicit request stands for, and what the CPU must offer for it (docs/kernels.md).
REQUEST_ROW = {"amx": "amx", "vnni": "avx512vnni", "avx2": "avx2", "addonly": "generic",
               "plain": "generic"}
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
    import ctypes
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


def pointwise_isa(cin: int, cout: int, P: int) -> str:
    """AMX or VNNI for a pointwise layer of P pixels on an AMX CPU (see KERNEL_TABLE)."""
    return "amx" if P >= AMX_MIN_PIXELS and cin >= AMX_MIN_CIN else "avx512vnni"


def _row(request: str) -> dict:
    """KERNEL_TABLE's row for a request; an explicit family the CPU cannot run is an error
    (RuntimeError), never a silent fallback."""
    if request == "auto":
        return KERNEL_TABLE[cpu_class()]
    if request not in REQUEST_ROW:
        raise ValueError(f"kernels={request!r} selects no kernel; expected one of "
                         f"{', '.join(REQUESTS[:-1])}")
    need = {"amx": (has_amx, "AMX-INT8 (the CPU, numba's target and Linux must all allow it)"),
            "vnni": (has_avx512vnni, "AVX-512 VNNI"), "avx2": (has_avx2, "AVX2")}.get(request)
    if need and not need[0]():
        raise RuntimeError(f"kernels={request!r} needs {need[1]}; this CPU (or numba's target) "
                           "has none")
    return KERNEL_TABLE[REQUEST_ROW[request]]


def pointwise_kernel(ternary: bool, request: str = "auto") -> str:
    """The pointwise family (IMPLS) for a layer with ternary (or hybrid) weights or not.

    avx2, vnni and amx take both weight kinds; `addonly`, the multiplication-free kernel, runs
    ternary and hybrid layers, and int8 layers (and the stem's GEMM) run `plain` under it, as
    on a generic CPU. Also the stem's int8 GEMM: pointwise_kernel(False, request)."""
    if request == "plain":
        return "plain"
    family = _row(request)["pointwise"]
    if family == "addonly|plain":
        return "addonly" if ternary else "plain"
    return family


def classifier_kernel(request: str = "auto") -> str:
    """The GEMM behind the classifier's sums: the request's row (vnni, avx2 or plain)."""
    return _row(request)["classifier"]


def depthwise_kernel() -> str:
    """The depthwise layout (depthwise.DRIVERS) for this CPU; no request changes it."""
    return KERNEL_TABLE[cpu_class()]["depthwise"]


