"""Image loading and the model's evaluation preprocessing, with Pillow only.

`load_image` turns a path, a PIL image or an HxWx3 uint8 array into an upright 8-bit RGB PIL
image; `preprocess` applies a model file's `ternet.preprocess` recipe (docs/format.md) and its
input quantization, giving the uint8 HxWx3 array the graph consumes.

Choices worth knowing (each is a place where pipelines silently disagree):

* EXIF orientation is applied (`ImageOps.exif_transpose`): Pillow does not rotate on open, and
  phone photos are often stored sideways with an orientation tag.
* Transparency (RGBA, LA, paletted with a transparent index) is composited onto **white**, not
  dropped: the colour stored under fully transparent pixels is arbitrary (often black), and
  cut-out objects are meant to be seen on a light page.
* 16-bit and 32-bit integer greyscale ('I;16*', 'I') is *scaled* to 8 bits (x / 257), not
  clipped, so a 16-bit scan does not turn white. Mode 'I' holds 16-bit data in practice (old
  Pillow 16-bit PNGs); if all its values are <= 255 it is taken as already 8-bit. Float
  greyscale ('F') is taken as [0, 1] if its maximum is <= 1, else as [0, 255].
* CMYK uses Pillow's plain conversion (no ICC colour management).
* Multi-frame files (GIF, TIFF) use their first frame.
* Resize follows torchvision `Resize(int)` on PIL images: the shorter side becomes `resize`,
  the longer `int(resize * long / short)`, Pillow's antialiased filter; the center crop uses
  torchvision's rounded offsets (`int(round((H - crop) / 2))`) and its black padding.
* Memory is bounded for any input. A file may decode to at most `MAX_PIXELS` pixels: a larger
  JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`) to fit, any
  other file is refused. A resized image larger than `MAX_RESIZED_PIXELS` (only extreme aspect
  ratios: a 20000 x 1 strip becomes 5,120,000 x 256) is never built: the crop window is
  resampled straight from the source pixels under it. The geometry is torchvision's, the
  values can differ from a full resize by one rounding step (Pillow takes the window's
  corners as float32), with bicubic more at sharp edges (Pillow may then run its horizontal
  and vertical passes in the other order, which clips overshoot differently). Ordinary
  images take the exact path.
* Warnings raised while decoding (Pillow's `Corrupt EXIF data`, `DecompressionBombWarning`)
  never reach stderr: corrupt pixel data raises, corrupt metadata is ignored (an unreadable
  EXIF block means no orientation), sizes are checked here. `TERNET_DEBUG=1` shows them.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import config
from .quant import quantize_activation

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "MAX_PIXELS", "MAX_RESIZED_PIXELS", "load_image",
           "preprocess", "resize_and_crop"]

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_SUPPORT = {Image.Resampling.BILINEAR: 1.0, Image.Resampling.BICUBIC: 2.0}   # filter radius, px
_BACKGROUND = (255, 255, 255)

# Pillow's default Image.MAX_IMAGE_PIXELS (~256 MiB as 8-bit RGB), applied to what is decoded.
MAX_PIXELS = 89_478_485
# Largest Resize(int) result built whole (64 MiB as Pillow stores RGB): aspect ratios up to
# 256:1 at resize 256 stay on the exact torchvision path.
MAX_RESIZED_PIXELS = 1 << 24

# File extensions a directory search picks up: raster formats Pillow decodes by itself. Not
# Pillow's registered_extensions(), which include formats it can only write (.pdf) or only
# identify (.h5, .grib, .mpg, .wmf) or needs Ghostscript for (.eps, .ps). A file named
# explicitly is always tried, whatever its extension.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".gif", ".webp", ".avif",
    ".bmp", ".dib", ".tif", ".tiff", ".tga", ".ico", ".qoi", ".ppm", ".pgm", ".pbm", ".pnm",
    ".jp2", ".j2k", ".jpx", ".jpf", ".psd", ".pcx", ".sgi", ".dds",
})


class ImageError(ValueError):
    """An input could not be read as an image; the message names the file and the reason."""


def load_image(src: Any) -> Image.Image:
    """Path, PIL image or HxWx3 uint8 array -> upright RGB PIL image (8 bits per channel)."""
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if not isinstance(src, (Image.Image, str, os.PathLike)):
        raise TypeError(f"expected a path, a PIL image or a uint8 array, not {type(src).__name__}")
    name = "<PIL image>" if isinstance(src, Image.Image) else os.fspath(src)
    # A problem is reported as one ImageError line; a warning must not print lines of its own.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(src, Image.Image):
            im = _to_rgb(ImageOps.exif_transpose(src), name)
        else:
            im = _open(name)
    if config.get("TERNET_DEBUG"):
        for w in caught:
            print(f"ternet: {name}: ignored {w.category.__name__}: {w.message}", file=sys.stderr)
    return im


def _open(path: str) -> Image.Image:
    try:
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a directory")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: empty file")
        with Image.open(path) as im:
            _fit_decoded_size(im, path)
            im.load()                       # decode now, so truncated data fails here
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised file format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused, image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated or corrupt data as OSError (sometimes SyntaxError/ValueError).
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def _fit_decoded_size(im: Image.Image, path: str) -> None:
    """Make an opened (not yet decoded) file decode to at most MAX_PIXELS, or raise ImageError."""
    w, h = im.size
    if w * h <= MAX_PIXELS:
        return
    # Only JPEG can decode smaller (Image.draft is a no-op elsewhere); 1/8 fits any JPEG.
    s = next((s for s in (2, 4, 8) if math.ceil(w / s) * math.ceil(h / s) <= MAX_PIXELS), 8)
    im.draft(None, (max(w // s, 1), max(h // s, 1)))
    if im.size[0] * im.size[1] > MAX_PIXELS:
        raise ImageError(f"{path}: image is {w} x {h} pixels, more than the "
                         f"{MAX_PIXELS}-pixel limit")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ImageError(f"<array>: expected an HxWx3 uint8 RGB array, got shape {a.shape} "
                         f"dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()                    # detach from the file and from the caller's image
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode.startswith("I") or mode == "F":
        im = _wide_to_l(im, name)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from None


def _wide_to_l(im: Image.Image, name: str) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L' by scaling, not clipping."""
    a = np.asarray(im).astype(np.float64)   # the one full-size temporary: the rest is in place
    if im.mode == "F":
        if a.size and np.isnan(a).all():
            raise ImageError(f"{name}: float image whose pixels are all NaN")
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        a *= 255.0 / top
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a /= 257.0                          # 65535 -> 255 exactly
    np.nan_to_num(a, copy=False, nan=0.0)
    np.clip(np.rint(a, out=a), 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8), "L")


