"""Residual add, global average pool and classifier kernels (ternet/kernels/elementwise.py) ==
their references, bit for bit (float32 logits compared exactly too)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ternet import quant
from ternet.kernels import cpu
from ternet.kernels import elementwise as ew
from ternet.kernels.layout import ROW_SLACK, pad_to

POISON = 0xA5
scales = st.floats(1e-3, 1.0, allow_nan=False, allow_infinity=False)


@given(P=st.integers(1, 300), C=st.one_of(st.integers(1, 40), st.just(96)), za=st.integers(0, 255),
       zb=st.integers(0, 255), zo=st.integers(0, 255), sa=scales, sb=scales, so=scales,
       lo=st.integers(0, 255), span=st.integers(0, 255), seed=st.integers(0, 2**32 - 1))
def test_add_matches_reference(P, C, za, zb, zo, sa, sb, so, lo, span, seed):
    rng = np.random.default_rng(seed)
    hi = min(255, lo + span)
    Cp = pad_to(C)
    a = rng.integers(0, 256, (P + ROW_SLACK, Cp), dtype=np.uint8)
    b = rng.integers(0, 256, (P + ROW_SLACK, Cp), dtype=np.uint8)
    a[0, 0], b[0, 0] = 0, 255
    ma, mb = quant.add_multipliers(sa, sb, so)
    plan = ew.make_add(za, ma, zb, mb, zo, lo, hi)
    out = np.full((P + ROW_SLACK + 2, Cp), POISON, np.uint8)
    plan(a, b, P, out)
    np.testing.assert_array_equal(out[:P], quant.add_ref(a[:P], za, ma, b[:P], zb, mb, zo, lo, hi))
    assert (out[P:] == POISON).all()


def test_add_in_place():
    """out may be one of the operands (elementwise, same index)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 16), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 16), dtype=np.uint8)
    want = quant.add_ref(a[:12], 3, np.float32(0.7), b[:12], 250, np.float32(1.3), 9, 0, 255)
    ew.make_add(3, 0.7, 250, 1.3, 9, 0, 255)(a, b, 12, a)
    np.testing.assert_array_equal(a[:12], want)


@given(N=st.integers(1, 4), hw=st.one_of(st.integers(1, 60), st.just(49)),
       C=st.one_of(st.integers(1, 40), st.just(1280)), zx=st.integers(0, 255), zo=st.integers(0, 255),
       s_in=scales, s_out=scales, seed=st.integers(0, 2**32 - 1))
def test_gap_matches_reference(N, hw, C, zx, zo, s_in, s_out, seed):
    rng = np.random.default_rng(seed)
    Cp = pad_to(C)
    x = rng.integers(0, 256, (N * hw + ROW_SLACK, Cp), dtype=np.uint8)
    x[0, 0] = 255
    mult = ew.pool_multiplier(s_in, s_out, hw)
    assert mult == np.float32(np.float64(s_in) / (np.float64(s_out) * hw))
    plan = ew.make_gap(C, hw, zx, mult, zo)
    out = np.full((N + ROW_SLACK, Cp), POISON, np.uint8)
    x3 = x[:N * hw].reshape(N, hw, Cp)
    plan(x3, out)
    np.testing.assert_array_equal(out[:N, :C], ew.gap_ref(x3[..., :C], zx, mult, zo))
    np.testing.assert_array_equal(out[:N], ew.gap_ref(x3, zx, mult, zo))
    assert (out[N:] == POISON).all()


@given(N=st.integers(1, 5), cin=st.one_of(st.integers(1, 80), st.sampled_from([1280, 1283])),
       cout=st.one_of(st.integers(1, 50), st.just(1000)), zx=st.integers(0, 255), s_in=scales,
       seed=st.integers(0, 2**32 - 1))
def test_linear_matches_reference(N, cin, cout, zx, s_in, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, cin), dtype=np.uint8)
    w = rng.integers(-128, 128, (cout, cin)).astype(np.int8)
    w.flat[0] = -128
    bias = rng.integers(-50000, 50000, cout).astype(np.int32)
    s_w = rng.uniform(1e-4, 1e-1, cout).astype(np.float32)
    scale = ew.linear_scale(s_in, s_w)
    np.testing.assert_array_equal(scale, (np.float64(s_in) * s_w.astype(np.float64)).astype(np.float32))
    plan = ew.make_linear(w, bias, zx, s_in, s_w)
    xb = rng.integers(0, 256, (N + ROW_SLACK, plan.cin_p), dtype=np.uint8)   # garbage in padding
    xb[:N, :cin] = x
    out = np.full((N + 3, cout), np.nan, np.float32)
    plan(xb, N, out)
    want = ew.linear_ref(x, zx, w, bias, scale)
    assert want.dtype == np.float32
    np.testing.assert_array_equal(out[:N], want)
    assert np.isnan(out[N:]).all()


