"""Data: CIFAR-10 training images (upscaled, augmented), synthetic images from `synth` files
(mixed into CIFAR batches by `MixedAug`) and the ImageNet dev images.

Training, calibration and selection use ONLY CIFAR-10 *train* images, split by index: every
10th image is held out (`split="heldout"`, for sensitivity / validation losses), the rest is
`split="train"`, and synthetic images made from them and the FP32 teacher. The ImageNet dev
images are loaded only by `load_dev` for reporting.

Model inputs are uint8 pixels: both architectures' input quantization maps a pixel to itself
(Lite0: mean 127/255, std 128/255, scale 1/128, zero point 127), so a batch is produced as
uint8-valued float NCHW tensors and the real input is `graph.input_real(x)`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ternet import config

from .files import InputFileError, load_pt

# Data locations are settings: the project's shared folder (../shared beside the checkout by
# default; --shared or TERNET_SHARED_DIR) and a cache for unpacked data (--cache or
# TERNET_TRAIN_CACHE, default the user cache dir). Nothing of a particular machine is hard-coded.
_SHARED = config.get("TERNET_SHARED_DIR") or str(Path(__file__).resolve().parents[3] / "shared")
_CACHE = config.get("TERNET_TRAIN_CACHE") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ternet" / "train")


def set_locations(shared: str | None = None, cache: str | None = None) -> None:
    """Where the shared data (CIFAR archive, dev images, class list) and the data cache are."""
    global _SHARED, _CACHE
    _SHARED, _CACHE = shared or _SHARED, cache or _CACHE


def shared_path(*parts: str) -> Path:
    return Path(_SHARED, "data", *parts)


def cifar_u8(root: str | None = None) -> np.ndarray:
    """All CIFAR-10 train images as uint8 [50000, 32, 32, 3] in a fixed (sorted path) order."""
    root = root or str(Path(_CACHE) / "cifar10")
    cache = Path(root) / "train_u8.npy"
    if cache.exists():
        return np.load(cache)
    from PIL import Image
    if not (Path(root) / "train").is_dir():
        tar = shared_path("cifar10-jpg.tar.gz")
        if not tar.is_file():
            raise InputFileError(f"{tar}: no such file (the CIFAR-10 JPEG archive, unpacked "
                                 f"once into {root}; set --shared)")
        import tarfile
        with tarfile.open(tar) as t:
            t.extractall(root)
    paths = sorted((Path(root) / "train").glob("*/*.jpg"))
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    return arr


def split_indices(n: int, split: str) -> np.ndarray:
    idx = np.arange(n)
    return idx[idx % 10 == 0] if split == "heldout" else idx[idx % 10 != 0]



def crop_box(g: torch.Generator, s: int, min_area: float) -> tuple[int, int, int, int]:
    """A random resized crop's box (top, left, height, width) in an s x s image."""
    return crop_box_wh(g, s, s, min_area)


def crop_box_wh(g: torch.Generator, height: int, width: int, min_area: float) -> tuple[int, int, int, int]:
    """A random resized crop's box (top, left, height, width) in a height x width image:
    min_area..1 of the area, aspect ratio 3/4..4/3 (log-uniform), drawn from g in a fixed
    order (for a square image the same numbers as the square-only formula it replaced)."""
    area = float(torch.empty(1).uniform_(min_area, 1.0, generator=g))
    logr = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g))
    w = max(1, int(round(min(width, width * np.sqrt(area * np.exp(logr) * (height / width))))))
    h = max(1, int(round(min(height, height * np.sqrt(area / np.exp(logr) * (width / height))))))
    t = int(torch.randint(0, height - h + 1, (1,), generator=g))
    l = int(torch.randint(0, width - w + 1, (1,), generator=g))  # noqa: E741
    return t, l, h, w


