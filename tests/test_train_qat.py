"""ternet.train.qat: the training loop's progressive ternarization (--ramp) and its resume."""
import copy

import pytest

torch = pytest.importorskip("torch")

from ternet.train.calibrate import calibrate_ranges  # noqa: E402
from ternet.train.fakequant import QuantGraph  # noqa: E402
from ternet.train.fold import fold_model  # noqa: E402
from ternet.train.models import MobileNetV2, input_qparams  # noqa: E402
from ternet.train.qat import load_ckpt, train  # noqa: E402


class RandomImages:
    """The `aug` interface of train(): batch(n, step) -> float images 0..255, NCHW."""
    def batch(self, n, step):
        return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(step)).float()


def small_graph():
    torch.manual_seed(0)
    m = MobileNetV2(num_classes=10, width=0.5, last=64, blocks=[(1, 16, 1, 1), (6, 24, 2, 2)]).eval()
    g = QuantGraph(fold_model(m), *input_qparams("mobilenet_v2"))
    calibrate_ranges(g, [RandomImages().batch(4, 0)], "minmax")
    return g


def run(g, teacher, path, steps, start_step=0, opt_state=None, ramp_layers=()):
    return train(g, teacher, RandomImages(), {}, path, steps=steps, batch=2, lr=1e-4, T=1.0,
                 save_every=1e9, eval_every=0, log=lambda s: None, start_step=start_step,
                 opt_state=opt_state, ramp=6, ramp_layers=list(ramp_layers))


def test_ramp_turns_only_its_layers_ternary_in_order_and_survives_a_resume(tmp_path):
    g = small_graph()
    teacher = copy.deepcopy(g)
    pw = [n["name"] for n in g.nodes("pointwise")]
    assert len(pw) >= 5
    already, ramped, left = pw[0], pw[1:4], pw[4:]
    g.set_wmode(already, "ternary")          # ternary in --init: the ramp must not touch it
    for name in ramped + left:
        g.set_wmode(name, "int8")
    path = tmp_path / "ckpt.pt"

    run(g, teacher, path, steps=2, ramp_layers=ramped)      # step 2 of 6: one layer of three on
    g2, ck = load_ckpt(path)
    assert ck["step"] == 2
    assert [g2.wmode[n] for n in pw] == ["ternary", "ternary", "int8", "int8"] + ["int8"] * len(left)

    run(g2, teacher, path, steps=6, start_step=2, opt_state=ck["opt"], ramp_layers=ramped)
    g3, ck = load_ckpt(path)
    assert ck["step"] == 6
    assert all(g3.wmode[n] == "ternary" for n in [already] + ramped)
    assert all(g3.wmode[n] == "int8" for n in left)
