"""VNNI / AVX2 / AMX pointwise micro-kernels (ternet/kernels/vnni.py, amx.py) == the pointwise
reference, bit for bit.

emu512 (portable IR with vpdpbusd's semantics and the VNNI tiling) and emuamx (the AMX tiling with
the tile instructions emulated) run everywhere; the real avx512vnni, amx, avx2 (ternary) and
avx2i8 (int8) kernels run where the CPU has them (AMX plans here run every layer on AMX:
by_size=False), and the VNNI, AMX and avx2i8 code is also cross-compiled (Zen 4, Sapphire Rapids,
Zen 3) to check the instructions it emits.
"""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ternet import quant
from ternet.kernels import cpu, vnni
from ternet.kernels.layout import ROW_SLACK

from ternet.kernels.pointwise import pointwise_acc_ref as ref_acc, pointwise_ref
from pw_cases import POISON, buffers, check_untouched, guarded, make_case, pick_mult

EMU = "emu512"
VNNI = pytest.param("avx512vnni", marks=pytest.mark.skipif(not cpu.has_avx512vnni(), reason="no AVX512-VNNI"))
AVX2 = pytest.param("avx2", marks=pytest.mark.skipif(not cpu.has_avx2(), reason="no AVX2"))
AVX2I8 = pytest.param("avx2i8", marks=pytest.mark.skipif(not cpu.has_avx2(), reason="no AVX2"))
AMX = pytest.param("amx", marks=pytest.mark.skipif(not cpu.has_amx(), reason="no AMX-INT8 (or not granted)"))
ISAS = [EMU, VNNI, AVX2, AVX2I8, "emuamx", AMX]  # avx2 with int8 weights runs avx2i8: every isa takes both kinds
@st.composite
def layers(draw):
    """(P, Cin, Cout, zx, zp_out, lo, hi, seed): odd P down to 1, fan-in up to 1283, any Cout."""
    P = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 5, 7, 49])))
    cin = draw(st.one_of(st.integers(1, 100), st.sampled_from([1280, 1283])))
    cout = draw(st.integers(1, 80))
    zx = draw(st.integers(0, 255))
    zp_out = draw(st.integers(0, 255))
    lo = draw(st.integers(0, 255))
    hi = draw(st.integers(lo, 255))
    return P, cin, cout, zx, zp_out, lo, hi, draw(st.integers(0, 2**32 - 1))


def run_case(isa, ternary, P, cin, cout, zx, zp_out, lo, hi, seed, rule="ternet"):
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, "ternary" if ternary else "int8", zx)
    mult = pick_mult(rng, ref_acc(x, zx, w, bias), cout)
    want = pointwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, rule)
    plan = vnni.make_pw_vnni(w, bias, zx, mult, zp_out, lo, hi, isa=isa, by_size=False, rule=rule)
    assert (plan.cin, plan.cout) == (cin, cout)
    assert (plan.cin_p, plan.cout_p) == (-(-cin // 16) * 16, -(-cout // 16) * 16)
    xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    plan(xb, P, out)
    np.testing.assert_array_equal(out[:P, :cout], want)
    pad_value = quant.requant_ref(np.zeros(1, np.int32), 0, zp_out, lo, hi, rule)  # mult = bias = 0
    assert (out[:P, cout:] == pad_value).all()
    check_untouched(out, P)
    return plan, x, w, bias, xb


@pytest.mark.parametrize("isa", ISAS)
@given(case=layers(), rule=st.sampled_from(quant.RULES))
def test_ternary_matches_reference(isa, case, rule):
    run_case(isa, True, *case, rule=rule)


@pytest.mark.parametrize("isa", ISAS)
@given(case=layers(), rule=st.sampled_from(quant.RULES))
def test_int8_matches_reference(isa, case, rule):
    run_case(isa, False, *case, rule=rule)


@pytest.mark.parametrize("isa", ISAS)
@given(case=layers(), ternary=st.booleans())
def test_int32_accumulators_exact(isa, case, ternary):
    P, cin, cout, zx, _, _, _, seed = case
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, "ternary" if ternary else "int8", zx)
    plan = vnni.make_pw_vnni(w, bias, zx, np.ones(cout, np.float32), 0, 0, 255, isa=isa, by_size=False)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, P, acc)
    np.testing.assert_array_equal(acc[:P, :cout], ref_acc(x, zx, w, bias))
    assert (acc[:P, cout:] == 0).all()
    check_untouched(acc, P)


