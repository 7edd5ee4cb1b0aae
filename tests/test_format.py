"""Model file format v1: ternary packing and the validating loader."""
import copy
import json
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import save_file

import ternet
from ternet.format import (MAX_HEADER_BYTES, ModelFormatError, pack_ternary, read_model,
                           unpack_ternary, write_model)
from tiny_model import builder, make_tiny_model, specs, tiny_graph


# ------------------------------------------------------------------ 2-bit packing

@given(st.data())
def test_pack_unpack_round_trip(data):
    cout = data.draw(st.integers(1, 40))
    cin = data.draw(st.integers(1, 70))
    w = data.draw(arrays(np.int8, (cout, cin), elements=st.sampled_from([-1, 0, 1])))
    packed = pack_ternary(w)
    assert packed.dtype == np.uint8 and packed.shape == (cout, -(-cin // 4))
    np.testing.assert_array_equal(unpack_ternary(packed, cin), w)


def test_pack_layout_is_documented_one():
    # code = w + 1, first weight in the low bits, padding code 1
    w = np.array([[-1, 0, 1, 1, -1]], np.int8)
    packed = pack_ternary(w)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 0 | 1 << 2 | 1 << 4 | 1 << 6]]


def test_pack_rejects_non_ternary():
    with pytest.raises(ValueError):
        pack_ternary(np.array([[2, 0]], np.int8))


def test_unpack_rejects_code_3():
    with pytest.raises(ValueError, match="invalid 2-bit code"):
        unpack_ternary(np.array([[0b11]], np.uint8), 1)


# ------------------------------------------------------------------ round trip

def test_write_read_round_trip(tmp_path):
    path = make_tiny_model(tmp_path / "m.safetensors")
    graph, tensors, inp, pre = tiny_graph()
    mf = read_model(path)
    assert mf.arch == "tiny_test_net"
    assert [n.name for n in mf.graph] == [n["name"] for n in graph]
    assert mf.graph[-1].out_shape == (1, 1, 10)
    assert mf.labels == tuple(f"class_{i}" for i in range(10))
    assert mf.input == inp and mf.preprocess == pre
    for k, v in tensors.items():
        np.testing.assert_array_equal(mf.tensors[k], v)
        assert mf.tensors[k].dtype == v.dtype


# ------------------------------------------------------------------ malformed files

def _meta(graph, inp, pre, labels, version="1"):
    return {"format": "ternet", "ternet.format_version": version, "ternet.arch": "t",
            "ternet.graph": json.dumps(graph), "ternet.input": json.dumps(inp),
            "ternet.preprocess": json.dumps(pre), "ternet.labels": json.dumps(labels),
            "ternet.provenance": json.dumps({"producer": "test"})}


