"""The two requantization rules (ternet.quant.RULES): the onnxruntime twin of requant_ref, the
kernels' two-constant epilogue (quant.round_constants), the model file's `ternet.requant`, and
every kernel family under both rules on layers whose odd accumulators are exact ties (the
hypothesis properties of each kernel module draw the rule too)."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from safetensors.numpy import load_file, save_file

import ternet
from ternet import quant
from ternet.errors import ModelFormatError
from ternet.format import read_model, write_model
from ternet.kernels import conv, cpu, vnni
from ternet.kernels import depthwise as dw
from ternet.kernels import pointwise as pw
from ternet.kernels.layout import ROW_SLACK
from ternet.reference import run_reference
from pw_cases import buffers
from tiny_model import tiny_graph


def skip_unless(ok, name, why):
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why))


PW_IMPLS = ["addonly", "plain", "emu512", "emuamx",
            skip_unless(cpu.has_avx512vnni(), "avx512vnni", "no AVX512-VNNI"),
            skip_unless(cpu.has_avx2(), "avx2", "no AVX2"),
            skip_unless(cpu.has_avx2(), "avx2i8", "no AVX2"),
            skip_unless(cpu.has_amx(), "amx", "no AMX-INT8 (or not granted)")]
DW_IMPLS = ["pairs", "emu512", skip_unless(cpu.has_avx512vnni(), "vnni", "no AVX512-VNNI")]
CONV_IMPLS = ["ref", "plain", "addonly",
              skip_unless(cpu.has_avx512vnni(), "vnni", "no AVX512-VNNI"),
              skip_unless(cpu.has_avx2(), "avx2", "no AVX2")]
HALF = np.float32(0.5)      # every odd accumulator is an exact tie


def both_rules(acc, mult, zp, lo, hi):
    """{rule: requant_ref} and a check that the rules differ on these accumulators (ties)."""
    want = {r: quant.requant_ref(acc, mult, zp, lo, hi, r) for r in quant.RULES}
    assert np.any(want["ternet"] != want["onnxruntime"]), "no tie in the case"
    return want


# ------------------------------------------------------------------ the rule itself

@given(acc=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=64),
       mult=st.one_of(st.floats(2.0 ** -20, 4.0, width=32), st.sampled_from([0.5, 0.25, 1.0, 2.0 ** -7]),
                      st.floats(2.0 ** -126, 2.0 ** 64, width=32)),
       zp=st.integers(0, 255), lo=st.integers(0, 255), hi=st.integers(0, 255),
       rule=st.sampled_from(quant.RULES))
def test_round_constants_are_the_rule(acc, mult, zp, lo, hi, rule):
    """What every kernel computes: (float32(acc) * m + zph) + zpc, clamped, truncated."""
    lo, hi = min(lo, hi), max(lo, hi)
    acc = np.array(acc, np.int32)
    zph, zpc = quant.round_constants(zp, rule)
    assert zph.dtype == zpc.dtype == np.float32
    with np.errstate(over="ignore"):
        v = (acc.astype(np.float32) * np.float32(mult) + zph) + zpc
    got = np.minimum(np.maximum(v, np.float32(lo)), np.float32(hi)).astype(np.uint8)
    np.testing.assert_array_equal(got, quant.requant_ref(acc, np.float32(mult), zp, lo, hi, rule))


def test_onnxruntime_rounds_ties_to_even():
    acc = np.arange(-9, 10, dtype=np.int32)
    ort = quant.requant_ref(acc, HALF, 100, 0, 255, "onnxruntime").astype(int)
    ours = quant.requant_ref(acc, HALF, 100, 0, 255).astype(int)
    np.testing.assert_array_equal(ort, np.rint(acc / 2) + 100)
    np.testing.assert_array_equal(ours, np.floor(acc / 2 + 100.5))
    np.testing.assert_array_equal(ours - ort, (acc % 4 == 1).astype(int))   # k + 1/2, k even
    np.testing.assert_array_equal(quant.requant_ref_onnxruntime(acc, HALF, 100, 90, 105),
                                  np.clip(ort, 90, 105))


def test_onnxruntime_multiplier_is_float32_arithmetic():
    rng = np.random.default_rng(0)
    s_in, s_out = np.float32(0.0237), np.float32(0.0411)
    s_w = rng.uniform(1e-4, 1e-2, 1000).astype(np.float32)
    m = quant.requant_multiplier(s_in, s_w, s_out, "onnxruntime")
    assert m.dtype == np.float32 and m.shape == (1000,)
    np.testing.assert_array_equal(m, (s_in * s_w) / s_out)
    np.testing.assert_array_equal(m, quant.requant_multiplier_onnxruntime(s_in, s_w, s_out))
    assert np.any(m != quant.requant_multiplier(s_in, s_w, s_out))      # float64: other roundings


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown requantization rule 'tflite'"):
        quant.requant_ref(np.zeros(1, np.int32), HALF, 0, 0, 255, "tflite")
    with pytest.raises(ValueError, match="unknown requantization rule"):
        quant.round_constants(0, "tflite")


# ------------------------------------------------------------------ kernels on exact ties

def tie_pointwise(rng, P=77, cin=5, cout=40):
    """Ternary and small int8 weights, |acc| < 2 * 128 * 5 * 2: with m = 1/2 and zp 128 most
    outputs stay inside [0, 255] and every odd accumulator is a tie."""
    x = rng.integers(0, 256, (P, cin), dtype=np.uint8)
    w = rng.integers(-1, 2, (cout, cin)).astype(np.int8)
    w[cout // 2:] *= 2                     # some int8 (non-ternary) rows
    bias = rng.integers(-40, 41, cout).astype(np.int32)
    return x, w, bias


TIE_ZX = TIE_ZP = 128


def tie_pointwise_case(seed):
    """(rng, x, w, bias, {rule: expected uint8 output}) of a tie_pointwise layer with input and
    output zero points 128, multiplier 1/2 and the full clamp range."""
    rng = np.random.default_rng(seed)
    x, w, bias = tie_pointwise(rng)
    acc = pw.pointwise_acc_ref(x, TIE_ZX, w, bias)
    return rng, x, w, bias, both_rules(acc, HALF, TIE_ZP, 0, 255)


@pytest.mark.parametrize("impl", PW_IMPLS)
def test_pointwise_ties(impl):
    rng, x, w, bias, want = tie_pointwise_case(11)
    zx, zp = TIE_ZX, TIE_ZP
    P, cout = x.shape[0], w.shape[0]
    for rule in quant.RULES:
        mult = np.full(cout, HALF)
        if impl in ("addonly", "plain"):
            plan = pw.make_pointwise(w, bias, zx, mult, zp, 0, 255, impl, rule)
        else:
            plan = vnni.make_pw_vnni(w, bias, zx, mult, zp, 0, 255, isa=impl, by_size=False,
                                     rule=rule)
        xb, out = buffers(x, P, plan.cin_p, plan.cout_p, rng)
        plan(xb, P, out[:P + ROW_SLACK])
        np.testing.assert_array_equal(out[:P, :cout], want[rule], err_msg=rule)


@pytest.mark.parametrize("impl", [p for p in PW_IMPLS if p not in ("addonly", "plain")])
def test_fused_pointwise_add_ties(impl):
    """The fused epilogue: the pointwise part under the rule, the add under ternet's."""
    rng, x, w, bias, want = tie_pointwise_case(12)
    zx, zp = TIE_ZX, TIE_ZP
    P, cout = x.shape[0], w.shape[0]
    for rule in quant.RULES:
        plan = vnni.make_pw_add(vnni.make_pw_vnni(w, bias, zx, np.full(cout, HALF), zp, 0, 255,
                                                  isa=impl, by_size=False, rule=rule),
                                120, np.float32(0.75), zp, np.float32(1.0), 110, 0, 255)
        xb, out = buffers(x, P, plan.pw.cin_p, plan.pw.cout_p, rng)
        res = rng.integers(0, 256, out.shape, dtype=np.uint8)
        plan(xb, P, out, res)
        expect = quant.add_ref(res[:P, :cout], 120, np.float32(0.75), want[rule], zp,
                               np.float32(1.0), 110, 0, 255)
        np.testing.assert_array_equal(out[:P, :cout], expect, err_msg=rule)


