"""Depthwise kernels (ternet/kernels/depthwise.py, dw_vnni.py) == depthwise_ref, bit for bit, plus
properties.

Full-range data (u8 0..255, int8 weights -128..127), odd sizes, stride 2 on odd sizes, both padding
modes, channel counts that are not multiples of 4, 16 or 64, batches > 1; outputs are poisoned so
writes outside the real output rows are caught. Every layout runs: "pairs" (AVX2, and its portable
IR), "emu512" (the AVX512-VNNI layout and tiling on portable IR, any CPU) and "vnni" where the CPU
has AVX512-VNNI; its code is also cross-compiled for Zen 4 to check the instructions.
"""
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ternet import quant
from ternet.kernels import cpu, dw_vnni
from ternet.kernels import depthwise as dw
from ternet.kernels.layout import ROW_SLACK, pad_to

POISON = 0xA5
VNNI = pytest.param("vnni", marks=pytest.mark.skipif(not cpu.has_avx512vnni(), reason="no AVX512-VNNI"))
IMPLS = ["pairs", "emu512", VNNI]


@st.composite
def dw_layers(draw):
    """(N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed)"""
    N = draw(st.integers(1, 3))
    H = draw(st.integers(1, 13))
    W = draw(st.integers(1, 13))
    C = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 17, 33, 100, 300])))
    k = draw(st.sampled_from([3, 5, 3, 5, 1, 7]))
    stride = draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["same", "symmetric"]))
    zx = draw(st.integers(0, 255))
    zp_out = draw(st.integers(0, 255))
    lo = draw(st.integers(0, 255))
    hi = draw(st.integers(lo, 255))
    return N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, draw(st.integers(0, 2**32 - 1))


def make_data(rng, N, H, W, C, k, wmin=-128):
    """Full range: x contains 0 and 255, w reaches wmin and 127."""
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    x.flat[rng.integers(0, x.size, 2)] = (0, 255)
    w = rng.integers(wmin, 128, (k, k, C)).astype(np.int8)
    w.flat[rng.integers(0, w.size, 2)] = (wmin, 127)
    bias = rng.integers(-50000, 50000, C).astype(np.int32)
    return x, w, bias


def pick_mult(rng, acc, C):
    """Multipliers from the observed accumulator range so outputs spread over [0, 255]; sometimes a
    power of two, which makes exact .5 ties (round-half-up) frequent."""
    span = max(1, int(acc.max()) - int(acc.min()))
    if rng.random() < 0.25:
        return np.full(C, 2.0 ** np.floor(np.log2(255 / span)), np.float32)
    return (rng.uniform(0.3, 3.0, C) * 255 / span).astype(np.float32)


def activation(rng, x, Cp):
    """x u8[N,H,W,C] inside a 2-D buffer u8[N*H*W + ROW_SLACK, Cp] with garbage in the padded
    channels and slack rows; returns (buffer, 4-D view)."""
    N, H, W, C = x.shape
    P = N * H * W
    buf = rng.integers(0, 256, (P + ROW_SLACK, Cp), dtype=np.uint8)
    buf[:P, :C] = x.reshape(P, C)
    return buf, buf[:P].reshape(N, H, W, Cp)


def output(N, Ho, Wo, Cp, dtype=np.uint8, extra=3):
    """Poisoned output buffer [N*Ho*Wo + ROW_SLACK + extra, Cp] and its 4-D view."""
    P = N * Ho * Wo
    buf = np.empty((P + ROW_SLACK + extra, Cp), dtype)
    buf.view(np.uint8)[...] = POISON
    return buf, buf[:P].reshape(N, Ho, Wo, Cp)


def run(case, wmin=-128, impl="pairs", rule="ternet"):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, k, stride)
    x, w, bias = make_data(rng, N, H, W, C, k, wmin)
    acc = dw.depthwise_acc_ref(x, zx, w, bias, stride, pt, pl, Ho, Wo)
    mult = pick_mult(rng, acc, C)
    plan = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo,
                             impl=impl, rule=rule)
    _, x4 = activation(rng, x, plan.cp)
    return rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers(), rule=st.sampled_from(quant.RULES))
