"""CPU feature detection and the choice of pointwise kernel (see docs/kernels.md).

A feature counts only if the host CPU has it *and* numba compiles for it: `NUMBA_CPU_NAME` /
`NUMBA_CPU_FEATURES` can make numba target less (or more) than the host offers.
`TERNET_KERNELS=auto|vnni|avx2|addonly|plain` overrides the automatic choice.
"""
from __future__ import annotations

import functools
import os

IMPLS = ("vnni", "avx2", "addonly", "plain")

# Features each ISA-specific micro-kernel needs (names as LLVM spells them).
ISA_FEATURES = {
    "avx512vnni": ("avx512f", "avx512bw", "avx512vnni"),
    "avx2": ("avx2",),
    "avx2i8": ("avx2",),
}


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


def has_avx512vnni() -> bool:
    return can_run("avx512vnni")


def has_avx2() -> bool:
    return can_run("avx2")


def auto_impl(ternary: bool) -> str:
    """The fastest exact pointwise kernel family for this CPU and weight kind."""
    if has_avx512vnni():
        return "vnni"
    if has_avx2():
        return "avx2"       # ternary: vpmaddubsw; int8 (and hybrid) weights: the exact vpmaddwd kernel
    return "addonly" if ternary else "plain"


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
    if req == "vnni" and not has_avx512vnni():
        raise RuntimeError("TERNET_KERNELS=vnni but this CPU (or numba's target) lacks AVX512-VNNI")
    if req == "avx2" and not has_avx2():
        raise RuntimeError("TERNET_KERNELS=avx2 but this CPU (or numba's target) lacks AVX2")
    return req
