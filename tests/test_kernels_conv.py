"""k x k conv (ternet/kernels/conv.py): im2col_u8 against a numpy im2col, and the im2col + pointwise
plan against conv_ref, bit for bit, for every pointwise kernel family this CPU runs."""
import numba
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from ternet import quant
from ternet.kernels import conv, cpu
from ternet.kernels.layout import ROW_SLACK, pad_to

POISON = 0xA5
IMPLS = ["ref", "plain", "addonly",
         pytest.param("vnni", marks=pytest.mark.skipif(not cpu.has_avx512vnni(), reason="no AVX512-VNNI"))]


@st.composite
def conv_layers(draw):
    """(N, H, W, Cin, Cout, k, stride, mode, zx, zp_out, lo, hi, seed)"""
    N = draw(st.integers(1, 3))
    H = draw(st.integers(1, 14))
    W = draw(st.integers(1, 14))
    cin = draw(st.sampled_from([3, 3, 1, 2, 5, 8]))
    cout = draw(st.one_of(st.integers(1, 40), st.just(32)))
    k = draw(st.sampled_from([3, 3, 5, 1, 7]))
    stride = draw(st.sampled_from([2, 1]))
    mode = draw(st.sampled_from(["same", "symmetric"]))
    zx = draw(st.integers(0, 255))
    zp_out = draw(st.integers(0, 255))
    lo = draw(st.integers(0, 255))
    hi = draw(st.integers(lo, 255))
    return N, H, W, cin, cout, k, stride, mode, zx, zp_out, lo, hi, draw(st.integers(0, 2**32 - 1))


def im2col_ref(x, zx, k, stride, pt, pl, Ho, Wo, Kp):
    """Rows (n, oy, ox), columns (ky, kx, ci), zx outside the image, zeros past k*k*Cin."""
    N, H, W, Cin = x.shape
    xp = np.full((N, H + 2 * k + stride * Ho, W + 2 * k + stride * Wo, Cin), zx, np.uint8)
    xp[:, pt:pt + H, pl:pl + W] = x
    cols = np.zeros((N, Ho, Wo, Kp), np.uint8)
    for ky in range(k):
        for kx in range(k):
            c0 = (ky * k + kx) * Cin
            ys = slice(ky, ky + stride * (Ho - 1) + 1, stride)
            xs = slice(kx, kx + stride * (Wo - 1) + 1, stride)
            cols[..., c0:c0 + Cin] = xp[:, ys, xs]
    return cols.reshape(N * Ho * Wo, Kp)


def make_data(rng, N, H, W, cin, cout, k):
    x = rng.integers(0, 256, (N, H, W, cin), dtype=np.uint8)
    x.flat[rng.integers(0, x.size, 2)] = (0, 255)
    w = rng.integers(-128, 128, (cout, k, k, cin)).astype(np.int8)
    w.flat[rng.integers(0, w.size, 2)] = (-128, 127)
    bias = rng.integers(-50000, 50000, cout).astype(np.int32)
    return x, w, bias


def im2col_case(case):
    """(x, zx, k, stride, pt, pl, Ho, Wo, Kp, P) of a conv_layers() case."""
    N, H, W, cin, cout, k, stride, mode, zx, zp_out, lo, hi, seed = case
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, k, stride)
    x = np.random.default_rng(seed).integers(0, 256, (N, H, W, cin), dtype=np.uint8)
    return x, zx, k, stride, pt, pl, Ho, Wo, pad_to(k * k * cin), N * Ho * Wo


@given(case=conv_layers())
def test_im2col_matches_numpy(case):
    x, zx, k, stride, pt, pl, Ho, Wo, Kp, P = im2col_case(case)
    cols = np.full((P + ROW_SLACK, Kp), POISON, np.uint8)
    conv.im2col_u8(x, zx, k, stride, pt, pl, Ho, Wo, cols)
    np.testing.assert_array_equal(cols[:P], im2col_ref(x, zx, k, stride, pt, pl, Ho, Wo, Kp))
    assert (cols[P + 1:] == POISON).all(), "im2col wrote past row P"   # row P: up to 15 stray bytes
    exact = np.full((P, Kp), POISON, np.uint8)                          # no slack row: exact writes
    conv.im2col_u8(x, zx, k, stride, pt, pl, Ho, Wo, exact)
    np.testing.assert_array_equal(exact, cols[:P])


@numba.njit
def _im2col_blocks_reversed(x, zx, k, stride, pt, pl, Ho, Wo, cols, nchunks):
    """im2col_u8_par's blocks run serially, LAST block first: a block whose last pixel spilled
    stray bytes into the next block's rows would now overwrite that block's finished output."""
    G = x.shape[0] * Ho
    for c in range(nchunks - 1, -1, -1):
        g0, g1 = c * G // nchunks, (c + 1) * G // nchunks
        limit = g1 * Wo if c < nchunks - 1 else cols.shape[0]
        conv._im2col_rows(x, zx, k, stride, pt, pl, Ho, Wo, cols, g0, g1, limit)


@given(case=conv_layers(), nchunks=st.integers(1, 6))
@example(case=(1, 4, 4, 3, 5, 1, 1, "same", 7, 0, 0, 255, 0), nchunks=2)   # 1x1: every row spills
def test_im2col_par_blocks_equal_serial(case, nchunks):
    x, zx, k, stride, pt, pl, Ho, Wo, Kp, P = im2col_case(case)
    nchunks = min(nchunks, x.shape[0] * Ho)
    want = im2col_ref(x, zx, k, stride, pt, pl, Ho, Wo, Kp)
    for run in (lambda c: conv.im2col_u8_par(x, zx, k, stride, pt, pl, Ho, Wo, c, nchunks),
                lambda c: _im2col_blocks_reversed(x, zx, k, stride, pt, pl, Ho, Wo, c, nchunks)):
        cols = np.full((P + ROW_SLACK, Kp), POISON, np.uint8)
        run(cols)
        np.testing.assert_array_equal(cols[:P], want)
        assert (cols[P + 1:] == POISON).all(), "im2col wrote past row P"