class CifarAug:
    """Upscaled, augmented CIFAR batches at `size` x `size`: random resized crops + flips, 2x2
    mosaics of four images and mixup blends (ImageNet-like statistics: several objects per
    frame, larger apparent scale range). Deterministic given (seed, step)."""

    def __init__(self, images: np.ndarray, size: int, split: str = "train", seed: int = 0,
                 p_mosaic: float = 0.4, p_mix: float = 0.2, plain: bool = False):
        self.x = torch.from_numpy(images[split_indices(len(images), split)]).permute(0, 3, 1, 2).float()
        self.size, self.seed, self.plain = size, seed, plain
        self.p_mosaic, self.p_mix = p_mosaic, p_mix

    def _crop(self, g, i, size):
        img = self.x[i]
        if self.plain:
            return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        t, l, h, w = crop_box(g, 32, 0.25)
        c = img[:, t:t + h, l:l + w]
        if float(torch.rand(1, generator=g)) < 0.5:
            c = c.flip(2)
        return F.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False)[0]

    def batch(self, n: int, step: int) -> torch.Tensor:
        """uint8-valued float NCHW batch number `step`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pick = lambda: int(torch.randint(0, len(self.x), (1,), generator=g))  # noqa: E731
        out = torch.empty(n, 3, self.size, self.size)
        s, h = self.size, self.size // 2
        for j in range(n):
            r = float(torch.rand(1, generator=g))
            if self.plain:
                out[j] = self._crop(g, (step * n + j) % len(self.x), s)
            elif r < self.p_mosaic:
                for (a, b) in ((0, 0), (0, h), (h, 0), (h, h)):
                    out[j, :, a:a + h, b:b + h] = self._crop(g, pick(), h)
            elif r < self.p_mosaic + self.p_mix:
                lam = float(torch.empty(1).uniform_(0.3, 0.7, generator=g))
                out[j] = lam * self._crop(g, pick(), s) + (1 - lam) * self._crop(g, pick(), s)
            else:
                out[j] = self._crop(g, pick(), s)
        return out.round_().clamp_(0, 255)


def load_synth(path: str, size: int | None) -> torch.Tensor:
    """uint8-valued float images of a synth file (or of comma-separated files, concatenated),
    resized to size x size if needed (size None: as stored)."""
    return load_synth_described(path, size)[0]


def load_synth_described(path: str, size: int | None) -> tuple[torch.Tensor, str]:
    """load_synth's images, and where they came from: each file's count and creating command
    (synthesis is deterministic per batch, so the first n images of that command are these).
    Each file is read once."""
    files = [(p, load_pt(p, "synth file", ("images",))) for p in path.split(",") if p]
    syn = [d["images"].float() for _, d in files]
    sizes = {x.shape[-1] for x in syn}
    if size is None and len(sizes) > 1:
        raise InputFileError(f"{path}: files of different image sizes {sorted(sizes)}")
    images = torch.cat([x if size is None or x.shape[-1] == size else _resize(x, size) for x in syn])
    described = "; ".join(f"{p}: the first {len(d['images'])} images of `{d.get('command', '?')}`"
                          for p, d in files)
    return images, described


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).round().clamp(0, 255)


class MixedAug:
    """A CifarAug whose batches have a fraction `frac` of synthetic images (random picks, random
    horizontal flips and, with crop < 1, random resized crops of crop..1 of the area, resized
    back), deterministic given (seed, step) like CifarAug. Each view gets its own teacher
    logits, so a crop that loses the synthesised class evidence is still a valid KD example.
    With mix > 0 that fraction of the synthetic views is blended with another synthetic image,
    half by mixup (weight 0.3..0.7), half by pasting a random box of it (CutMix): new inputs
    from the same few images, each labelled by the teacher itself. mix = 0 draws exactly the
    batches it drew before the option existed."""

    def __init__(self, aug, synth: torch.Tensor, frac: float, seed: int, crop: float = 1.0,
                 mix: float = 0.0):
        self.aug, self.synth, self.frac, self.seed, self.crop, self.mix = aug, synth, frac, seed, crop, mix

    def batch(self, n: int, step: int) -> torch.Tensor:
        k = int(round(n * self.frac))
        g = torch.Generator().manual_seed(self.seed * 7_000_003 + step)
        pick = self.synth[torch.randint(0, len(self.synth), (k,), generator=g)]
        flip = torch.rand(k, generator=g) < 0.5
        pick[flip] = pick[flip].flip(3)
        if self.crop < 1.0:
            pick = torch.stack([self._crop(x, g) for x in pick])
        if self.mix > 0:
            pick = torch.stack([self._blend(x, g) if float(torch.rand(1, generator=g)) < self.mix else x
                                for x in pick])
        return torch.cat([self.aug.batch(n - k, step), pick]) if k < n else pick

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t, l, h, w = crop_box(g, x.shape[-1], self.crop)
        return _resize(x[None, :, t:t + h, l:l + w], x.shape[-1])[0]

    def _blend(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        other = self.synth[int(torch.randint(0, len(self.synth), (1,), generator=g))]
        if float(torch.rand(1, generator=g)) < 0.5:
            lam = float(torch.empty(1).uniform_(0.3, 0.7, generator=g))
            return (lam * x + (1 - lam) * other).round()
        t, l, h, w = crop_box(g, x.shape[-1], 0.2)
        out = x.clone()
        out[:, t:t + h, l:l + w] = other[:, t:t + h, l:l + w]
        return out


def load_dev(preprocess_spec: dict, input_spec: dict, root: str | None = None):
    """ImageNet dev images (reporting only) -> (uint8 NCHW-valued float tensor, labels, names)."""
    from ternet.preprocess import preprocess
    root = root or str(shared_path("imagenet-sample-dev"))
    cls = {syn: int(i) for i, syn, _ in _class_rows()}
    paths = sorted(Path(root).glob("*.JPEG"))
    if not paths:
        raise InputFileError(f"{root}: no *.JPEG images (the ImageNet dev sample)")
    xs = np.stack([preprocess(str(p), preprocess_spec, input_spec) for p in paths])
    labels = np.array([cls[p.name.split("_")[0]] for p in paths])
    return torch.from_numpy(xs).permute(0, 3, 1, 2).float(), labels, [p.name for p in paths]


def _class_rows() -> list[list[str]]:
    """(index, synset, name) rows of the 1000 ImageNet classes."""
    tsv = shared_path("imagenet_classes.tsv")
    if not tsv.is_file():
        raise InputFileError(f"{tsv}: no such file (the ImageNet class list; set --shared)")
    return [r.split("\t") for r in tsv.read_text().splitlines()[1:]]


def imagenet_labels() -> list[str]:
    return [name for _, _, name in _class_rows()]
