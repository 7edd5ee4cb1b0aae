"""ternet.train.synth: the BatchNorm-statistics loss and the image synthesis it drives."""
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ternet.train.synth import bn_stat_loss, synthesize  # noqa: E402


def small_model(mean, std):
    """conv(identity) -> BN whose running statistics are (mean, std**2) per channel."""
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    bn = nn.BatchNorm2d(3, eps=1e-5)
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(std) ** 2 - bn.eps)
    return nn.Sequential(conv, bn, nn.ReLU()).eval()


def test_loss_is_zero_when_batch_statistics_match():
    x = torch.randn(64, 3, 8, 8)
    mean, std = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).sqrt()
    m = small_model(mean.tolist(), std.tolist())
    assert bn_stat_loss(m, x).item() == pytest.approx(0.0, abs=1e-4)
    assert bn_stat_loss(m, x + 1.0).item() == pytest.approx(3 ** 0.5, rel=1e-4)   # each mean off by 1


def test_synthesis_moves_statistics_to_the_targets_and_returns_pixels():
    m = small_model([0.2, -0.1, 0.0], [0.3, 0.2, 0.25])
    scale, zp = 1 / 128, 127
    before = bn_stat_loss(m, torch.randn(16, 3, 16, 16) * 0.5).item()
    px = synthesize(m, 16, 16, steps=150, lr=0.05, scale=scale, zero_point=zp, seed=0, log=lambda s: None)
    assert px.shape == (16, 3, 16, 16)
    assert px.min() >= 0 and px.max() <= 255 and torch.equal(px, px.round())
    after = bn_stat_loss(m, (px - zp) * scale).item()
    assert after < 0.1 * before


def small_classifier():
    """conv -> BN -> ReLU -> global mean pool -> identity linear: class j = channel j, so every
    class is reachable."""
    fc = nn.Linear(3, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(3))
        fc.bias.zero_()
    m = small_model([0.0, 0.0, 0.0], [0.5, 0.5, 0.5])
    return nn.Sequential(*m, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()


def test_class_term_drives_the_teacher_to_the_targets():
    m = small_classifier()
    targets = torch.tensor([0, 1, 2, 1] * 4)
    kw = dict(steps=150, lr=0.05, scale=1 / 128, zero_point=127, seed=0, log=lambda s: None)
    plain = synthesize(m, 16, 8, **kw)
    aimed = synthesize(m, 16, 8, targets=targets, ce=1.0, **kw)
    hit = lambda px: (m((px - 127) / 128).argmax(1) == targets).float().mean().item()  # noqa: E731
    assert hit(aimed) == 1.0
    assert hit(plain) < 1.0                       # the class term, not the BN term, did it


def test_init_images_are_the_starting_point():
    m = small_classifier()
    init = torch.randint(0, 256, (4, 3, 8, 8)).float()
    kw = dict(lr=0.05, scale=1 / 128, zero_point=127, seed=0, log=lambda s: None)
    assert torch.equal(synthesize(m, 4, 8, steps=0, init=init, **kw), init)
    with pytest.raises(ValueError, match="init: expected shape"):
        synthesize(m, 4, 16, steps=1, init=init, **kw)


def test_load_synth_concatenates_files_and_resizes_only_on_request(tmp_path):
    from ternet.train.data import load_synth, load_synth_described
    a, b, c = (torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8) for n, s in ((2, 8), (3, 8), (1, 16)))
    for name, x in zip("abc", (a, b, c)):
        torch.save({"images": x, "command": f"make {name}"}, tmp_path / f"{name}.pt")
    ab = load_synth(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", None)
    assert torch.equal(ab, torch.cat([a, b]).float())
    ab2, described = load_synth_described(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", None)
    assert torch.equal(ab2, ab)
    assert described == f"{tmp_path / 'a.pt'}: the first 2 images of `make a`; {tmp_path / 'b.pt'}: the first 3 images of `make b`"
    mixed = load_synth(f"{tmp_path / 'a.pt'},{tmp_path / 'c.pt'}", 16)
    assert mixed.shape == (3, 3, 16, 16) and torch.equal(mixed[2], c[0].float())
    assert torch.equal(mixed, mixed.round()) and mixed.min() >= 0 and mixed.max() <= 255
    with pytest.raises(ValueError, match="different image sizes"):
        load_synth(f"{tmp_path / 'a.pt'},{tmp_path / 'c.pt'}", None)


class ZerosAug:
    """Stands in for the CIFAR batches (no dataset needed): all-zero images."""
    def batch(self, n, step):
        return torch.zeros(n, 3, 8, 8)


def test_mixed_batches_are_deterministic_and_only_crop_when_asked():
    from ternet.train.data import MixedAug
    synth = torch.randint(1, 256, (5, 3, 8, 8)).float()      # no zero pixel: tells the parts apart
    plain, cropped = MixedAug(ZerosAug(), synth, 0.75, seed=3), MixedAug(ZerosAug(), synth, 0.75, 3, crop=0.3)
    for aug in (plain, cropped):
        b = aug.batch(8, 7)
        assert b.shape == (8, 3, 8, 8) and torch.equal(b, aug.batch(8, 7))
        assert torch.equal(b[:2], torch.zeros(2, 3, 8, 8))   # 2 of 8 from the CIFAR side
        assert torch.equal(b, b.round()) and b.min() >= 0 and b.max() <= 255
    views = {tuple(x.flatten().tolist()) for x in torch.cat([synth, synth.flip(3)])}
    assert all(tuple(x.flatten().tolist()) in views for x in plain.batch(8, 7)[2:])
    crops = torch.cat([cropped.batch(8, s)[2:] for s in range(4)])
    assert not all(tuple(x.flatten().tolist()) in views for x in crops)


def test_mixed_views_blend_two_synthetic_images_and_mix_0_changes_nothing():
    from ternet.train.data import MixedAug
    synth = torch.randint(1, 256, (5, 3, 8, 8)).float()
    assert all(torch.equal(MixedAug(ZerosAug(), synth, 0.75, 3, 0.3).batch(8, s),
                           MixedAug(ZerosAug(), synth, 0.75, 3, 0.3, mix=0.0).batch(8, s)) for s in range(3))
    two = torch.stack([torch.full((3, 8, 8), 10.0), torch.full((3, 8, 8), 200.0)])
    aug = MixedAug(ZerosAug(), two, 1.0, seed=1, mix=1.0)
    views = torch.cat([aug.batch(8, s) for s in range(6)])
    assert torch.equal(views, torch.cat([aug.batch(8, s) for s in range(6)]))      # deterministic
    assert torch.equal(views, views.round()) and views.min() >= 10 and views.max() <= 200
    values = [set(v.unique().tolist()) for v in views]
    mixup = [v for v in values if len(v) == 1 and v.isdisjoint({10.0, 200.0})]
    cutmix = [v for v in values if v == {10.0, 200.0}]
    assert mixup and cutmix                       # both kinds of blend occur
    assert all(40.0 <= x <= 170.0 for v in mixup for x in v)    # weights 0.3..0.7 of 10 and 200
