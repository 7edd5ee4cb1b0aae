"""Plain-Numba pointwise kernels (ternet/kernels/pointwise.py) == the pointwise reference, bit for bit.

pw_t2_u8_addonly (ternary index lists; hybrid layers' non-ternary rows dense) and pw_i8_u8_plain
(dense int8) run everywhere, so every test runs on every CPU.
"""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ternet import quant
from ternet.kernels import pointwise as pw
from ternet.kernels.layout import ROW_SLACK
from pw_cases import POISON, buffers, check_untouched, guarded, make_case, pick_mult

IMPLS = ["addonly", "plain"]
MAKE = {"addonly": pw.make_pw_addonly, "plain": pw.make_pw_plain}


def run(plan, xb, P, out):
    """plan(x, P, out) on the first P + ROW_SLACK rows of out (the rest are sentinels)."""
    plan(xb, P, out[:P + ROW_SLACK])


@st.composite
def layers(draw):
    """(P, Cin, Cout, zx, zp_out, lo, hi, seed): odd P down to 1 and across the 64/128-pixel tile
    edges, fan-in up to 1283 (several int16 chunks), any Cout."""
    P = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 7, 49, 63, 65, 127, 129, 193, 257])))
    cin = draw(st.one_of(st.integers(1, 100), st.sampled_from([1280, 1283])))
    cout = draw(st.integers(1, 80))
    zx = draw(st.integers(0, 255))
    zp_out = draw(st.integers(0, 255))
    lo = draw(st.integers(0, 255))
    hi = draw(st.integers(lo, 255))
    return P, cin, cout, zx, zp_out, lo, hi, draw(st.integers(0, 2**32 - 1))


def run_case(impl, kind, P, cin, cout, zx, zp_out, lo, hi, seed, rule="ternet"):
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, kind, zx)
    mult = pick_mult(rng, pw.pointwise_acc_ref(x, zx, w, bias), cout)
    want = pw.pointwise_ref(x, zx, w, bias, mult, zp_out, lo, hi, rule)
    plan = pw.make_pointwise(w, bias, zx, mult, zp_out, lo, hi, impl, rule)
    assert (plan.cin, plan.cout, plan.impl) == (cin, cout, impl)
    assert (plan.cin_p, plan.cout_p) == (-(-cin // 16) * 16, -(-cout // 16) * 16)
    xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    run(plan, xb, P, out)
    np.testing.assert_array_equal(out[:P, :cout], want)
    pad_value = quant.requant_ref(np.zeros(1, np.int32), 0, zp_out, lo, hi, rule)  # mult = bias = 0
    assert (out[:P, cout:] == pad_value).all()
    check_untouched(out, P)
    return plan, x, w, bias, xb


# ------------------------------------------------------------------ references

@given(P=st.integers(1, 20), cin=st.integers(1, 20), cout=st.integers(1, 20), zx=st.integers(0, 255),
       seed=st.integers(0, 2**32 - 1))
def test_reference_is_the_definition(P, cin, cout, zx, seed):
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, "int8", zx)
    acc = pw.pointwise_acc_ref(x, zx, w, bias)
    assert acc.dtype == np.int32 and acc.shape == (P, cout)
    for p in range(P):
        for o in range(cout):
            assert acc[p, o] == int(bias[o]) + sum(int(w[o, c]) * (int(x[p, c]) - zx) for c in range(cin))
    mult = np.full(cout, 0.01, np.float32)
    np.testing.assert_array_equal(pw.pointwise_ref(x, zx, w, bias, mult, 9, 3, 250),
                                  quant.requant_ref(acc, mult, 9, 3, 250))


def test_reference_rejects_int32_overflow():
    x = np.full((1, 70000), 255, np.uint8)
    with pytest.raises(AssertionError):
        pw.pointwise_acc_ref(x, 0, np.full((1, 70000), 127, np.int8), np.array([2**31 - 1000], np.int32))


# ------------------------------------------------------------------ kernels == reference

@given(case=layers(), rule=st.sampled_from(quant.RULES))
def test_addonly_ternary_matches_reference(case, rule):
    run_case("addonly", "ternary", *case, rule=rule)


@given(case=layers(), rule=st.sampled_from(quant.RULES))
def test_addonly_hybrid_matches_reference(case, rule):
    run_case("addonly", "hybrid", *case, rule=rule)


@pytest.mark.parametrize("kind", ["int8", "ternary"])
@given(case=layers(), rule=st.sampled_from(quant.RULES))
def test_plain_matches_reference(kind, case, rule):
    run_case("plain", kind, *case, rule=rule)


@pytest.mark.parametrize("impl", IMPLS)
@given(case=layers(), kind=st.sampled_from(["ternary", "hybrid", "int8"]))
def test_int32_accumulators_exact(impl, case, kind):
    if impl == "addonly" and kind == "int8":
        kind = "hybrid"
    P, cin, cout, zx, _, _, _, seed = case
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, kind, zx)
    plan = MAKE[impl](w, bias, zx, np.ones(cout, np.float32), 0, 0, 255)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, P, acc[:P + ROW_SLACK])
    np.testing.assert_array_equal(acc[:P, :cout], pw.pointwise_acc_ref(x, zx, w, bias))
    assert (acc[:P, cout:] == 0).all()
    check_untouched(acc, P)


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_layers(impl):
    """Fan-in 1280+ (ternary rows split into int16 chunks of <= 128 rows), Cout 1000+, and the
    shapes of MobileNetV2's last layers."""
    for P, cin, cout in [(7, 1280, 1001), (3, 1311, 40), (49, 320, 1280), (49, 960, 160)]:
        run_case(impl, "ternary", P, cin, cout, 117, 128, 0, 255, cin + cout)
        run_case(impl, "hybrid" if impl == "addonly" else "int8", P, cin, cout, 0, 3, 3, 200, cout)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("xval", [0, 255])