def test_matches_reference(impl, case, rule):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl, rule=rule)
    want = dw.depthwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pt, pl, Ho, Wo, rule)
    assert plan.cp == pad_to(C)
    for variant in (plan, plan.portable):
        buf, out = output(N, Ho, Wo, plan.cp)
        variant(x4, out)
        np.testing.assert_array_equal(out[..., :C], want)
        # padded channels: weight, bias and multiplier 0 -> zp_out clamped
        pad_value = quant.requant_ref(np.zeros(1, np.int32), 0, zp_out, lo, hi, rule)
        assert (out[..., C:] == pad_value).all()
        assert (buf[N * Ho * Wo:] == POISON).all(), "wrote past the output rows"


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers(), junk=st.integers(0, 255))
def test_bordered_copy_equals_gather(impl, case, junk):
    """pad_input=True (copy into a zero-point border, every pixel interior) and False (border
    pixels gather their window) both equal the reference, with the plan's own scratch and with a
    larger shared scratch full of junk; pad_u8 equals numpy padding."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl)
    want = dw.depthwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pt, pl, Ho, Wo)
    for pad_input in (True, False):
        p = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo,
                              pad_input=pad_input, impl=impl)
        assert p.padded == pad_input
        for scratch in (None, np.full(p.padded_bytes(N) + 100, junk, np.uint8)):
            buf, out = output(N, Ho, Wo, p.cp)
            p(x4, out, scratch)
            np.testing.assert_array_equal(out[..., :C], want)
            assert (buf[N * Ho * Wo:] == POISON).all(), "wrote past the output rows"
    Hp, Wp = max((Ho - 1) * stride + k, pt + H), max((Wo - 1) * stride + k, pl + W)
    xp = np.full((N, Hp, Wp, x4.shape[3]), junk, np.uint8)
    dw.pad_u8(x4, zx, pt, pl, xp)
    ref = np.full_like(xp, zx)
    ref[:, pt:pt + H, pl:pl + W] = x4
    np.testing.assert_array_equal(xp, ref)


def test_pads_input_rule():
    """Bordered copy for the 5x5 stride-1 layers, gather for the 3x3 and stride-2 ones (Lite0)."""
    assert dw.pads_input(5, 1, 2, 2, 7, 7, 7, 7)
    assert dw.pads_input(5, 1, 2, 2, 14, 14, 14, 14)
    assert dw.pads_input(5, 1, 2, 2, 28, 28, 28, 28)
    assert not dw.pads_input(3, 1, 1, 1, 14, 14, 14, 14)
    assert not dw.pads_input(5, 2, 1, 1, 56, 56, 28, 28)
    assert not dw.pads_input(3, 2, 0, 0, 112, 112, 56, 56)
    # the AVX-512 layout copies from a lower border share: Lite0's 5x5 stride-2 layer 14 -> 7 too
    assert dw.pads_input(5, 2, 1, 1, 14, 14, 7, 7, "vnni") and not dw.pads_input(5, 2, 1, 1, 14, 14, 7, 7)
    assert not dw.pads_input(5, 2, 1, 1, 56, 56, 28, 28, "vnni")
    assert not dw.pads_input(3, 1, 1, 1, 14, 14, 14, 14, "vnni")


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers())
def test_accumulators_match_reference(impl, case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl)
    buf, a = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    np.testing.assert_array_equal(a[..., :C], acc)
    assert (a[..., C:] == 0).all()
    assert (buf[N * Ho * Wo:].view(np.uint8) == POISON).all()


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers())
def test_padding_equals_explicit_zero_point_border(impl, case):
    """'same'/'symmetric' padding == the same kernel on an input padded with zx and no padding."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl)
    Hp, Wp = max((Ho - 1) * stride + k, pt + H), max((Wo - 1) * stride + k, pl + W)
    xp = np.full((N, Hp, Wp, C), zx, np.uint8)
    xp[:, pt:pt + H, pl:pl + W] = x
    plan0 = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, 0, 0, Hp, Wp, Ho, Wo,
                              impl=impl)
    _, xp4 = activation(rng, xp, plan.cp)
    _, a = output(N, Ho, Wo, plan.cp)
    _, b = output(N, Ho, Wo, plan.cp)
    plan(x4, a)
    plan0(xp4, b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers())
def test_negated_weights_negate_accumulator(impl, case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, wmin=-127, impl=impl)
    neg = dw.make_depthwise(-w, -bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo,
                            impl=impl)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    _, b = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    neg.accumulate(x4, b)
    np.testing.assert_array_equal(b, -a)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers())
def test_zero_weights_give_bias(impl, case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl)
    zero = dw.make_depthwise(np.zeros_like(w), bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W,
                             Ho, Wo, impl=impl)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    zero.accumulate(x4, a)
    assert (a[..., :C] == bias).all()
    _, out = output(N, Ho, Wo, plan.cp)
    zero(x4, out)
    want = quant.requant_ref(np.broadcast_to(bias, (N, Ho, Wo, C)).astype(np.int32), mult, zp_out, lo, hi)
    np.testing.assert_array_equal(out[..., :C], want)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=dw_layers())