def test_linear_zero_weights_give_scaled_bias():
    bias = np.array([5, -7, 2**20], np.int32)
    scale = ew.linear_scale(0.02, np.array([0.5, 0.25, 1e-3], np.float32))
    plan = ew.make_linear(np.zeros((3, 10), np.int8), bias, 77, 0.02, np.array([0.5, 0.25, 1e-3], np.float32))
    out = np.zeros((1, 3), np.float32)
    plan(np.full((1, 16), 200, np.uint8), 1, out)
    np.testing.assert_array_equal(out[0], bias.astype(np.float32) * scale)


def test_rejects_bad_buffers():
    add = ew.make_add(0, 1.0, 0, 1.0, 0, 0, 255)
    with pytest.raises(ValueError):
        add(np.zeros((4, 16), np.uint8), np.zeros((4, 32), np.uint8), 2, np.zeros((4, 16), np.uint8))
    with pytest.raises(ValueError):
        ew.make_add(0, 1.0, 0, 1.0, 0, 9, 3)
    gap = ew.make_gap(20, 4, 0, 0.25, 0)
    with pytest.raises(ValueError):
        gap(np.zeros((1, 5, 32), np.uint8), np.zeros((1, 32), np.uint8))
    lin = ew.make_linear(np.zeros((3, 10), np.int8), np.zeros(3, np.int32), 0, 1.0, np.ones(3, np.float32))
    with pytest.raises(TypeError):
        lin(np.zeros((1, 16), np.uint8), 1, np.zeros((1, 3), np.float64))
    with pytest.raises(OverflowError):
        ew.make_linear(np.full((1, 10), 127, np.int8), np.array([2**31 - 10], np.int32), 0, 1.0,
                       np.ones(1, np.float32))


GEMMS = [pytest.param("vnni", marks=pytest.mark.skipif(not cpu.has_avx512vnni(), reason="no AVX512-VNNI")),
         pytest.param("avx2", marks=pytest.mark.skipif(not cpu.has_avx2(), reason="no AVX2"))]


@pytest.mark.parametrize("impl", GEMMS)
@given(N=st.integers(1, 9), cin=st.one_of(st.integers(1, 80), st.sampled_from([1280, 1283])),
       cout=st.one_of(st.integers(1, 50), st.just(1000)), zx=st.integers(0, 255), s_in=scales,
       seed=st.integers(0, 2**32 - 1))
def test_linear_gemm_matches_reference(impl, N, cin, cout, zx, s_in, seed):
    """The classifier with its sums from the VNNI / AVX2 GEMM kernel == linear_ref, bit for bit,
    and == the plain loop (which runs when the input has no slack rows)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, cin), dtype=np.uint8)
    w = rng.integers(-128, 128, (cout, cin)).astype(np.int8)
    bias = rng.integers(-50000, 50000, cout).astype(np.int32)
    s_w = rng.uniform(1e-4, 1e-1, cout).astype(np.float32)
    plan = ew.make_linear(w, bias, zx, s_in, s_w, impl=impl)
    assert plan.impl == impl
    xb = rng.integers(0, 256, (N + ROW_SLACK, plan.cin_p), dtype=np.uint8)
    xb[:N, :cin] = x
    want = ew.linear_ref(x, zx, w, bias, ew.linear_scale(s_in, s_w))
    for xin in (xb, np.ascontiguousarray(xb[:N])):          # GEMM path, then the plain loop
        out = np.full((N + 3, cout), np.nan, np.float32)
        plan(xin, N, out)
        np.testing.assert_array_equal(out[:N], want)
        assert np.isnan(out[N:]).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_parallel_equals_serial(threads):
    """The classifier's parallel driver (big enough layers, >1 thread) gives the same logits."""
    import numba
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (1000, 1280)).astype(np.int8)
    bias = rng.integers(-50000, 50000, 1000).astype(np.int32)
    s_w = rng.uniform(1e-4, 1e-1, 1000).astype(np.float32)
    plan = ew.make_linear(w, bias, 11, 0.03, s_w)
    assert 2 * 1000 * plan.cin_p >= ew.PAR_MIN_MACS
    x = rng.integers(0, 256, (2 + ROW_SLACK, plan.cin_p), dtype=np.uint8)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.zeros((2, 1000), np.float32)
        plan(x, 2, out)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out, ew.linear_ref(x[:2], 11, w, bias, ew.linear_scale(0.03, s_w)))