@pytest.mark.parametrize("isa", ISAS)
def test_wide_layers(isa):
    """Fan-in 1280+ and Cout 1000+ (K loop far past avx2's 64-step int16 groups)."""
    for P, cin, cout in [(7, 1280, 1001), (3, 1311, 40), (49, 320, 1280)]:
        run_case(isa, False, P, cin, cout, 117, 128, 0, 255, cin + cout)
        run_case(isa, True, P, cin, cout, 0, 3, 3, 200, cout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wval", [-128, 127, -127])
def test_extreme_products(isa, wval):
    """x = 255 against a constant weight of extreme magnitude, fan-in 4099: every vpmaddubsw pair
    would saturate (2*255*128 > 32767), the accumulators reach -133.8M; a few other pixels vary x."""
    rng = np.random.default_rng(wval & 0xFF)
    P, cin, cout = 11, 4099, 19
    x = np.full((P, cin), 255, np.uint8)
    x[5:] = rng.integers(0, 256, (P - 5, cin), dtype=np.uint8)
    w = np.full((cout, cin), wval, np.int8)
    w[cout // 2:, ::3] = -wval if wval > -128 else 127
    bias = rng.integers(-2**20, 2**20, cout, dtype=np.int32)
    plan = vnni.make_pw_vnni(w, bias, 0, np.ones(cout, np.float32), 0, 0, 255, isa=isa, by_size=False)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, P, acc)
    np.testing.assert_array_equal(acc[:P, :cout], ref_acc(x, 0, w, bias))
    check_untouched(acc, P)
    mult = pick_mult(rng, ref_acc(x, 0, w, bias), cout)
    plan = vnni.make_pw_vnni(w, bias, 0, mult, 77, 0, 255, isa=isa, by_size=False)
    xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    plan(xb, P, out)
    np.testing.assert_array_equal(out[:P, :cout], pointwise_ref(x, 0, w, bias, mult, 77, 0, 255))
    check_untouched(out, P)


@pytest.mark.parametrize("isa", ISAS)
@given(case=layers(), ternary=st.booleans())
def test_negated_weights_negate_accumulator(isa, case, ternary):
    P, cin, cout, _, _, _, _, seed = case
    rng = np.random.default_rng(seed)
    x, w, _ = make_case(rng, P, cin, cout, "ternary" if ternary else "int8", 0)
    w = np.maximum(w, -127)          # symmetric int8, so -w fits
    zero, one = np.zeros(cout, np.int32), np.ones(cout, np.float32)
    accs = []
    for ww in (w, -w):
        plan = vnni.make_pw_vnni(ww, zero, 0, one, 0, 0, 255, isa=isa, by_size=False)
        xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
        plan.accumulate(xb, P, acc)
        accs.append(acc[:P])
    np.testing.assert_array_equal(accs[1], -accs[0])


@pytest.mark.parametrize("isa", ISAS)
def test_zero_weights_give_bias(isa):
    rng = np.random.default_rng(1)
    P, cin, cout = 13, 40, 24
    x = rng.integers(0, 256, (P, cin), dtype=np.uint8)
    bias = rng.integers(-300, 300, cout, dtype=np.int32)
    mult = np.full(cout, 0.37, np.float32)
    plan = vnni.make_pw_vnni(np.zeros((cout, cin), np.int8), bias, 77, mult, 100, 0, 255, isa=isa, by_size=False)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, P, acc)
    assert (acc[:P, :cout] == bias).all()
    xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    plan(xb, P, out)
    assert (out[:P, :cout] == quant.requant_ref(np.broadcast_to(bias, (P, cout)), mult, 100, 0, 255)).all()