def test_unit_1x1_is_identity_on_centred_input(impl, case):
    """k = 1, weight 1, bias 0: the accumulator is x - zx (every stride-th pixel)."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, 1, stride)
    plan = dw.make_depthwise(np.ones((1, 1, C), np.int8), np.zeros(C, np.int32), zx,
                             np.ones(C, np.float32), zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo,
                             impl=impl)
    _, x4 = activation(rng, x, plan.cp)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    np.testing.assert_array_equal(a[..., :C], x[:, ::stride, ::stride].astype(np.int32) - zx)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@pytest.mark.parametrize("impl", ["pairs", VNNI])
@given(case=dw_layers())
def test_parallel_driver_is_deterministic(impl, case):
    """The prange driver gives the serial result for any split of the rows (1, 2, 3 chunks)."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, impl=impl)
    serial, par, _ = dw.DRIVERS[impl]
    _, want = output(N, Ho, Wo, plan.cp)
    serial(*plan._args(x4), want, plan.patch)
    patch = np.zeros((3, plan.patch.shape[1]), np.uint8)
    for chunks in (1, 2, 3):
        _, out = output(N, Ho, Wo, plan.cp)
        par(*plan._args(x4), out, patch[:chunks])
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 56, 56, 144, 3, 2), (1, 20, 37, 240, 5, 1),
                                   (1, 9, 30, 96, 3, 1), (2, 15, 33, 1152, 5, 2),
                                   (2, 11, 41, 32, 3, 1), (1, 8, 29, 16, 5, 1)])
def test_real_shapes_and_batch(impl, shape):
    """Lite0 / MobileNetV2 channel counts (tails of 16, 48 and 32 channels past 64-channel steps,
    and none; 16 and 32: runs of pixels per step), rows long enough for several 4-pixel tiles at
    stride 1 and 2, batch 2 and 2 threads (emu512 serially)."""
    rng = np.random.default_rng(0)
    N, H, W, C, k, s = shape
    pt, pl, Ho, Wo = quant.conv_geometry("same", H, W, k, s)
    x, w, bias = make_data(rng, N, H, W, C, k)
    acc = dw.depthwise_acc_ref(x, 7, w, bias, s, pt, pl, Ho, Wo)
    mult = pick_mult(rng, acc, C)
    want = quant.requant_ref(acc, mult, 3, 3, 200)
    for pad_input in (False, True):
        plan = dw.make_depthwise(w, bias, 7, mult, 3, 3, 200, s, pt, pl, H, W, Ho, Wo,
                                 pad_input=pad_input, impl=impl)
        _, x4 = activation(rng, x, plan.cp)
        buf, out = output(N, Ho, Wo, plan.cp)
        threads = numba.get_num_threads()
        try:
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            plan(x4, out)
        finally:
            numba.set_num_threads(threads)
        np.testing.assert_array_equal(out[..., :C], want)
        assert (buf[N * Ho * Wo:] == POISON).all()


def test_vnni_layout_lanes():
    """dw_vnni's tables agree: LANE_CH is a permutation of each 64-channel block; the packs'
    byte order (vpackusdw(acc0, acc1), vpackusdw(acc2, acc3), vpackuswb) followed by _UNPACK
    restores channel order; pair_weights puts tap t of pair (ca, cb) for channel LANE_CH[r, i]
    at byte 4i + 2e + t of vector r (e = r % 2), zeros elsewhere."""
    assert sorted(dw_vnni.LANE_CH.reshape(-1)) == list(range(64))
    packed = [16 * l + c for l in range(4) for c in dw_vnni.PACKED]      # channel at each byte
    for l in range(4):    # 128-bit lane l of the packed bytes: lanes 4l..4l+3 of acc 0, 1, 2, 3
        assert [dw_vnni.LANE_CH[r, 4 * l + m] for r in range(4) for m in range(4)] == \
            packed[16 * l:16 * l + 16]
    assert [packed[j] for j in dw_vnni._UNPACK] == list(range(64))
    rng = np.random.default_rng(4)
    for k in (1, 3, 5, 7):
        w = rng.integers(-128, 128, (k, k, 128)).astype(np.int8)
        wq = dw_vnni.pair_weights(w).reshape(k, dw_vnni.pairs_per_row(k), 2, 4, 16, 2, 2)
        cols = dw_vnni.pair_columns(k)
        assert sorted({c for ab in cols for c in ab}) == list(range(k))
        for ky, i, blk, r, lane in np.ndindex(wq.shape[:5]):
            ch = 64 * blk + dw_vnni.LANE_CH[r, lane]
            ca, cb = cols[i]
            want_a = w[ky, ca, ch] if i < len(cols) - 1 else 0       # the last pair: tap a is 0
            got = wq[ky, i, blk, r, lane]
            assert (got[r % 2] == (want_a, w[ky, cb, ch])).all() and (got[1 - r % 2] == 0).all()