@pytest.mark.parametrize("impl", DW_IMPLS)
def test_depthwise_ties(impl):
    rng = np.random.default_rng(13)
    N, H, W, C, k = 2, 9, 11, 70, 3
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    w = rng.integers(-1, 2, (k, k, C)).astype(np.int8)
    bias = rng.integers(-40, 41, C).astype(np.int32)
    zx, zp = 128, 128
    pt, pl, Ho, Wo = quant.conv_geometry("same", H, W, k, 1)
    acc = dw.depthwise_acc_ref(x, zx, w, bias, 1, pt, pl, Ho, Wo)
    want = both_rules(acc, HALF, zp, 3, 250)
    for rule in quant.RULES:
        np.testing.assert_array_equal(
            dw.depthwise_ref(x, zx, w, bias, np.full(C, HALF), zp, 3, 250, 1, pt, pl, Ho, Wo, rule),
            want[rule])
        plan = dw.make_depthwise(w, bias, zx, np.full(C, HALF), zp, 3, 250, 1, pt, pl, H, W, Ho,
                                 Wo, impl=impl, rule=rule)
        x4 = np.zeros((N, H, W, plan.cp), np.uint8)
        x4[..., :C] = x
        for variant in (plan, plan.portable):
            out = np.zeros((N, Ho, Wo, plan.cp), np.uint8)
            variant(x4, out)
            np.testing.assert_array_equal(out[..., :C], want[rule], err_msg=rule)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_stem_conv_ties(impl):
    rng = np.random.default_rng(14)
    N, H, W, cin, cout, k = 2, 8, 8, 3, 24, 3
    x = rng.integers(0, 256, (N, H, W, cin), dtype=np.uint8)
    w = rng.integers(-1, 2, (cout, k, k, cin)).astype(np.int8)
    bias = rng.integers(-40, 41, cout).astype(np.int32)
    zx, zp = 128, 128
    pt, pl, Ho, Wo = quant.conv_geometry("same", H, W, k, 2)
    acc = conv.conv_acc_ref(x, zx, w, bias, 2, pt, pl, Ho, Wo)
    want = both_rules(acc, HALF, zp, 0, 255)
    P = N * Ho * Wo
    for rule in quant.RULES:
        plan = conv.make_conv(w, bias, zx, np.full(cout, HALF), zp, 0, 255, 2, pt, pl, H, W, Ho, Wo,
                              impl=impl, rule=rule)
        out = np.zeros((P + ROW_SLACK, plan.pw.cout_p), np.uint8)
        plan(x, out)
        np.testing.assert_array_equal(out[:P, :cout].reshape(N, Ho, Wo, cout), want[rule],
                                      err_msg=rule)