def test_addonly_int16_chunks_at_the_limit(sign, xval):
    """Rows of 127..300 equal weights on constant x: partial sums reach exactly 128 * 255 = 32640
    (x = 255 for +1 rows, x = 0 for -1 rows, whose ~x rows are 255)."""
    P, cin = 9, 300
    w = np.zeros((6, cin), np.int8)
    for o, n in enumerate([127, 128, 129, 256, 257, 300]):
        w[o, :n] = sign
    x = np.full((P, cin), xval, np.uint8)
    bias = np.arange(6, dtype=np.int32) * 1000 - 2000
    plan = pw.make_pw_addonly(w, bias, 5, np.ones(6, np.float32), 0, 0, 255)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, np.random.default_rng(0), out_dtype=np.int32)
    plan.accumulate(xb, P, acc[:P + ROW_SLACK])
    np.testing.assert_array_equal(acc[:P, :6], pw.pointwise_acc_ref(x, 5, w, bias))


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("impl", IMPLS)
@given(case=layers())
def test_negated_weights_negate_accumulator(impl, case):
    P, cin, cout, _, _, _, _, seed = case
    rng = np.random.default_rng(seed)
    x, w, _ = make_case(rng, P, cin, cout, "ternary" if impl == "addonly" else "int8", 0)
    w = np.maximum(w, -127)          # symmetric int8, so -w fits
    zero, one = np.zeros(cout, np.int32), np.ones(cout, np.float32)
    np.testing.assert_array_equal(pw.pointwise_acc_ref(x, 0, -w, zero), -pw.pointwise_acc_ref(x, 0, w, zero))
    accs = []
    for ww in (w, -w):
        plan = MAKE[impl](ww, zero, 0, one, 0, 0, 255)
        xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
        plan.accumulate(xb, P, acc)
        accs.append(acc[:P])
    np.testing.assert_array_equal(accs[1], -accs[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_weights_give_bias(impl):
    rng = np.random.default_rng(1)
    P, cin, cout = 13, 40, 24
    x = rng.integers(0, 256, (P, cin), dtype=np.uint8)
    bias = rng.integers(-300, 300, cout, dtype=np.int32)
    mult = np.full(cout, 0.37, np.float32)
    plan = MAKE[impl](np.zeros((cout, cin), np.int8), bias, 77, mult, 100, 0, 255)
    xb, acc = buffers(x, P, plan.cin_p, plan.cout_p, rng, out_dtype=np.int32)
    plan.accumulate(xb, P, acc)
    assert (acc[:P, :cout] == bias).all()
    xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    run(plan, xb, P, out)
    assert (out[:P, :cout] == quant.requant_ref(np.broadcast_to(bias, (P, cout)), mult, 100, 0, 255)).all()


@pytest.mark.parametrize("impl", IMPLS)
@given(case=layers())
def test_padding_columns_and_slack_rows_are_ignored(impl, case):
    """Different garbage in x's pad columns (>= cin) and slack rows (>= P): same output rows."""
    P, cin, cout, zx, zp_out, lo, hi, seed = case
    rng = np.random.default_rng(seed)
    x, w, bias = make_case(rng, P, cin, cout, "ternary" if impl == "addonly" else "int8", zx)
    mult = pick_mult(rng, pw.pointwise_acc_ref(x, zx, w, bias), cout)
    plan = MAKE[impl](w, bias, zx, mult, zp_out, lo, hi)
    outs = []
    for fill in (0, 255, None):
        xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
        if fill is not None:
            xb[P:] = fill
            xb[:, cin:] = fill
        run(plan, xb, P, out)
        outs.append(out[:P])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_requant_rounds_product_before_adding(impl):
    """Accumulators whose float32 product lands a hair past -(zp - 0.5): rounding the product
    first (the rule) gives floor(1.0) = 1, a fused multiply-add gives floor(0.99999..) = 0."""
    rng = np.random.default_rng(7)
    cout, zp = 512, 120
    acc = -rng.integers(1000, 2**22, cout).astype(np.int32)          # bias-only layer: acc = bias
    mult = ((zp - 0.5) / -acc.astype(np.float64)).astype(np.float32)
    fused = np.floor((acc.astype(np.float64) * mult + (zp + 0.5)).astype(np.float32))
    want = quant.requant_ref(acc[None, :], mult, zp, 0, 255)[0]
    assert (fused != want).sum() > 20            # the test can tell the two apart
    # one real weight per row (x = 0 there) so the rows take the list paths, not the bias shortcut
    w = np.zeros((cout, 4), np.int8)
    w[:, 1] = 1 if impl == "addonly" else 100
    plan = MAKE[impl](w, acc, 0, mult, zp, 0, 255)
    xb, out = buffers(np.zeros((3, 4), np.uint8), 3, plan.cin_p, plan.cout_p, rng)
    run(plan, xb, 3, out)
    assert (out[:3, :cout] == want).all()


# ------------------------------------------------------------------ threads and work chunks

@given(P=st.integers(1, 5000), threads=st.integers(1, 9))
def test_split_work_partitions_pixels(P, threads):
    work = pw.split_work(P, threads)
    assert work.dtype == np.int64 and work.ndim == 2 and work.shape[1] == 2
    assert 1 <= len(work) <= threads
    assert work[0, 0] == 0 and work[-1, 1] == P
    assert (work[1:, 0] == work[:-1, 1]).all() and (work[:, 0] < work[:, 1]).all()
    assert (work[:, 0] % pw.TILE == 0).all()      # only the last range has a tail tile


@pytest.mark.parametrize("impl", IMPLS)
def test_results_independent_of_thread_count(impl):
    rng = np.random.default_rng(5)
    P, cin, cout = 997, 96, 200
    assert P * 96 * 208 >= pw.PAR_MIN_MACS          # big enough to be split
    x, w, bias = make_case(rng, P, cin, cout, "hybrid" if impl == "addonly" else "int8", 9)
    mult = pick_mult(rng, pw.pointwise_acc_ref(x, 9, w, bias), cout)
    plan = MAKE[impl](w, bias, 9, mult, 30, 0, 255)
    xb, _ = buffers(x, P, plan.cin_p, plan.cout_p, rng)
    want = pw.pointwise_ref(x, 9, w, bias, mult, 30, 0, 255)
    scratch = plan.scratch(7)
    assert all(s.shape[0] >= 7 for s in scratch)
    for n in (1, 2, 3, 4, 7):
        work = pw.split_work(P, n)
        assert len(work) == n
        out = np.full((P + ROW_SLACK, plan.cout_p), POISON, np.uint8)
        if impl == "addonly":
            pw.pw_t2_u8_addonly_par(xb, P, plan.tptr, plan.tchunks, plan.trows, plan.dptr, plan.drows,
                                    plan.dw, plan.bias, plan.mult, plan.zph, plan.zpc, plan.lo, plan.hi,
                                    plan.compl, out, *scratch, work)
        else:
            pw.pw_i8_u8_plain_par(xb, P, plan.dptr, plan.drows, plan.dw, plan.bias, plan.mult,
                                  plan.zph, plan.zpc, plan.lo, plan.hi, out, *scratch, work)
        np.testing.assert_array_equal(out[:P, :cout], want)
    old = numba.get_num_threads()
    try:
        for t in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(t)
            out = np.full((P + ROW_SLACK, plan.cout_p), POISON, np.uint8)
            plan(xb, P, out)
            np.testing.assert_array_equal(out[:P, :cout], want)
    finally:
        numba.set_num_threads(old)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_scratch_grows_with_the_thread_count():
    rng = np.random.default_rng(6)
    P, cin, cout = 600, 64, 120
    x, w, bias = make_case(rng, P, cin, cout, "ternary", 1)
    mult = pick_mult(rng, pw.pointwise_acc_ref(x, 1, w, bias), cout)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        plan = pw.make_pw_addonly(w, bias, 1, mult, 2, 0, 255)
        assert plan.scratch()[0].shape[0] == 1
        numba.set_num_threads(2)
        xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
        run(plan, xb, P, out)
    finally:
        numba.set_num_threads(old)
    assert plan.scratch()[0].shape[0] == 2
    np.testing.assert_array_equal(out[:P, :cout], pw.pointwise_ref(x, 1, w, bias, mult, 2, 0, 255))
    check_untouched(out, P)


# ------------------------------------------------------------------ memory bounds

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect")
@pytest.mark.parametrize("impl", IMPLS)
def test_no_access_past_the_buffers(impl):
    """x and out end right before a PROT_NONE page: any read/write past row P + ROW_SLACK faults."""
    rng = np.random.default_rng(3)
    for P, cin, cout in [(1, 20, 40), (5, 64, 16), (49, 33, 50), (129, 16, 8)]:
        x, w, bias = make_case(rng, P, cin, cout, "hybrid" if impl == "addonly" else "int8", 4)
        mult = pick_mult(rng, pw.pointwise_acc_ref(x, 4, w, bias), cout)
        plan = MAKE[impl](w, bias, 4, mult, 10, 0, 255)
        with guarded((P + ROW_SLACK, plan.cin_p), (P + ROW_SLACK, plan.cout_p)) as (xb, out):
            xb[...] = rng.integers(0, 256, xb.shape, dtype=np.uint8)
            xb[:P, :cin] = x
            plan(xb, P, out)
            np.testing.assert_array_equal(out[:P, :cout], pw.pointwise_ref(x, 4, w, bias, mult, 10, 0, 255))


# ------------------------------------------------------------------ validation and dispatch

def test_rejects_bad_arguments():
    args = (np.zeros(1, np.int32), 0, np.ones(1, np.float32), 0, 0, 255)
    with pytest.raises(ValueError, match="addonly"):
        pw.make_pointwise(np.zeros((1, 4), np.int8), *args, impl="fast")
    with pytest.raises(OverflowError):      # |bias| + 255 * sum|w| > 2**31 - 1
        pw.make_pw_plain(np.ones((1, 100), np.int8), np.array([2**31 - 100], np.int32), 0,
                         np.ones(1, np.float32), 0, 0, 255)
    with pytest.raises(ValueError):
        pw.make_pw_addonly(np.full((1, 4), 200, np.int16), *args)       # not int8
    with pytest.raises(ValueError):
        pw.make_pw_plain(np.zeros((1, 4), np.int8), np.zeros(1, np.int32), 0, np.ones(1, np.float32),
                         0, 10, 5)                                        # lo > hi
    plan = pw.make_pw_addonly(np.ones((3, 5), np.int8), np.zeros(3, np.int32), 0,
                              np.ones(3, np.float32), 0, 0, 255)
    x, out = np.zeros((10, 16), np.uint8), np.zeros((10, 16), np.uint8)
    with pytest.raises(ValueError):
        plan(x, 3, out)                                  # 3 + ROW_SLACK > 10 rows
    with pytest.raises(ValueError):
        plan(np.zeros((10, 32), np.uint8), 2, out)       # wrong channel padding
    with pytest.raises(TypeError):
        plan(x.astype(np.int8), 2, out)
    plan(x, 0, out)                                      # nothing to do


def test_make_pointwise_dispatch(monkeypatch):
    w = np.array([[1, 0, -1, 1], [0, 0, 1, -1]], np.int8)
    args = (np.zeros(2, np.int32), 3, np.ones(2, np.float32), 0, 0, 255)
    assert pw.make_pointwise(w, *args, impl="addonly").impl == "addonly"
    assert pw.make_pointwise(w, *args, impl="plain").impl == "plain"
    calls = []
    import ternet.kernels.vnni as vnni
    monkeypatch.setattr(vnni, "make_pw_vnni", lambda *a, isa, rule: calls.append((isa, rule)) or isa)
    assert pw.make_pointwise(w, *args, impl="vnni") == "avx512vnni"
    assert pw.make_pointwise(w, *args, impl="avx2", rule="onnxruntime") == "avx2"
    assert calls == [("avx512vnni", "ternet"), ("avx2", "onnxruntime")]


def test_plan_layout():
    w = np.array([[1, 0, -1], [0, 0, 0], [5, -1, 0]], np.int8)      # ternary, empty, int8 rows
    plan = pw.make_pw_addonly(w, np.array([10, 20, 30], np.int32), 2, np.ones(3, np.float32), 0, 0, 255)
    assert (plan.cin, plan.cout, plan.cin_p, plan.cout_p) == (3, 3, 16, 16)
    assert plan.compl
    assert plan.dptr[1] == plan.dptr[0] and plan.dptr[3] - plan.dptr[2] == 4    # row 2 dense
    assert plan.tptr[1] - plan.tptr[0] == 1 and plan.tptr[2] == plan.tptr[1]    # row 0: 1 chunk
    a, e = plan.tchunks[0]
    assert list(plan.trows[a:e]) == [0, 16 + 2, 32, 32]        # x_0, ~x_2, zero row padding
    # bias: zero point folded, then -255 for the -1 of row 0; padded rows 0
    assert plan.bias[0] == 10 - 2 * 0 - 255 and plan.bias[1] == 20 and plan.bias[2] == 30 - 2 * 4
    assert (plan.bias[3:] == 0).all() and (plan.mult[3:] == 0).all()


# ------------------------------------------------------------------ generated code and start-up

_ASM_SCRIPT = """
import re, numba, numpy as np
from ternet.kernels import pointwise as pw
w = np.array([[1, -1, 0, 1] * 8], np.int8)
plan = pw.make_pw_addonly(w, np.zeros(1, np.int32), 0, np.ones(1, np.float32), 0, 0, 255)
x, out = np.zeros((140, plan.cin_p), np.uint8), np.zeros((140, plan.cout_p), np.uint8)
xt, a16, a32, yt = plan.scratch()
args = (x, 130, plan.tptr, plan.tchunks, plan.trows, plan.dptr, plan.drows, plan.dw, plan.bias,
        plan.mult, plan.zph, plan.zpc, plan.lo, plan.hi, plan.compl, out, xt[0], a16[0], a32[0], yt[0],
        pw.split_work(130, 1))
plan(x, 130, out)
sig = tuple(numba.typeof(a) for a in args)
asm = pw.pw_t2_u8_addonly.inspect_asm(sig)
print(len(re.findall(r"\\bvpaddw\\b", asm)), len(re.findall(r"\\bvfn?m(add|sub)", asm)))
"""


def test_addonly_asm_adds_16bit_lanes_without_fma():
    """The add-only kernel's passes are vectorised 16-bit adds, and the requant has no FMA
    (TERNET_NUMBA_CACHE=0: inspect_asm needs freshly compiled code)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TERNET_NUMBA_CACHE="0", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", _ASM_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    n_addw, n_fma = map(int, res.stdout.split()[-2:])
    assert n_addw >= 16 and n_fma == 0


def test_import_compiles_nothing():
    code = ("import ternet.kernels.pointwise as p\n"
            "ks = [p.pw_t2_u8_addonly, p.pw_t2_u8_addonly_par, p.pw_t2_i32_addonly, p.pw_i8_u8_plain,\n"
            "      p.pw_i8_u8_plain_par, p.pw_i8_i32_plain, p._pw_range, p._pw_tiles]\n"
            "assert all(not k.signatures and not k.overloads for k in ks)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