def test_vnni_needs_the_cpu(monkeypatch):
    w = np.ones((3, 3, 8), np.int8)
    args = (np.zeros(8, np.int32), 0, np.ones(8, np.float32), 0, 0, 255, 1, 1, 1, 4, 4, 4, 4)
    monkeypatch.setattr(cpu, "can_run", lambda isa: False)
    with pytest.raises(RuntimeError, match="AVX512-VNNI"):
        dw.make_depthwise(w, *args, impl="vnni")
    with pytest.raises(ValueError, match="impl"):
        dw.make_depthwise(w, *args, impl="sse2")
    monkeypatch.setattr(cpu, "has_avx512vnni", lambda: False)
    assert dw.make_depthwise(w, *args).impl == "pairs"
    monkeypatch.setattr(cpu, "has_avx512vnni", lambda: True)
    assert cpu.depthwise_kernel() == "vnni"


_ASM_SCRIPT = """
import re, sys, numba, numpy as np
from ternet.kernels import depthwise as dw
w = np.full((5, 5, 200), 3, np.int8)    # an emu512 plan: no check that the host can run the code
plan = dw.make_depthwise(w, np.zeros(200, np.int32), 0, np.ones(200, np.float32), 0, 0, 255, 1,
                         2, 2, 20, 20, 20, 20, impl="emu512")
x, out = np.zeros((1, 20, 20, plan.cp), np.uint8), np.zeros((1, 20, 20, plan.cp), np.uint8)
args = plan._args(x) + (out, plan.patch)
sig = tuple(numba.typeof(a) for a in args)
dw.dw_i8_u8_vnni.compile(sig)
asm = dw.dw_i8_u8_vnni.inspect_asm(sig)
for pat in sys.argv[1:]:
    print(len(re.findall(pat, asm)))
"""


def test_vnni_asm_cross_compiled_for_zen4():
    """Compile (not run) the VNNI depthwise driver for znver4: vpdpbusd (never the saturating
    vpdpbusds) on zmm, byte unpacks and saturating packs, no gathers, no FMA (the requant rounds
    the product and the add separately)."""
    import llvmlite.binding as llb
    feats = llb.get_host_cpu_features()
    for f in cpu.ISA_FEATURES["avx512vnni"] + ("avx512vl", "avx512dq"):
        feats[f] = True
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CPU_NAME="znver4", NUMBA_CPU_FEATURES=feats.flatten(),
               TERNET_NUMBA_CACHE="0", PYTHONPATH=root)
    pats = [r"\bvpdpbusds?\b", r"\bvpdpbusds\b", r"%zmm", r"\bvpunpck[lh]bw\b", r"\bvpackus(dw|wb)\b",
            r"\bvpgather", r"\bvfn?m(add|sub)"]
    res = subprocess.run([sys.executable, "-c", _ASM_SCRIPT, *pats], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    n_dp, n_dps, n_zmm, n_unpck, n_pack, n_gather, n_fma = map(int, res.stdout.split()[-len(pats):])
    assert n_dp >= 4 * 13 and n_dps == 0 and n_zmm > 0 and n_unpck > 0 and n_pack > 0
    assert n_gather == 0 and n_fma == 0


def test_rejects_bad_layers_and_buffers():
    w = np.ones((3, 3, 8), np.int8)
    b = np.zeros(8, np.int32)
    m = np.ones(8, np.float32)
    with pytest.raises(ValueError):
        dw.make_depthwise(np.ones((2, 2, 8), np.int8), b, 0, m, 0, 0, 255, 1, 0, 0, 4, 4, 3, 3)
    with pytest.raises(ValueError):
        dw.make_depthwise(w.astype(np.int16) * 200, b, 0, m, 0, 0, 255, 1, 1, 1, 4, 4, 4, 4)
    with pytest.raises(ValueError):
        dw.make_depthwise(w, b, 0, m, 0, 10, 5, 1, 1, 1, 4, 4, 4, 4)
    with pytest.raises(OverflowError):
        dw.make_depthwise(w, np.full(8, 2**31 - 100, np.int32), 0, m, 0, 0, 255, 1, 1, 1, 4, 4, 4, 4)
    plan = dw.make_depthwise(w, b, 0, m, 0, 0, 255, 1, 1, 1, 4, 4, 4, 4)
    x = np.zeros((1, 4, 4, 16), np.uint8)
    with pytest.raises(ValueError):
        plan(x, np.zeros((1, 4, 4, 8), np.uint8))
    with pytest.raises(TypeError):
        plan(x, np.zeros((1, 4, 4, 16), np.int8))
    with pytest.raises(ValueError):
        plan(np.zeros((1, 4, 8, 16), np.uint8)[:, :, ::2], np.zeros((1, 4, 4, 16), np.uint8))