def resize_and_crop(im: Image.Image, resize: int | None, crop: int,
                    interpolation: str = "bilinear") -> Image.Image:
    """torchvision Resize(resize) + CenterCrop(crop) on an RGB PIL image -> crop x crop image."""
    if interpolation not in _FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of "
                         f"{sorted(_FILTERS)}")
    size = _resized_size(im.size, resize) if resize else im.size
    # the crop window in resized coordinates; where it overhangs, Image.crop fills with zeros,
    # which is torchvision's black padding of an image smaller than the crop
    left, top = (_crop_offset(n, crop) for n in size)
    window = (left, top, left + crop, top + crop)
    if size == im.size:
        return im.crop(window)
    if size[0] * size[1] <= MAX_RESIZED_PIXELS:
        return im.resize(size, _FILTERS[interpolation]).crop(window)
    return _resample_window(im, size, window, _FILTERS[interpolation])


def _resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `resize`, the aspect ratio is kept."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    return (resize, new_long) if w <= h else (new_long, resize)


def _crop_offset(n: int, crop: int) -> int:
    """Where a centered crop starts along a side of n pixels (negative: padded on both sides)."""
    if n >= crop:
        return int(round((n - crop) / 2.0))      # torchvision's rounding, half to even
    return -((crop - n) // 2)                    # torchvision pads (crop - n) // 2 before


def _resample_window(im: Image.Image, size: tuple[int, int], window: tuple[int, int, int, int],
                     resample) -> Image.Image:
    """`im.resize(size, resample).crop(window)` without building the resized image: the
    source pixels under the window (plus the filter's reach) are cut out and resampled."""
    (w, h), (nw, nh) = im.size, size
    left, top, right, bottom = window
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, nw), min(bottom, nh)
    sx, sy = w / nw, h / nh
    # how far the filter reaches into the source (+1: Pillow rounds its tap range)
    mx = _SUPPORT[resample] * max(sx, 1.0) + 1
    my = _SUPPORT[resample] * max(sy, 1.0) + 1
    c0, c1 = max(math.floor(x0 * sx - mx), 0), min(math.ceil(x1 * sx + mx), w)
    r0, r1 = max(math.floor(y0 * sy - my), 0), min(math.ceil(y1 * sy + my), h)
    # box relative to the cut: small numbers, which Pillow's float32 box holds closely
    inside = im.crop((c0, r0, c1, r1)).resize(
        (x1 - x0, y1 - y0), resample, box=(x0 * sx - c0, y0 * sy - r0, x1 * sx - c0, y1 * sy - r0))
    if (x0, y0, x1, y1) == window:
        return inside
    out = Image.new("RGB", (right - left, bottom - top), (0, 0, 0))
    out.paste(inside, (x0 - left, y0 - top))
    return out


def preprocess(image: Any, preprocess_spec: Mapping[str, Any],
               input_spec: Mapping[str, Any]) -> np.ndarray:
    """Image (anything `load_image` takes) -> uint8 [H, W, 3] quantized model input."""
    im = load_image(image)
    crop = int(preprocess_spec["crop"])
    if (int(input_spec["height"]), int(input_spec["width"])) != (crop, crop):
        raise ValueError(f"preprocess crop {crop} does not match the model input "
                         f"{input_spec['height']}x{input_spec['width']}")
    im = resize_and_crop(im, preprocess_spec.get("resize"), crop,
                         preprocess_spec.get("interpolation", "bilinear"))
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)   # torchvision ToTensor, float32
    colour = preprocess_spec.get("colour", "RGB")
    if colour == "BGR":
        x = x[:, :, ::-1]
    elif colour != "RGB":
        raise ValueError(f"unknown colour order {colour!r}; expected 'RGB' or 'BGR'")
    mean = np.asarray(preprocess_spec["mean"], np.float32)
    std = np.asarray(preprocess_spec["std"], np.float32)
    x = (x - mean) / std                                        # Normalize, float32
    q = quantize_activation(x, input_spec["scale"], input_spec["zero_point"])
    return np.ascontiguousarray(q, dtype=np.uint8)