# ------------------------------------------------------------------ the model file

def write_tiny(path, requant="ternet", seed=0):
    graph, tensors, input_spec, pre = tiny_graph(seed, 33, 10, "same")
    write_model(path, arch="tiny_test_net", graph=graph, tensors=tensors, input_spec=input_spec,
                preprocess=pre, labels=[f"class_{i}" for i in range(10)],
                provenance={"producer": "tests/test_requant_rules.py"}, requant=requant)
    return path


def test_file_stores_the_rule(tmp_path):
    plain = read_model(write_tiny(tmp_path / "t.safetensors"))
    assert plain.requant == "ternet" and "ternet.requant" not in plain.metadata   # files unchanged
    ort = read_model(write_tiny(tmp_path / "o.safetensors", "onnxruntime"))
    assert ort.requant == "onnxruntime" and ort.metadata["ternet.requant"] == "onnxruntime"


def test_loader_refuses_an_unknown_rule(tmp_path):
    path = write_tiny(tmp_path / "o.safetensors", "onnxruntime")
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata())
    meta["ternet.requant"] = "tflite"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ModelFormatError) as e:
        read_model(path)
    assert str(e.value) == (f"{path}: metadata key 'ternet.requant': unknown requantization "
                            "rule 'tflite'; expected one of ternet, onnxruntime")
    with pytest.raises(ModelFormatError, match="unknown requantization rule"):
        write_tiny(tmp_path / "bad.safetensors", "half_even")
    assert not (tmp_path / "bad.safetensors").exists()


def _impls():
    out = ["auto", "plain", "addonly"]
    if cpu.has_avx2():
        out.append("avx2")
    if cpu.has_avx512vnni():
        out.append("vnni")
    return out


@pytest.fixture(scope="module")
def ort_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    x = np.random.default_rng(1).integers(0, 256, (3, 33, 33, 3), dtype=np.uint8)
    path = write_tiny(d / "ort.safetensors", "onnxruntime")
    return path, x, run_reference(read_model(path), x)


@pytest.mark.parametrize("impl", _impls())
def test_runner_equals_reference_under_onnxruntime_rule(ort_tiny, impl):
    path, x, ref = ort_tiny
    np.testing.assert_array_equal(ternet.load(path, kernels=impl).predict(x), ref)
    assert np.ptp(ref) > 0


def test_reference_follows_the_files_rule(ort_tiny, tmp_path):
    """Each conv-like node's multipliers come from the file's rule (they differ somewhere:
    float32 vs float64 arithmetic), and the reference runs each node by that rule."""
    from ternet.ops._base import requant_params, value_qparams
    from ternet.reference import run_node
    path, x, _ = ort_tiny
    ort = read_model(path)
    ours = read_model(write_tiny(tmp_path / "t.safetensors"))
    differ = 0
    vals = {"input": x[:1]}
    for node in ort.graph:
        vals[node.name] = run_node(ort, node, [vals[s] for s in node.inputs])
        if node.op not in ("conv2d", "depthwise", "pointwise"):
            continue
        s_in, s_out = value_qparams(ort, node.inputs[0])[0], value_qparams(ort, node.name)[0]
        s_w = ort.tensor(node, "weight_scale")
        m, zp, lo, hi = requant_params(ort, node)
        np.testing.assert_array_equal(m, quant.requant_multiplier(s_in, s_w, s_out, "onnxruntime"))
        np.testing.assert_array_equal(requant_params(ours, node)[0],
                                      quant.requant_multiplier(s_in, s_w, s_out))
        differ += int(np.sum(m != requant_params(ours, node)[0]))
        if node.op == "pointwise":
            from ternet.format import pointwise_weight
            src = vals[node.inputs[0]]
            acc = pw.pointwise_acc_ref(src.reshape(-1, src.shape[-1]), value_qparams(ort, node.inputs[0])[1],
                                       pointwise_weight(ort, node), ort.tensor(node, "bias"))
            np.testing.assert_array_equal(
                vals[node.name].reshape(acc.shape),
                quant.requant_ref_onnxruntime(acc, m, zp, lo, hi))
    assert differ > 0
