"""Small crafted image files that once made ternet print warnings or allocate gigabytes."""
import io
import struct

import numpy as np
from PIL import Image


def corrupt_exif_jpeg(path, colour=(10, 200, 30)):
    """A valid 40x40 JPEG whose EXIF block claims one IFD entry and ends before it (Pillow:
    UserWarning 'Corrupt EXIF data')."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + b"\xff\xff"
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    path.write_bytes(jpeg[:2] + app1 + jpeg[2:])
    return path


def all_nan_tiff(path):
    """A 32-bit float greyscale TIFF with every pixel NaN (numpy: 'All-NaN slice')."""
    Image.fromarray(np.full((4, 5), np.nan, np.float32), "F").save(path)
    return path


def bomb_png(path):
    """9500 x 9500 bilevel PNG, ~11 kB: 90,250,000 pixels, over Pillow's default
    MAX_IMAGE_PIXELS (DecompressionBombWarning) and over ternet's MAX_PIXELS."""
    Image.new("1", (9500, 9500)).save(path)
    return path


def two_colour_strip(w, h):
    """HxWx3 uint8: first half red, second half blue, along the long side."""
    a = np.zeros((h, w, 3), np.uint8)
    if w >= h:
        a[:, : w // 2], a[:, w // 2:] = (255, 0, 0), (0, 0, 255)
    else:
        a[: h // 2], a[h // 2:] = (255, 0, 0), (0, 0, 255)
    return a