@pytest.mark.parametrize("isa", ISAS)
def test_requant_rounds_product_before_adding(isa):
    """Accumulators whose float32 product lands a hair past -(zp - 0.5): rounding the product
    first (the rule) gives floor(1.0) = 1, a fused multiply-add gives floor(0.99999..) = 0."""
    rng = np.random.default_rng(7)
    cout, zp = 512, 120
    acc = -rng.integers(1000, 2**22, cout).astype(np.int32)          # bias-only layer: acc = bias
    mult = ((zp - 0.5) / -acc.astype(np.float64)).astype(np.float32)
    fused = np.floor((acc.astype(np.float64) * mult + (zp + 0.5)).astype(np.float32))
    want = quant.requant_ref(acc[None, :], mult, zp, 0, 255)[0]
    assert (fused != want).sum() > 20            # the test can tell the two apart
    plan = vnni.make_pw_vnni(np.zeros((cout, 4), np.int8), acc, 0, mult, zp, 0, 255, isa=isa, by_size=False)
    xb, out = buffers(np.zeros((3, 4), np.uint8), 3, plan.cin_p, plan.cout_p, rng)
    plan(xb, 3, out)
    assert (out[:3, :cout] == want).all()


# ------------------------------------------------------------------ threads and work chunks

@given(P=st.integers(1, 3000), cin=st.integers(1, 600), cout=st.integers(1, 1300),
       threads=st.integers(1, 9), isa=st.sampled_from(sorted(vnni.ISAS)))
