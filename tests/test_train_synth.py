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
