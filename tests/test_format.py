"""Model file format v1: ternary packing and the validating loader."""
import copy
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import save_file

from ternet.format import (ModelFormatError, pack_ternary, read_model, unpack_ternary,
                           write_model)
from tiny_model import make_tiny_model, tiny_graph


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