def test_split_work_partitions_outputs(P, cin, cout, threads, isa):
    cin_p, cout_p = -(-cin // 16) * 16, -(-cout // 16) * 16
    spec = vnni.ISAS[isa]
    chunks = vnni.split_work(P, cout_p, cin_p, spec, threads)
    assert chunks.dtype == np.int64 and chunks.ndim == 2 and chunks.shape[1] == 4
    assert 1 <= len(chunks) <= threads
    owner = np.zeros((P, cout_p // 16), np.int64)
    for p0, p1, o0, o1 in chunks:
        assert 0 <= p0 < p1 <= P and 0 <= o0 < o1 <= cout_p and o0 % 16 == 0 and o1 % 16 == 0
        assert p1 == P or (p1 - p0) % spec.npix == 0      # only the last chunk has a pixel tail
        owner[p0:p1, o0 // 16:o1 // 16] += 1
    assert (owner == 1).all()


@pytest.mark.parametrize("isa", ISAS)
def test_results_independent_of_thread_count(isa):
    rng = np.random.default_rng(5)
    P, cin, cout = 397, 96, 200
    assert P * 96 * 208 >= vnni.PAR_MIN_MACS          # big enough to be split
    x, w, bias = make_case(rng, P, cin, cout, "ternary" if isa == "avx2" else "int8", 9)
    mult = pick_mult(rng, ref_acc(x, 9, w, bias), cout)
    plan = vnni.make_pw_vnni(w, bias, 9, mult, 30, 0, 255, isa=isa, by_size=False)
    xb, _ = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    serial, par, _ = vnni._drivers(isa)
    want = pointwise_ref(x, 9, w, bias, mult, 30, 0, 255)
    # emu512's parallel driver takes ~10 s to compile; its chunk logic is the serial one's
    drivers = (serial,) if isa in ("emu512", "emuamx") else (serial, par)
    for threads in (1, 2, 3, 4, 7):
        chunks = vnni.split_work(P, plan.cout_p, plan.cin_p, vnni.ISAS[isa], threads)
        assert len(chunks) == threads          # pixel or channel splits, tails included
        for drv in drivers:
            out = np.full((P + ROW_SLACK, plan.cout_p), POISON, np.uint8)
            drv(xb, plan.w, plan.bias, plan.mult, plan.zph, plan.zpc, plan.lo, plan.hi, out, plan.nkb, chunks)
            np.testing.assert_array_equal(out[:P, :cout], want)
    old = numba.get_num_threads()
    try:
        for t in range(1, numba.config.NUMBA_NUM_THREADS + 1 if isa not in ("emu512", "emuamx") else 2):
            numba.set_num_threads(t)
            out = np.full((P + ROW_SLACK, plan.cout_p), POISON, np.uint8)
            plan(xb, P, out)
            np.testing.assert_array_equal(out[:P, :cout], want)
    finally:
        numba.set_num_threads(old)


# ------------------------------------------------------------------ memory bounds

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect")
@pytest.mark.parametrize("isa", ISAS)
def test_no_access_past_the_buffers(isa):
    """x and out end right before a PROT_NONE page: any read/write past row P + ROW_SLACK faults."""
    rng = np.random.default_rng(3)
    for P, cin, cout in [(1, 20, 40), (5, 64, 16), (49, 33, 50)]:
        x, w, bias = make_case(rng, P, cin, cout, "ternary" if isa == "avx2" else "int8", 4)
        mult = pick_mult(rng, ref_acc(x, 4, w, bias), cout)
        plan = vnni.make_pw_vnni(w, bias, 4, mult, 10, 0, 255, isa=isa, by_size=False)
        with guarded((P + ROW_SLACK, plan.cin_p), (P + ROW_SLACK, plan.cout_p)) as (xb, out):
            xb[...] = rng.integers(0, 256, xb.shape, dtype=np.uint8)
            xb[:P, :cin] = x
            plan(xb, P, out)
            np.testing.assert_array_equal(out[:P, :cout], pointwise_ref(x, 4, w, bias, mult, 10, 0, 255))


# ------------------------------------------------------------------ validation and dispatch

@pytest.mark.skipif(not cpu.has_avx2(), reason="no AVX2")
def test_avx2_picks_kernel_by_weight_kind():
    """isa="avx2": vpmaddubsw only when every weight is ternary; int8 and hybrid layers (a few
    int8 rows) run the exact int8 kernel over all rows; isa="avx2i8" forces it."""
    rng = np.random.default_rng(11)
    args = (np.zeros(20, np.int32), 3, np.ones(20, np.float32), 0, 0, 255)
    tern = rng.integers(-1, 2, (20, 37)).astype(np.int8)
    hybrid = tern.copy()
    hybrid[[3, 17]] = rng.integers(-128, 128, (2, 37))
    assert vnni.make_pw_vnni(tern, *args, isa="avx2").isa == "avx2"
    assert vnni.make_pw_vnni(np.zeros((20, 37), np.int8), *args, isa="avx2").isa == "avx2"
    assert vnni.make_pw_vnni(tern, *args, isa="avx2i8").isa == "avx2i8"
    for w in (hybrid, np.array([[1, 0, -1, 2]] * 20, np.int8)):
        plan = vnni.make_pw_vnni(w, *args, isa="avx2")
        assert (plan.isa, plan.impl, plan.w.dtype) == ("avx2i8", "avx2", np.int16)
    x = rng.integers(0, 256, (9, 37), dtype=np.uint8)
    plan = vnni.make_pw_vnni(hybrid, *args, isa="avx2")
    xb, acc = buffers(x, 9, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, 9, acc)
    np.testing.assert_array_equal(acc[:9, :20], ref_acc(x, 3, hybrid, args[0]))


def test_wide_weight_packing():
    """avx2i8 layout [blk, k, e, o, h] = w[16 blk + o, 4k + e + 2h], zero padded."""
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (21, 13), dtype=np.int8)
    wp = vnni.pack_weights(w, 16, 32, wide=True)
    assert wp.shape == (2, 4, 2, 16, 2) and wp.dtype == np.int16 and wp.ctypes.data % 64 == 0
    full = np.zeros((32, 16), np.int16)
    full[:21, :13] = w
    for blk, k, e, o, h in np.ndindex(wp.shape):
        assert wp[blk, k, e, o, h] == full[16 * blk + o, 4 * k + e + 2 * h]


def test_rejects_bad_arguments():
    args = (np.zeros(1, np.int32), 0, np.ones(1, np.float32), 0, 0, 255)
    with pytest.raises(ValueError):
        vnni.make_pw_vnni(np.zeros((1, 4), np.int8), *args, isa="sse2")
    with pytest.raises(OverflowError):
        vnni.make_pw_vnni(np.full((1, 70000), 127, np.int16).clip(-128, 127), *args, isa="emu512")
    plan = vnni.make_pw_vnni(np.ones((3, 5), np.int8), np.zeros(3, np.int32), 0, np.ones(3, np.float32),
                             0, 0, 255, isa="emu512")
    x, out = np.zeros((10, 16), np.uint8), np.zeros((10, 16), np.uint8)
    with pytest.raises(ValueError):
        plan(x, 3, out)                                  # 3 + ROW_SLACK > 10 rows
    with pytest.raises(ValueError):
        plan(np.zeros((10, 32), np.uint8), 2, out)       # wrong channel padding
    plan(x, 0, out)                                      # nothing to do


def test_missing_isa_raises_runtime_error(monkeypatch):
    w = np.zeros((4, 4), np.int8)
    args = (np.zeros(4, np.int32), 0, np.ones(4, np.float32), 0, 0, 255)
    if cpu.has_avx512vnni():
        monkeypatch.setattr(cpu, "can_run", lambda isa: False)
    with pytest.raises(RuntimeError, match="avx512vnni"):
        vnni.make_pw_vnni(w, *args, isa="avx512vnni")
    if not cpu.can_compile("avx512vnni"):   # the compile-time guard, before any code generation
        plan = vnni.make_pw_vnni(w, *args, isa="emu512")
        x = np.zeros((9, 16), np.uint8)
        with pytest.raises(RuntimeError, match="avx512vnni"):
            vnni.pw_i8_u8_vnni(x, plan.w, plan.bias, plan.mult, plan.zph, plan.zpc, plan.lo, plan.hi, x.copy(),
                               plan.nkb, vnni.split_work(1, 16, 16, vnni.ISAS["emu512"], 1))


def test_amx_runs_where_it_pays(monkeypatch):
    """An AMX plan takes cpu.pointwise_isa's choice per call: VNNI for few input channels or
    pixels, AMX above; both exact."""
    assert cpu.pointwise_isa(cpu.AMX_MIN_CIN, 96, cpu.AMX_MIN_PIXELS) == "amx"
    assert cpu.pointwise_isa(cpu.AMX_MIN_CIN - 1, 96, 10_000) == "avx512vnni"
    assert cpu.pointwise_isa(1152, 96, cpu.AMX_MIN_PIXELS - 1) == "avx512vnni"
    runs_here = {"amx": cpu.has_amx(), "avx512vnni": cpu.has_avx512vnni()}
    monkeypatch.setattr(cpu, "amx_permission", lambda: True)     # plans for any CPU
    monkeypatch.setattr(cpu, "can_run", lambda isa: True)
    rng = np.random.default_rng(8)
    for cin, P, want in [(80, 40, "amx"), (80, 7, "avx512vnni"), (24, 40, "avx512vnni")]:
        x, w, bias = make_case(rng, P, cin, 40, "ternary", 5)
        mult = pick_mult(rng, ref_acc(x, 5, w, bias), 40)
        plan = vnni.make_pw_vnni(w, bias, 5, mult, 9, 0, 255, isa="amx")
        isa, _, _ = plan._work(P)
        assert isa == want
        if runs_here[isa]:                          # run it where the CPU can
            xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
            plan(xb, P, out)
            np.testing.assert_array_equal(out[:P, :40], pointwise_ref(x, 5, w, bias, mult, 9, 0, 255))


def test_host_features_are_consistent():
    assert isinstance(cpu.host_features(), frozenset)
    assert cpu.has_avx512vnni() == cpu.can_run("avx512vnni")
    if cpu.has_avx512vnni():
        assert {"avx512f", "avx512bw"} <= cpu.host_features()


# ------------------------------------------------------------------ generated code

_ASM_SCRIPT = """
import re, sys, numba, numpy as np
from ternet.kernels import vnni
wide, driver = sys.argv[1] == "wide", getattr(vnni, sys.argv[2])
w = np.full((40, 72), 3, np.int8)     # an emu512 plan: no check that the host can run the code
plan = vnni.make_pw_vnni(w, np.zeros(40, np.int32), 0, np.ones(40, np.float32), 0, 0, 255, isa="emu512")
x, out = np.zeros((20, plan.cin_p), np.uint8), np.zeros((20, plan.cout_p), np.uint8)
args = (x, vnni.pack_weights(w, plan.cin_p, plan.cout_p, wide), plan.bias, plan.mult, plan.zph, plan.zpc,
        plan.lo, plan.hi, out, plan.nkb, plan._work(12)[2])
sig = tuple(numba.typeof(a) for a in args)
driver.compile(sig)
asm = driver.inspect_asm(sig)
for pat in sys.argv[3:]:
    print(len(re.findall(pat, asm)))
"""


def _cross_compile(cpu_name, feats, wide, driver, patterns):
    """Counts of each regex in `driver`'s assembly, compiled (not run) for cpu_name + feats."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CPU_NAME=cpu_name, NUMBA_CPU_FEATURES=feats,
               TERNET_NUMBA_CACHE="0", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", _ASM_SCRIPT, "wide" if wide else "narrow", driver,
                          *patterns], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return list(map(int, res.stdout.split()[-len(patterns):]))


def test_vnni_asm_cross_compiled_for_zen4():
    """Compile (not run) the VNNI driver for znver4: it must use vpdpbusd (never the saturating
    vpdpbusds) on zmm registers and contain no FMA (the requant rounds mul and add separately)."""
    import llvmlite.binding as llb
    feats = llb.get_host_cpu_features()
    for f in cpu.ISA_FEATURES["avx512vnni"] + ("avx512vl", "avx512dq"):
        feats[f] = True
    n_dp, n_dps, n_zmm, n_fma = _cross_compile(
        "znver4", feats.flatten(), False, "pw_i8_u8_vnni",
        [r"\bvpdpbusds?\b", r"\bvpdpbusds\b", r"%zmm", r"\bvfn?m(add|sub)"])
    assert n_dp >= 12 and n_dps == 0 and n_zmm > 0 and n_fma == 0


def test_avx2i8_asm_cross_compiled_for_zen3():
    """Compile (not run) the int8 AVX2 driver for znver3 (AVX2 + FMA, no AVX-512): the 4 px x 16 oc
    tile is 16 vpmaddwd per K step, never the saturating vpmaddubsw; ymm only; no FMA."""
    feats = "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,-avx512f,-avx512bw,-avx512vnni"
    n_wd, n_ubsw, n_zmm, n_ymm, n_fma = _cross_compile(
        "znver3", feats, True, "pw_i8_u8_avx2",
        [r"\bvpmaddwd\b", r"\bvpmaddubsw\b", r"%zmm", r"%ymm", r"\bvfn?m(add|sub)"])
    assert n_wd >= 16 and n_ubsw == 0 and n_zmm == 0 and n_ymm > 0 and n_fma == 0


_AMX_ASM_SCRIPT = """
import re, sys, numba, numpy as np
from ternet.kernels import amx, vnni
w = np.full((40, 72), 3, np.int8)     # an emuamx plan: same weights, no check that the host has AMX
plan = vnni.make_pw_vnni(w, np.zeros(40, np.int32), 0, np.ones(40, np.float32), 0, 0, 255, isa="emuamx")
x, out = np.zeros((40, plan.cin_p), np.uint8), np.zeros((40, plan.cout_p), np.uint8)
args = (x, plan.w, plan.bias, plan.mult, plan.zph, plan.zpc, plan.lo, plan.hi, out, plan.nkb, plan._work(30)[2])
sig = tuple(numba.typeof(a) for a in args)
amx.pw_i8_u8_amx.compile(sig)
asm = amx.pw_i8_u8_amx.inspect_asm(sig)
for pat in sys.argv[1:]:
    print(len(re.findall(pat, asm)))
"""


def test_amx_asm_cross_compiled_for_sapphire_rapids():
    """Compile (not run) the AMX driver for sapphirerapids: tile configuration and release,
    tileloadd / tdpbusd / tilestored, vpdpbusd for the tail pixels, no FMA in the requant."""
    import llvmlite.binding as llb
    feats = llb.get_host_cpu_features()
    for f in cpu.ISA_FEATURES["amx"] + ("avx512vl", "avx512dq"):
        feats[f] = True
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=feats.flatten(),
               TERNET_NUMBA_CACHE="0", PYTHONPATH=root)
    pats = [r"\bldtilecfg\b", r"\btilerelease\b", r"\btileloadd\b", r"\btdpbusd\b",
            r"\btilestored\b", r"\bvpdpbusd\b", r"\bvfn?m(add|sub)"]
    res = subprocess.run([sys.executable, "-c", _AMX_ASM_SCRIPT, *pats], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg, rel, load, dp, store, vnni_dp, fma = map(int, res.stdout.split()[-len(pats):])
    assert cfg >= 1 and rel >= 1 and load > 0 and dp >= 4 and store >= 1 and vnni_dp > 0 and fma == 0


def test_import_compiles_nothing():
    code = ("import ternet.kernels.vnni as v\n"
            "assert all(not d.signatures for ds in v.DRIVERS.values() for d in ds)\n"
            "assert all(not d.overloads for ds in v.DRIVERS.values() for d in ds)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("isa", ISAS)
@given(case=layers(), ternary=st.booleans(), add=st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.integers(0, 255), st.floats(0.0625, 4.0, width=32), st.floats(0.0625, 4.0, width=32)),
    rule=st.sampled_from(quant.RULES))
def test_fused_residual_add_matches_reference(isa, case, ternary, add, rule):
    """pointwise + residual add in one epilogue == pointwise_ref, then quant.add_ref (the
    pointwise part under either requantization rule, the add under ternet's)."""
    P, cin, cout, zx, zp_out, lo, hi, seed = case
    zr, zp2, lo2, hi2_, _, mr, mq = add
    lo2, hi2 = min(lo2, hi2_), max(lo2, hi2_)
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, "ternary" if ternary else "int8", zx)
    mult = pick_mult(rng, ref_acc(x, zx, w, bias), cout)
    q = pointwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, rule)
    plan = vnni.make_pw_add(vnni.make_pw_vnni(w, bias, zx, mult, zp_out, lo, hi, isa=isa, by_size=False,
                                              rule=rule),
                            zr, mr, zp_out, mq, zp2, lo2, hi2)
    xb, out = buffers(x, P, plan.pw.cin_p, plan.pw.cout_p, rng)
    res = rng.integers(0, 256, out.shape, dtype=np.uint8)
    plan(xb, P, out, res)
    want = quant.add_ref(res[:P, :cout], zr, mr, q, zp_out, mq, zp2, lo2, hi2)
    np.testing.assert_array_equal(out[:P, :cout], want)
    check_untouched(out, P)