@pytest.mark.parametrize("impl", IMPLS)
@given(case=conv_layers(), rule=st.sampled_from(quant.RULES))
def test_conv_matches_reference(impl, case, rule):
    N, H, W, cin, cout, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, k, stride)
    x, w, bias = make_data(rng, N, H, W, cin, cout, k)
    acc = conv.conv_acc_ref(x, zx, w, bias, stride, pt, pl, Ho, Wo)
    span = max(1, int(acc.max()) - int(acc.min()))
    mult = (rng.uniform(0.3, 3.0, cout) * 255 / span).astype(np.float32)
    if rng.random() < 0.25:          # a power of two: odd accumulators are exact ties
        mult = np.full(cout, 2.0 ** np.floor(np.log2(255 / span)), np.float32)
    want = quant.requant_ref(acc, mult, zp_out, lo, hi, rule)
    np.testing.assert_array_equal(
        want, conv.conv_ref(x, zx, w, bias, mult, zp_out, lo, hi, stride, pt, pl, Ho, Wo, rule))
    plan = conv.make_conv(w, bias, zx, mult, zp_out, lo, hi, stride, pt, pl, H, W, Ho, Wo, impl=impl,
                          rule=rule)
    P = N * Ho * Wo
    out = np.full((P + ROW_SLACK + 3, pad_to(cout)), POISON, np.uint8)
    plan(x, out)
    np.testing.assert_array_equal(out[:P, :cout].reshape(N, Ho, Wo, cout), want)
    assert (out[:P, cout:] == quant.requant_ref(np.zeros(1, np.int32), 0, zp_out, lo, hi, rule)).all()
    assert (out[P + ROW_SLACK:] == POISON).all()


@given(case=conv_layers())
def test_padding_equals_explicit_zero_point_border(case):
    """'same'/'symmetric' padding == the same conv on an input padded with zx and no padding."""
    N, H, W, cin, cout, k, stride, mode, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    pt, pl, Ho, Wo = quant.conv_geometry(mode, H, W, k, stride)
    x, w, bias = make_data(rng, N, H, W, cin, cout, k)
    Hp, Wp = max((Ho - 1) * stride + k, pt + H), max((Wo - 1) * stride + k, pl + W)
    xp = np.full((N, Hp, Wp, cin), zx, np.uint8)
    xp[:, pt:pt + H, pl:pl + W] = x
    a = conv.conv_acc_ref(x, zx, w, bias, stride, pt, pl, Ho, Wo)
    np.testing.assert_array_equal(a, conv.conv_acc_ref(xp, zx, w, bias, stride, 0, 0, Ho, Wo))
    mult = np.full(cout, 1e-3, np.float32)
    outs = []
    for xi, p0, p1, h, wd in ((x, pt, pl, H, W), (xp, 0, 0, Hp, Wp)):
        plan = conv.make_conv(w, bias, zx, mult, zp_out, lo, hi, stride, p0, p1, h, wd, Ho, Wo, impl="plain")
        out = np.zeros((N * Ho * Wo + ROW_SLACK, pad_to(cout)), np.uint8)
        plan(xi, out)
        outs.append(out[:N * Ho * Wo])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_stem_shape_and_scratch_growth():
    """The stem (224x224x3 -> 112x112x32, 3x3 s2 SAME); the im2col scratch grows with the batch
    and is reused for smaller ones."""
    rng = np.random.default_rng(1)
    H = W = 224
    pt, pl, Ho, Wo = quant.conv_geometry("same", H, W, 3, 2)
    x, w, bias = make_data(rng, 3, H, W, 3, 32, 3)
    mult = np.full(32, 2e-4, np.float32)
    plan = conv.make_conv(w, bias, 128, mult, 5, 5, 255, 2, pt, pl, H, W, Ho, Wo, impl="plain")
    seen = []
    for n in (1, 3, 2):
        P = n * Ho * Wo
        out = np.full((P + ROW_SLACK, 32), POISON, np.uint8)
        plan(x[:n], out)
        np.testing.assert_array_equal(out[:P].reshape(n, Ho, Wo, 32),
                                      conv.conv_ref(x[:n], 128, w, bias, mult, 5, 5, 255, 2, pt, pl, Ho, Wo))
        seen.append(plan.cols(n))
    assert seen[0].shape[0] == Ho * Wo + ROW_SLACK
    assert seen[1].shape[0] == 3 * Ho * Wo + ROW_SLACK and seen[2] is seen[1]


def test_rejects_bad_input():
    w = np.ones((4, 3, 3, 3), np.int8)
    plan = conv.make_conv(w, np.zeros(4, np.int32), 0, np.ones(4, np.float32), 0, 0, 255, 2, 0, 0,
                          8, 8, 4, 4, impl="ref")
    out = np.zeros((16 + ROW_SLACK, 16), np.uint8)
    with pytest.raises(ValueError):
        plan(np.zeros((1, 8, 8, 4), np.uint8), out)
    with pytest.raises(ValueError):
        plan(np.zeros((1, 8, 16, 3), np.uint8)[:, :, ::2], out)
    with pytest.raises(ValueError):
        conv.make_conv(w[:, :2], np.zeros(4, np.int32), 0, np.ones(4, np.float32), 0, 0, 255, 2, 0, 0,
                       8, 8, 4, 4, impl="ref")
