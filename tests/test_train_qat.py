"""ternet.train.qat: the training loop's progressive ternarization (--ramp) and its resume."""
import copy

import pytest

torch = pytest.importorskip("torch")

from ternet.train.calibrate import calibrate_ranges  # noqa: E402
from ternet.train.fakequant import QuantGraph  # noqa: E402
from ternet.train.fold import fold_model  # noqa: E402
from ternet.train.models import MobileNetV2, input_qparams  # noqa: E402
from ternet.train.qat import feature_loss, load_ckpt, train  # noqa: E402


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


def test_block_outputs_are_the_tensors_that_leave_a_block():
    g = small_graph()
    outs = g.block_outputs()
    consumers = {n["name"]: [m["name"] for m in g.spec if n["name"] in m["inputs"]] for n in g.spec}
    block = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
    assert outs and all(any(block(c) != block(o) for c in consumers[o]) for o in outs)
    inner = [n["name"] for n in g.spec if n["name"] not in outs and consumers[n["name"]]]
    assert all(block(c) == block(i) for i in inner for c in consumers[i])


def test_taps_leave_the_logits_alone_and_feature_loss_is_relative_error():
    g = small_graph()
    g.mode = "fake"
    x = g.input_real(RandomImages().batch(2, 1))
    taps = set(g.block_outputs())
    with torch.no_grad():
        plain = g(x)
        logits, feats = g.forward_taps(x, taps)
    assert torch.equal(plain, logits) and set(feats) == taps
    assert float(feature_loss(feats, feats)) == 0.0
    doubled = {k: 2 * v for k, v in feats.items()}       # error = teacher: relative error 1
    assert float(feature_loss(doubled, feats)) == pytest.approx(1.0, rel=1e-6)


def test_feature_distillation_trains_and_logs_both_terms(tmp_path):
    g = small_graph()
    teacher = copy.deepcopy(g)
    for n in g.nodes("pointwise"):
        g.set_wmode(n["name"], "ternary")
    lines = []
    train(g, teacher, RandomImages(), {}, tmp_path / "ckpt.pt", steps=10, batch=2, lr=1e-4, T=1.0,
          save_every=1e9, eval_every=0, log=lines.append, feat=0.5)
    assert len(lines) == 1 and "(kd " in lines[0] and "features " in lines[0]


class Interrupted(Exception):
    pass


class StopAt(RandomImages):
    """RandomImages that stops the run when batch `at` is asked for (a session cut)."""
    def __init__(self, at):
        self.at = at

    def batch(self, n, step):
        if step == self.at:
            raise Interrupted
        return super().batch(n, step)


def test_relative_lr_scales_each_tensor_and_resumes_exactly(tmp_path):
    g = small_graph()
    teacher = copy.deepcopy(g)
    for n in g.nodes("pointwise"):
        g.set_wmode(n["name"], "ternary")
    start = copy.deepcopy(g)

    def fit(graph, path, aug=RandomImages(), start_step=0, opt_state=None):
        return train(graph, teacher, aug, {}, path, steps=4, batch=2, lr=1e-3, T=1.0,
                     save_every=0, eval_every=0, log=lambda s: None, start_step=start_step,
                     opt_state=opt_state, lr_rel=True)

    straight = fit(copy.deepcopy(start), tmp_path / "a.pt")
    with pytest.raises(Interrupted):
        fit(copy.deepcopy(start), tmp_path / "b.pt", aug=StopAt(2))
    g2, ck = load_ckpt(tmp_path / "b.pt")
    assert ck["step"] == 2
    tensors = list(start.weight.values()) + list(start.bias.values())
    bases = [grp["base"] for grp in ck["opt"]["param_groups"]]
    sizes = [float(t.abs().mean()) for t in tensors]
    typical = sum(sizes) / sum(x > 0 for x in sizes)     # all-zero tensors (here: biases) get this
    assert 0.0 in sizes
    assert bases == pytest.approx([1e-3 * (x or typical) for x in sizes], rel=1e-6)

    resumed = fit(g2, tmp_path / "b.pt", start_step=2, opt_state=ck["opt"])
    assert all(torch.equal(straight.weight[k], resumed.weight[k]) for k in straight.weight)
    assert all(torch.equal(straight.bias[k], resumed.bias[k]) for k in straight.bias)
    assert not all(torch.equal(start.weight[k], resumed.weight[k]) for k in start.weight)


def test_compact_checkpoint_keeps_the_model_and_drops_the_optimizer(tmp_path):
    from ternet.train.__main__ import main
    g = small_graph()
    teacher = copy.deepcopy(g)
    for n in g.nodes("pointwise"):
        g.set_wmode(n["name"], "ternary")
    run(g, teacher, tmp_path / "ckpt.pt", steps=2)
    main(["compact", str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "keep" / "ckpt.pt")])
    full, ck = load_ckpt(tmp_path / "ckpt.pt")
    small, cs = load_ckpt(tmp_path / "keep" / "ckpt.pt")
    assert "opt" in ck and "opt" not in cs and cs["step"] == ck["step"] == 2
    assert small.wmode == full.wmode
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), small.state_dict().values()))
    x = RandomImages().batch(2, 99)
    assert torch.equal(full(x), small(x))
    run(small, teacher, tmp_path / "keep" / "ckpt.pt", steps=4, start_step=2, opt_state=cs.get("opt"))
    assert load_ckpt(tmp_path / "keep" / "ckpt.pt")[1]["step"] == 4    # goes on with a fresh Adam