def _write_raw(path, mutate):
    """Write the tiny model with `mutate(graph, tensors, meta)` applied, bypassing validation."""
    graph, tensors, inp, pre = tiny_graph()
    graph, tensors = copy.deepcopy(graph), {k: v.copy() for k, v in tensors.items()}
    meta = _meta(graph, inp, pre, [f"c{i}" for i in range(10)])
    mutate(graph, tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path


def _node(graph, name):
    return next(n for n in graph if n["name"] == name)


def _set(key, value):
    def f(g, t, m):
        m[key] = value
    return f


def _graph(fn):
    def f(g, t, m):
        fn(g, t)
        m["ternet.graph"] = json.dumps(g)
    return f


def _tensor(name, value):
    def f(g, t, m):
        t[name] = value
    return f


def _code3(g, t, m):
    w = t["b0.project.weight"].copy()
    w[2, 1] |= 0b11
    t["b0.project.weight"] = w


def _bad_pad_code(g, t, m):
    w = t["head.weight"].copy()           # cin = 18 -> 5 bytes, the last holds 2 padding codes
    w[0, -1] = (w[0, -1] & 0x0F) | (0 << 4)
    t["head.weight"] = w


def _del(name):
    def f(g, t, m):
        del t[name]
    return f


def _spec(key, **changes):
    """Change entries of the JSON object in metadata key `key`."""
    def f(g, t, m):
        m[key] = json.dumps(dict(json.loads(m[key]), **changes))
    return f


def _scale(name, value):
    """Set every element of the float32 scale tensor `name` to value."""
    def f(g, t, m):
        t[name] = np.full_like(t[name], value)
    return f


def _both(first, second):
    def f(g, t, m):
        first(g, t, m)
        second(g, t, m)
    return f


def _duplicate_scale(g, t, m):
    m["ternet.input"] = m["ternet.input"].replace('"scale": ', '"scale": 1.0, "scale": ', 1)


DEEP = "[" * 100_000 + "]" * 100_000


CASES = {
    "no format tag": (_set("format", "pt"), "not a ternet model file"),
    "newer version": (_set("ternet.format_version", "2"), "version 2"),
    "bad graph json": (_set("ternet.graph", "[{"), "invalid JSON"),
    "missing labels": (lambda g, t, m: m.pop("ternet.labels"), "'ternet.labels'.*missing"),
    "label count": (_set("ternet.labels", json.dumps(["a", "b"])), "2 labels"),
    "unknown op": (_graph(lambda g, t: _node(g, "b0.dw").update(op="conv3d")), "unknown op 'conv3d'"),
    "forward reference": (_graph(lambda g, t: _node(g, "b0.dw").update(inputs=["head"])),
                          "not the graph input or an earlier node"),
    "duplicate name": (_graph(lambda g, t: _node(g, "b1.dw").update(name="b0.dw")), "duplicate"),
    "wrong arity": (_graph(lambda g, t: _node(g, "b1.add").update(inputs=["b0.project"])),
                    "takes 2 input"),
    "channel mismatch": (_graph(lambda g, t: _node(g, "b1.expand")["attrs"].update(cin=13)),
                         "cin=13 but its input has 12"),
    "bad padding": (_graph(lambda g, t: _node(g, "b1.dw")["attrs"].update(padding="valid")),
                    "'padding' must be one of"),
    "even kernel": (_graph(lambda g, t: _node(g, "b1.dw")["attrs"].update(kernel=4)), "odd"),
    "linear not last": (_graph(lambda g, t: g.append(dict(g[-2], name="extra"))),
                        "must be the last node"),
    "missing tensor": (_del("b1.dw.bias"), "'b1.dw.bias'.*missing"),
    "wrong dtype": (_tensor("b1.dw.bias", np.zeros(36, np.int64)), "dtype int64"),
    "wrong shape": (_tensor("b1.dw.weight", np.zeros((3, 3, 35), np.int8)), r"shape \[3, 3, 35\]"),
    "ternary code 3": (_code3, "invalid 2-bit code 3"),
    "ternary padding code": (_bad_pad_code, "padding codes"),
    "unused tensor": (_tensor("ghost.weight", np.zeros(3, np.int8)), "'ghost.weight'.*not used"),
    "zero scale": (_tensor("b1.dw.weight_scale", np.zeros(36, np.float32)), "finite and > 0"),
    "nan output scale": (_tensor("stem.output_scale", np.array([np.nan], np.float32)), "finite"),
    "zero point range": (_tensor("stem.output_zero_point", np.array([300], np.int32)), "outside"),
    "accumulator overflow": (_tensor("b2.expand.bias", np.full(40, 2**31 - 10, np.int32)), "overflow"),
    "crop mismatch": (lambda g, t, m: m.update({"ternet.preprocess": json.dumps(
        dict(json.loads(m["ternet.preprocess"]), crop=224))}), "crop 224"),
    "hybrid rows": (_tensor("b1.project.int8_channels", np.array([3, 1], np.int32)),
                    "strictly increasing"),
    # issue 16: each of these escaped as another exception, or was silently accepted
    "deep metadata json": (_set("ternet.provenance", DEEP), "nested deeper than 32"),
    "deep graph json": (_set("ternet.graph", DEEP), "nested deeper than 32"),
    "big int graph attr": (_graph(lambda g, t: _node(g, "b1.dw")["attrs"].update(kernel=2**64)),
                           "'kernel' = 18446744073709551616 out of range"),
    "big int input spec": (_spec("ternet.input", height=2**64), "'height' = 1844674407370955"),
    "big int input scale": (_spec("ternet.input", scale=2**128), "'scale' = 3402823669209384"),
    "big int preprocess": (_spec("ternet.preprocess", mean=[2**130, 0, 0]), "'mean' values"),
    "non-ascii version digit": (_set("ternet.format_version", "\u00b2"), "ASCII digits"),
    "non-ascii version digits": (_set("ternet.format_version", "1\u0661"), "ASCII digits"),
    "nan json constant": (_spec("ternet.input", scale=float("nan")), "NaN is not a JSON number"),
    "infinity json constant": (_spec("ternet.preprocess", std=[float("inf")] * 3),
                               "Infinity is not a JSON number"),
    "duplicate json key": (_duplicate_scale, "duplicate key 'scale'"),
    "node name with newline": (_graph(lambda g, t: _node(g, "head").update(name="head\n")),
                               "invalid name"),
    "input scale 0 in float32": (_spec("ternet.input", scale=1e-300),
                                 "'scale' = 1e-300 out of range"),
    "std 0 in float32": (_spec("ternet.preprocess", std=[0.2, 1e-300, 0.2]), "'std' values"),
    "subnormal weight scale": (_scale("b1.dw.weight_scale", 1e-40), "normal float32"),
    "subnormal output scale": (_scale("b1.dw.output_scale", 1e-40), "normal float32"),
    # legal scales whose float32 multipliers are not (the VNNI plan raised a ValueError)
    "requant multiplier inf": (_both(_scale("head.weight_scale", 3e38),
                                     _scale("head.output_scale", 1e-3)),
                               "'head': requantization multiplier inf"),
    "requant multiplier subnormal": (_scale("stem.output_scale", 3e38),
                                     r"'stem': requantization multiplier \S+ \(float32\)"),
    "requant multiplier > 2**64": (_scale("b0.dw.weight_scale", 1e25), "requantization multiplier"),
    "add multiplier": (_scale("b1.add.output_scale", 1.2e-38), "'b1.add'.*operand multiplier"),
    "pool multiplier": (_scale("pool.output_scale", 1.2e-38), "'pool'.*pooling multiplier"),
    "logit scale": (_scale("fc.weight_scale", 3e38), "'fc'.*logit scale inf"),
    "hybrid index wraps int32": (_tensor("b1.project.int8_channels",
                                         np.array([1, 2, -2**31], np.int32)),
                                 "strictly increasing"),
    "channel limit": (_graph(lambda g, t: _node(g, "b1.expand")["attrs"].update(cout=16385)),
                      "'cout' = 16385 out of range"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_rejects_malformed(tmp_path, case):
    mutate, pattern = CASES[case]
    path = _write_raw(tmp_path / "bad.safetensors", mutate)
    with pytest.raises(ModelFormatError, match=pattern) as e:
        read_model(path)
    assert str(path) in str(e.value)               # the message names the file
    assert "\n" not in str(e.value)                # one line


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_loader_rejects_non_safetensors(tmp_path, content):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        read_model(p)


def test_loader_rejects_truncated(tmp_path):
    p = make_tiny_model(tmp_path / "m.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFormatError, match="not a readable"):
        read_model(p)


# ------------------------------------------------------------------ the safetensors header itself

def _with_header(path, edit):
    """A valid tiny model whose safetensors header text is replaced by edit(text)."""
    data = make_tiny_model(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    enc = edit(data[8:8 + n].decode()).encode("utf-8", "surrogateescape")
    path.write_bytes(len(enc).to_bytes(8, "little") + enc + data[8 + n:])
    return path


def _repeat_entry(name):
    def edit(text):
        m = re.search(r'"' + re.escape(name) + r'":\{[^}]*\}', text)
        return text[:m.end()] + "," + m.group() + text[m.end():]
    return edit


HEADER_CASES = {
    "repeated metadata key": (
        lambda t: t.replace('"format":"ternet"', '"format":"pt","format":"ternet"'),
        "duplicate key 'format'"),
    "repeated tensor entry": (_repeat_entry("fc.bias"), "duplicate key 'fc.bias'"),
    "repeated __metadata__": (lambda t: '{"__metadata__":{},' + t[1:],
                              "duplicate key '__metadata__'"),
    "deep nesting": (lambda t: t[:-1] + ',"x":' + DEEP + "}", "header: JSON nested deeper than 32"),
    "not utf-8": (lambda t: t.replace("class_0", "class_\udcff"), "header is not valid UTF-8"),
    "not an object": (lambda t: "[" + t + "]", "header is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_loader_rejects_malformed_header(tmp_path, case):
    edit, pattern = HEADER_CASES[case]
    path = _with_header(tmp_path / "m.safetensors", edit)
    with pytest.raises(ModelFormatError, match=pattern) as e:
        read_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_loader_bounds_the_header_length(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelFormatError, match=f"exceeds the limit of {MAX_HEADER_BYTES} bytes"):
        read_model(p)


def test_big_integers_in_range_are_numbers(tmp_path):
    """A JSON integer >= 2**64 is a number like any other (it was a TypeError): in range, kept."""
    path = _write_raw(tmp_path / "m.safetensors", _spec("ternet.preprocess", mean=[2**64, 0, 0]))
    assert read_model(path).preprocess["mean"] == [2**64, 0, 0]


# ------------------------------------------------------------------ graphs the runner can't take

def _write_built(path, b, size, classes=4):
    """Write the graph built on tiny_model.builder(size) as is, bypassing validation."""
    inp, pre = specs(b, size)
    labels = [str(i) for i in range(classes)]
    save_file(b.tensors, str(path), metadata=_meta(b.graph, inp, pre, labels))
    return path


RAW_INPUT = {   # op -> (graph up to the classifier's input, input size)
    "depthwise": (lambda b: b.gap("pool", b.dw("d", "input", 3, 1, "same", "relu")), 9),
    "pointwise": (lambda b: b.gap("pool", b.pw("p", "input", 8, "ternary", "relu")), 9),
    "add": (lambda b: b.gap("pool", b.add("a", "input",
                                          b.conv("c", "input", 3, 3, 1, "same", "none"))), 9),
    "global_avg_pool": (lambda b: b.gap("pool", "input"), 9),
    "linear": (lambda b: "input", 1),
}


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("op", sorted(RAW_INPUT))
def test_only_conv2d_reads_the_graph_input(tmp_path, op, kernels):
    """Valid before issue 16 but refused by the fast runner (ValueError at load or predict):
    now refused by the loader, on both runners alike, as docs/format.md says."""
    build, size = RAW_INPUT[op]
    b = builder(size)
    b.linear("fc", build(b), 4)
    path = _write_built(tmp_path / "m.safetensors", b, size)
    with pytest.raises(ModelFormatError, match=f"op '{op}' cannot read the graph input"):
        ternet.load(path, kernels=kernels)


LIMITS = {      # (graph up to the classifier's input, input size, message)
    "pool accumulator": (lambda b: b.gap("pool", b.conv("c", "input", 1, 1, 1, "same", "none")),
                         4096, "'pool': a sum over 4096x4096 pixels can overflow"),
    "activation size": (lambda b: b.gap("pool", b.conv("c", "input", 16, 1, 1, "same", "none")),
                        4096, "'c': output 4096x4096x16 has more than 67108864 values"),
    "im2col size": (lambda b: b.gap("pool", b.conv("c", "input", 1, 3, 1, "same", "none")),
                    4096, r"'c': its im2col matrix \(4096x4096 x 27\)"),
    "conv2d depth": (lambda b: b.gap("pool", b.conv("c1", b.conv("c0", "input", 335, 1, 1, "same",
                                                                 "none"), 1, 7, 1, "same", "none")),
                     9, "'c1': kernel 7x7 x cin 335 = 16415 exceeds 16384"),
}


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_loader_enforces_documented_limits(tmp_path, case):
    build, size, pattern = LIMITS[case]
    b = builder(size)
    b.linear("fc", build(b), 4)
    with pytest.raises(ModelFormatError, match=pattern):
        read_model(_write_built(tmp_path / "m.safetensors", b, size))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "nope.safetensors")


def test_writer_refuses_invalid(tmp_path):
    graph, tensors, inp, pre = tiny_graph()
    tensors = dict(tensors, **{"b1.dw.bias": np.zeros(5, np.int32)})
    with pytest.raises(ModelFormatError):
        write_model(tmp_path / "w.safetensors", arch="t", graph=graph, tensors=tensors,
                    input_spec=inp, preprocess=pre, labels=[str(i) for i in range(10)],
                    provenance={"producer": "test"})
    assert not (tmp_path / "w.safetensors").exists()
