"""Exporter parity: the PyTorch integer emulation (QuantGraph 'int' mode) and ternet on the exported
file must give bit-identical logits. Skipped when torch (the `train` extra) is absent."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ternet.format import read_model  # noqa: E402
from ternet.reference import run_reference  # noqa: E402
from ternet.train.calibrate import calibrate_ranges  # noqa: E402
from ternet.train.export import export  # noqa: E402
from ternet.train.fakequant import QuantGraph, int8_weight  # noqa: E402
from ternet.train.fold import fold_model  # noqa: E402
from ternet.train.models import IMAGENET_PREPROCESS, EfficientNetLite0, MobileNetV2, input_qparams  # noqa: E402
from ternet import quant  # noqa: E402


def _randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.2
            m.running_mean.data = torch.randn(c, generator=gen) * 0.1
            m.running_var.data = torch.rand(c, generator=gen) + 0.5
    return model.eval()


def _graph(model, size, gen, modes):
    g = QuantGraph(fold_model(model), *input_qparams("mobilenet_v2"))
    x = torch.randint(0, 256, (4, 3, size, size), generator=gen).float()
    calibrate_ranges(g, [x], "minmax")
    pw = [n["name"] for n in g.nodes("pointwise")]
    for i, name in enumerate(pw):
        mode = modes[i % len(modes)]
        cout = g.weight[name.replace(".", "__")].shape[0]
        g.set_wmode(name, mode, int8_rows=list(range(0, cout, 3)) if mode == "hybrid" else None)
    return g


def _check(g, tmp_path, size, gen, arch, n=3):
    path = tmp_path / f"{arch}.safetensors"
    pre = dict(IMAGENET_PREPROCESS, resize=size + size // 8, crop=size)
    export(g, path, arch=arch, size=size, preprocess=pre, labels=[f"c{i}" for i in range(10)],
           provenance={"producer": "tests/test_parity_torch.py"})
    x = torch.randint(0, 256, (n, 3, size, size), generator=gen).float()
    g.mode = "int"
    with torch.no_grad():
        want = g(x).numpy()
    got = run_reference(read_model(path), x.permute(0, 2, 3, 1).numpy().astype(np.uint8))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    try:
        import ternet.model  # noqa: F401  (the fast engine, once available)
    except ImportError:
        return
    import ternet
    fast = ternet.load(str(path)).predict(x.permute(0, 2, 3, 1).numpy().astype(np.uint8))
    np.testing.assert_array_equal(fast, want)


def test_int8_quantizer_matches_quant_rules():
    w = torch.randn(16, 8, 3, 3)
    q, s = int8_weight(w)
    qn, sn = quant.quantize_weights_int8(w.numpy().reshape(16, -1), axis=0)
    np.testing.assert_array_equal(q.numpy().reshape(16, -1).astype(np.int8), qn)
    np.testing.assert_array_equal(s.numpy(), sn)


def test_mobilenet_v2_small_parity(tmp_path):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = _randomize_bn(MobileNetV2(num_classes=10, width=0.5, last=64,
                                  blocks=[(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)]), gen)
    g = _graph(m, 32, gen, ["ternary", "int8", "hybrid"])
    _check(g, tmp_path, 32, gen, "mobilenet_v2")


def test_efficientnet_lite0_graph_parity(tmp_path):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    m = _randomize_bn(EfficientNetLite0(num_classes=10), gen)
    g = _graph(m, 64, gen, ["ternary", "ternary", "hybrid", "int8"])
    _check(g, tmp_path, 64, gen, "efficientnet_lite0", n=2)
