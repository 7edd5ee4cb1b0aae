"""The ImageNet proxy set (real photos, built by ../shared/data/imagenet-proxy/build.py).

`DIR/index.csv` has one row per image: source, split, path (relative to DIR), synset,
class_index (standard 1000-class order). Sources mix 64-px Tiny ImageNet crops with
224-320-px Imagenette / Imagewoof photos and a few full-resolution ones, so batches are made
by random resized crops of the *original* image straight to the training size (Pillow's
`resize(box=...)`: one resampling, no intermediate full-size copy).

`ProxyAug.batch(n, step)` is a pure function of (seed, step): an epoch is a seeded permutation
of the training images and batch `step` takes the next n of that stream, so a run resumed at
any step (mid-epoch included) sees exactly the batches it would have seen. Nothing is held in
memory but the index and the current batch.

Held-out sets (`heldout`) are deterministic, evenly spread picks of a labelled split,
preprocessed exactly as the engine does (the model file's recipe), for selection by
1000-way top-1 and agreement with the FP32 teacher. The dev images are never read here.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import crop_box_wh
from .files import InputFileError

TRAIN_SOURCES = ("tiny", "nette", "woof", "imagen")


def read_index(root: str) -> list[dict]:
    path = Path(root) / "index.csv"
    if not path.is_file():
        raise InputFileError(f"{path}: no such file (build the proxy set with "
                             f"../shared/data/imagenet-proxy/build.py DIR ...)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"source", "split", "path", "class_index"}
    if not rows or not need <= set(rows[0]):
        raise InputFileError(f"{path}: expected columns {sorted(need)}")
    return rows


def _rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (512, 512))          # JPEG: decode large photos at a reduced scale
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise InputFileError(f"{path}: cannot read image ({e})") from None


class ProxyAug:
    """Augmented uint8-valued float NCHW batches of proxy training photos at size x size:
    random resized crops of min_area..1 of the image (aspect 3/4..4/3), horizontal flips, and
    with probability `mix` a blend with a second crop (half mixup 0.3-0.7, half CutMix)."""

    def __init__(self, root: str, size: int, seed: int = 0, sources=TRAIN_SOURCES,
                 split: str = "train", min_area: float = 0.25, mix: float = 0.0):
        rows = [r for r in read_index(root) if r["source"] in sources and r["split"] == split]
        if not rows:
            raise InputFileError(f"{root}/index.csv: no {split} images of {', '.join(sources)}")
        self.root, self.paths = Path(root), [r["path"] for r in rows]
        self.size, self.seed, self.min_area, self.mix = size, seed, min_area, mix
        self._perm_epoch, self._perm = -1, None

    def describe(self) -> str:
        return (f"{len(self.paths)} ImageNet-proxy train photos ({self.root}), random resized crops of "
                f"{self.min_area:g}-1 of the area at {self.size}px, flips"
                + (f", {self.mix:.0%} blended with another crop (mixup or CutMix)" if self.mix else ""))

    def _index(self, k: int) -> int:
        """Image of position k in the endless stream of seeded epoch permutations."""
        epoch, pos = divmod(k, len(self.paths))
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.paths), generator=g), epoch
        return int(self._perm[pos])

    def _view(self, i: int, g: torch.Generator) -> torch.Tensor:
        im = _rgb(self.root / self.paths[i])
        t, l, h, w = crop_box_wh(g, im.height, im.width, self.min_area)
        im = im.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(l, t, l + w, t + h))
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return x.flip(2) if float(torch.rand(1, generator=g)) < 0.5 else x

    def batch(self, n: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 9_000_011 + step)
        out = torch.empty(n, 3, self.size, self.size)
        for j in range(n):
            out[j] = self._view(self._index(step * n + j), g)
            if self.mix and float(torch.rand(1, generator=g)) < self.mix:
                other = self._view(int(torch.randint(0, len(self.paths), (1,), generator=g)), g)
                if float(torch.rand(1, generator=g)) < 0.5:
                    lam = float(torch.empty(1).uniform_(0.3, 0.7, generator=g))
                    out[j] = (lam * out[j] + (1 - lam) * other).round()
                else:
                    t, l, h, w = crop_box_wh(g, self.size, self.size, 0.2)
                    out[j, :, t:t + h, l:l + w] = other[:, t:t + h, l:l + w]
        return out


def heldout(root: str, sources, n: int, preprocess_spec: dict, input_spec: dict,
            split: str = "val") -> tuple[torch.Tensor, torch.Tensor, str]:
    """n labelled images of `split`, evenly spread over each source's sorted list (n split
    equally between sources), preprocessed as the engine does -> (uint8-valued float NCHW,
    labels, description)."""
    from ternet.preprocess import preprocess
    rows = read_index(root)
    xs, ys = [], []
    per = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
    for src, k in zip(sources, per):
        sel = sorted((r for r in rows if r["source"] == src and r["split"] == split),
                     key=lambda r: r["path"])
        if len(sel) < k:
            raise InputFileError(f"{root}/index.csv: {len(sel)} {src} {split} images, {k} needed")
        for r in (sel[int(i)] for i in np.linspace(0, len(sel) - 1, k).round()):
            xs.append(preprocess(str(Path(root) / r["path"]), preprocess_spec, input_spec))
            ys.append(int(r["class_index"]))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()
    return x, torch.tensor(ys), f"{n} {'+'.join(sources)} {split} images ({root})"
