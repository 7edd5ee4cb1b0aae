"""Depthwise kernel (ternet/kernels/depthwise.py) == depthwise_ref, bit for bit, plus properties.

Full-range data (u8 0..255, int8 weights -128..127), odd sizes, stride 2 on odd sizes, both padding
modes, channel counts that are not multiples of 4 or 16, batches > 1; outputs are poisoned so
writes outside the real output rows are caught.
"""
import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ternet import quant
from ternet.kernels import depthwise as dw
from ternet.kernels.layout import ROW_SLACK, pad_to

POISON = 0xA5


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


def run(case, wmin=-128):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, k, stride)
    x, w, bias = make_data(rng, N, H, W, C, k, wmin)
    acc = dw.depthwise_acc_ref(x, zx, w, bias, stride, pt, pl, Ho, Wo)
    mult = pick_mult(rng, acc, C)
    plan = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo)
    _, x4 = activation(rng, x, plan.cp)
    return rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl)


@given(case=dw_layers())
def test_matches_reference(case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    want = dw.depthwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pt, pl, Ho, Wo)
    assert plan.cp == pad_to(C)
    for variant in (plan, plan.portable):
        buf, out = output(N, Ho, Wo, plan.cp)
        variant(x4, out)
        np.testing.assert_array_equal(out[..., :C], want)
        # padded channels: weight, bias and multiplier 0 -> floor(zp_out + 0.5) clamped
        assert (out[..., C:] == np.clip(np.floor(quant.zp_bias(zp_out)), lo, hi)).all()
        assert (buf[N * Ho * Wo:] == POISON).all(), "wrote past the output rows"


@given(case=dw_layers(), junk=st.integers(0, 255))
def test_bordered_copy_equals_gather(case, junk):
    """pad_input=True (copy into a zero-point border, every pixel interior) and False (border
    pixels gather their window) both equal the reference, with the plan's own scratch and with a
    larger shared scratch full of junk; pad_u8 equals numpy padding."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    want = dw.depthwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pt, pl, Ho, Wo)
    for pad_input in (True, False):
        p = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo,
                              pad_input=pad_input)
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


@given(case=dw_layers())
def test_accumulators_match_reference(case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    buf, a = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    np.testing.assert_array_equal(a[..., :C], acc)
    assert (a[..., C:] == 0).all()
    assert (buf[N * Ho * Wo:].view(np.uint8) == POISON).all()


@given(case=dw_layers())
def test_padding_equals_explicit_zero_point_border(case):
    """'same'/'symmetric' padding == the same kernel on an input padded with zx and no padding."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    Hp, Wp = max((Ho - 1) * stride + k, pt + H), max((Wo - 1) * stride + k, pl + W)
    xp = np.full((N, Hp, Wp, C), zx, np.uint8)
    xp[:, pt:pt + H, pl:pl + W] = x
    plan0 = dw.make_depthwise(w, bias, zx, mult, zp_out, lo, hi, stride, 0, 0, Hp, Wp, Ho, Wo)
    _, xp4 = activation(rng, xp, plan.cp)
    _, a = output(N, Ho, Wo, plan.cp)
    _, b = output(N, Ho, Wo, plan.cp)
    plan(x4, a)
    plan0(xp4, b)
    np.testing.assert_array_equal(a, b)


@given(case=dw_layers())
def test_negated_weights_negate_accumulator(case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case, wmin=-127)
    neg = dw.make_depthwise(-w, -bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    _, b = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    neg.accumulate(x4, b)
    np.testing.assert_array_equal(b, -a)


@given(case=dw_layers())
def test_zero_weights_give_bias(case):
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    zero = dw.make_depthwise(np.zeros_like(w), bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    zero.accumulate(x4, a)
    assert (a[..., :C] == bias).all()
    _, out = output(N, Ho, Wo, plan.cp)
    zero(x4, out)
    want = quant.requant_ref(np.broadcast_to(bias, (N, Ho, Wo, C)).astype(np.int32), mult, zp_out, lo, hi)
    np.testing.assert_array_equal(out[..., :C], want)


@given(case=dw_layers())
def test_unit_1x1_is_identity_on_centred_input(case):
    """k = 1, weight 1, bias 0: the accumulator is x - zx (every stride-th pixel)."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, 1, stride)
    plan = dw.make_depthwise(np.ones((1, 1, C), np.int8), np.zeros(C, np.int32), zx,
                             np.ones(C, np.float32), zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo)
    _, x4 = activation(rng, x, plan.cp)
    _, a = output(N, Ho, Wo, plan.cp, np.int32)
    plan.accumulate(x4, a)
    np.testing.assert_array_equal(a[..., :C], x[:, ::stride, ::stride].astype(np.int32) - zx)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@given(case=dw_layers())
def test_parallel_driver_is_deterministic(case):
    """The prange driver gives the serial result for any split of the rows (1, 2, 3 chunks)."""
    N, H, W, C, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng, plan, x, w, bias, mult, acc, x4, (Ho, Wo, pt, pl) = run(case)
    _, want = output(N, Ho, Wo, plan.cp)
    plan(x4, want)
    patch = np.zeros((3, plan.patch.shape[1]), np.uint8)
    for chunks in (1, 2, 3):
        _, out = output(N, Ho, Wo, plan.cp)
        dw.dw_i8_u8_par(*plan._args(x4), out, patch[:chunks])
        np.testing.assert_array_equal(out, want)


def test_mobilenet_shape_and_batch():
    """A real layer shape (MobileNetV2 block 2, stride 2, 'same') with batch 2 and 2 threads."""
    rng = np.random.default_rng(0)
    N, H, W, C, k, s = 2, 56, 56, 144, 3, 2
    pt, pl, Ho, Wo = quant.conv_geometry("same", H, W, k, s)
    x, w, bias = make_data(rng, N, H, W, C, k)
    acc = dw.depthwise_acc_ref(x, 7, w, bias, s, pt, pl, Ho, Wo)
    mult = pick_mult(rng, acc, C)
    plan = dw.make_depthwise(w, bias, 7, mult, 3, 3, 200, s, pt, pl, H, W, Ho, Wo)
    _, x4 = activation(rng, x, plan.cp)
    buf, out = output(N, Ho, Wo, plan.cp)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        plan(x4, out)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(out[..., :C], quant.requant_ref(acc, mult, 3, 3, 200))
    assert (buf[N * Ho * Wo:] == POISON).all()


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
