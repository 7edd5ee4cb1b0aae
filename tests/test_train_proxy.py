"""ternet.train.proxy: ImageNet-proxy batches are a pure function of (seed, step), stream across
epochs, mix 64-px and larger sources at one size; held-out picks are labelled and deterministic."""
import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from ternet.train.data import crop_box, crop_box_wh  # noqa: E402
from ternet.train.files import InputFileError  # noqa: E402
from ternet.train.proxy import ProxyAug, heldout  # noqa: E402

SIZES = {"tiny": (64, 64), "nette": (224, 224), "woof": (320, 427)}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    rng = np.random.default_rng(0)
    rows = []
    for source, (h, w) in SIZES.items():
        for split, n in (("train", 5), ("val", 4)):
            for i in range(n):
                rel = f"{source}/{split}/n0000{i}/{source}_{split}_{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
                rows.append({"source": source, "split": split, "path": rel, "synset": f"n0000{i}",
                             "class_index": str(10 * i + len(source))})
    with open(root / "index.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return str(root)


def test_batches_are_a_function_of_seed_and_step(proxy):
    a, b = ProxyAug(proxy, 48, seed=3, mix=0.5), ProxyAug(proxy, 48, seed=3, mix=0.5)
    later = a.batch(4, 7)                        # a resumed run asks for step 7 first
    for step in range(8):
        b.batch(4, step)
    assert torch.equal(later, b.batch(4, 7))
    assert later.shape == (4, 3, 48, 48) and later.min() >= 0 and later.max() <= 255
    assert torch.equal(later, later.round())
    assert not torch.equal(later, ProxyAug(proxy, 48, seed=4, mix=0.5).batch(4, 7))


def test_an_epoch_visits_every_training_image_once(proxy):
    aug = ProxyAug(proxy, 32, seed=1)
    n = len(aug.paths)
    assert n == 15                                # train split only
    for epoch in range(2):
        seen = [aug._index(epoch * n + k) for k in range(n)]
        assert sorted(seen) == list(range(n))


def test_square_crop_box_matches_the_general_one():
    for s, area in ((32, 0.25), (224, 0.08), (160, 0.5)):
        g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)
        for _ in range(50):
            assert crop_box(g1, s, area) == crop_box_wh(g2, s, s, area)


def test_crop_box_stays_inside_non_square_images():
    g = torch.Generator().manual_seed(0)
    for h, w in ((64, 64), (320, 427), (427, 320), (10, 500)):
        for _ in range(100):
            t, l, bh, bw = crop_box_wh(g, h, w, 0.1)
            assert 0 <= t and t + bh <= h and 0 <= l and l + bw <= w and bh >= 1 and bw >= 1


def test_heldout_is_labelled_deterministic_and_preprocessed(proxy):
    spec = {"resize": 64, "crop": 56, "interpolation": "bilinear", "mean": [127.0 / 255] * 3,
            "std": [128.0 / 255] * 3, "colour": "RGB"}
    inp = {"scale": 1 / 128, "zero_point": 127, "height": 56, "width": 56}
    x, y, desc = heldout(proxy, ("nette", "woof"), 5, spec, inp)
    x2, y2, _ = heldout(proxy, ("nette", "woof"), 5, spec, inp)
    assert x.shape == (5, 3, 56, 56) and torch.equal(x, x2) and torch.equal(y, y2)
    nette, woof = {10 * i + 5 for i in range(4)}, {10 * i + 4 for i in range(4)}
    assert set(y[:3].tolist()) <= nette and set(y[3:].tolist()) <= woof   # 3 + 2, evenly spread
    assert "5 nette+woof val" in desc


def test_missing_index_is_one_clear_error(tmp_path):
    with pytest.raises(InputFileError, match="index.csv: no such file"):
        ProxyAug(str(tmp_path), 32)
