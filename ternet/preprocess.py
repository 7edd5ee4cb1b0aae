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
  torchvision's rounded offsets (`int(round((H - crop) / 2))`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .quant import quantize_activation

__all__ = ["ImageError", "load_image", "preprocess", "resize_and_crop"]

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An input could not be read as an image; the message names the file and the reason."""


def load_image(src: Any) -> Image.Image:
    """Path, PIL image or HxWx3 uint8 array -> upright RGB PIL image (8 bits per channel)."""
    if isinstance(src, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(src), "<PIL image>")
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, (str, os.PathLike)):
        return _open(os.fspath(src))
    raise TypeError(f"expected a path, a PIL image or a uint8 array, not {type(src).__name__}")


def _open(path: str) -> Image.Image:
    try:
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a directory")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: empty file")
        with Image.open(path) as im:
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
        im = _wide_to_l(im)
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


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L' by scaling, not clipping."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        a = a * (255.0 / top)
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0                       # 65535 -> 255 exactly
    a = np.nan_to_num(a, nan=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def resize_and_crop(im: Image.Image, resize: int | None, crop: int,
                    interpolation: str = "bilinear") -> Image.Image:
    """torchvision Resize(resize) + CenterCrop(crop) on an RGB PIL image -> crop x crop image."""
    if interpolation not in _FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of "
                         f"{sorted(_FILTERS)}")
    w, h = im.size
    if resize:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(resize * long / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        if size != (w, h):
            im = im.resize(size, _FILTERS[interpolation])
        w, h = im.size
    if w < crop or h < crop:
        # torchvision pads with zeros (black) before cropping an image smaller than the crop.
        canvas = Image.new("RGB", (max(w, crop), max(h, crop)), (0, 0, 0))
        canvas.paste(im, ((max(crop - w, 0)) // 2, (max(crop - h, 0)) // 2))
        im, (w, h) = canvas, canvas.size
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


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
