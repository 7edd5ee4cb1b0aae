"""Image loading (modes, EXIF, bad files) and the model preprocessing recipe."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from crafted_images import all_nan_tiff, corrupt_exif_jpeg, two_colour_strip
from ternet import preprocess as pre
from ternet import quant
from ternet.preprocess import ImageError, load_image, preprocess, resize_and_crop

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
SPEC = dict(resize=40, crop=32, interpolation="bilinear", mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225], colour="RGB")
INPUT = dict(height=32, width=32, channels=3, layout="NHWC", dtype="uint8", scale=0.0187,
             zero_point=114)


def px(im, xy):
    return tuple(int(v) for v in im.getpixel(xy))


# ------------------------------------------------------------------ modes

def test_rgb_file_roundtrip(tmp_path):
    p = tmp_path / "a.png"
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(a).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(im), a)


@pytest.mark.parametrize("orientation,expect_size,first,last", [
    (1, (32, 16), RED, BLUE),      # as stored: red left half, blue right half
    (3, (32, 16), BLUE, RED),      # rotate 180
    (6, (16, 32), RED, BLUE),      # rotate 90 deg clockwise: the red left half goes up
    (8, (16, 32), BLUE, RED),      # rotate 90 deg counter-clockwise: the red half goes down
])
def test_exif_orientation_applied(tmp_path, orientation, expect_size, first, last):
    im = Image.new("RGB", (32, 16), BLUE)
    im.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == expect_size
    w, h = out.size
    far = (w - 3, 2) if w > h else (2, h - 3)          # the far end of the long side
    near = lambda a, b: max(abs(x - y) for x, y in zip(a, b)) < 40   # JPEG is lossy
    assert near(px(out, (2, 2)), first) and near(px(out, far), last)


def test_exif_orientation_on_pil_input():
    im = Image.new("RGB", (4, 2), BLUE)
    exif = im.getexif()
    exif[0x0112] = 6
    im.info["exif"] = exif.tobytes()
    assert load_image(im).size == (2, 4)


def test_grayscale_becomes_rgb():
    im = load_image(Image.new("L", (3, 2), 77))
    assert im.mode == "RGB" and px(im, (0, 0)) == (77, 77, 77)


def test_bilevel_becomes_rgb():
    im = load_image(Image.new("1", (3, 2), 1))
    assert px(im, (1, 1)) == WHITE


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image(im)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == WHITE                   # fully transparent -> background
    assert px(out, (1, 0)) == RED                     # opaque -> unchanged
    assert all(abs(v - 127) <= 1 for v in px(out, (2, 0)))   # half black over white


def test_la_composited_on_white():
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (10, 255))
    out = load_image(im)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (10, 10, 10)


def test_cmyk_converted(tmp_path):
    im = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 255, 255, 0))            # no cyan, full magenta+yellow = red
    p = tmp_path / "cmyk.jpg"
    im.save(p, quality=100)
    out = load_image(p)
    assert out.mode == "RGB"
    np.testing.assert_allclose(np.asarray(load_image(im))[1, 1], RED, atol=0)
    assert px(load_image(im), (0, 0)) == WHITE


def test_16bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 1000, 25700, 65535]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)                       # a 16-bit greyscale PNG
    assert Image.open(p).mode in ("I;16", "I")
    out = np.asarray(load_image(p))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 4, 100, 255])


def test_32bit_int_with_8bit_range_kept():
    im = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")
    np.testing.assert_array_equal(np.asarray(load_image(im))[0, :, 0], [0, 7, 255])


def test_float_unit_range_scaled():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    np.testing.assert_array_equal(np.asarray(load_image(im))[0, :, 0], [0, 128, 255])


def test_paletted(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    p = tmp_path / "pal.png"
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and px(out, (0, 0)) == RED and px(out, (1, 0)) == BLUE


def test_paletted_transparency_on_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    p = tmp_path / "pal.gif"
    im.save(p, transparency=1)
    out = load_image(p)
    assert px(out, (0, 0)) == RED and px(out, (1, 0)) == WHITE


def test_array_input():
    a = np.zeros((4, 5, 3), np.uint8)
    a[..., 1] = 200
    im = load_image(a)
    assert im.size == (5, 4) and px(im, (0, 0)) == (0, 200, 0)


@pytest.mark.parametrize("a", [np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.float32),
                               np.zeros((4, 5, 4), np.uint8), np.zeros((0, 5, 3), np.uint8)])
def test_bad_array_rejected(a):
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        load_image(a)


def test_wrong_type_rejected():
    with pytest.raises(TypeError):
        load_image(42)


# ------------------------------------------------------------------ bad files

def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        load_image(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(p)


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a picture\n")
    with pytest.raises(ImageError, match=r"notes\.txt: not an image"):
        load_image(p)


def test_corrupt_file(tmp_path):
    p = tmp_path / "junk.jpg"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match=r"junk\.jpg: "):
        load_image(p)


def test_truncated_jpeg(tmp_path):
    src = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    p = tmp_path / "cut.jpg"
    p.write_bytes(src.read_bytes()[:600])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(p)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


# ------------------------------------------------------------------ resize / crop / quantize

def column_image(w, h):
    """Pixel value = column index (mod 256) in every channel: crop offsets become visible."""
    a = np.broadcast_to((np.arange(w) % 256).astype(np.uint8)[None, :, None], (h, w, 3))
    return Image.fromarray(np.ascontiguousarray(a))


@pytest.mark.parametrize("w,crop,left", [(227, 224, 2), (229, 224, 2), (226, 224, 1), (5, 2, 2)])
def test_center_crop_uses_torchvision_rounding(w, crop, left):
    # torchvision: crop_left = int(round((W - crop) / 2.0)), Python's round half to even
    out = np.asarray(resize_and_crop(column_image(w, crop), None, crop))
    assert out.shape == (crop, crop, 3) and out[0, 0, 0] == left


def test_crop_larger_than_image_pads_black():
    out = np.asarray(resize_and_crop(Image.new("RGB", (3, 6), WHITE), None, 6))
    # torchvision pads left (6-3)//2 = 1 and right 2 columns with zeros
    assert out[:, 0].max() == 0 and out[:, 1:4].min() == 255 and out[:, 4:].max() == 0


@pytest.mark.parametrize("size,expect", [((451, 300), (384, 256)), ((300, 451), (256, 384)),
                                         ((256, 256), (256, 256)), ((100, 50), (512, 256))])
def test_resize_shorter_side(size, expect):
    # torchvision Resize(256): new_long = int(256 * long / short)
    seen = []
    im = Image.new("RGB", size, RED)
    orig = Image.Image.resize

    def spy(self, s, *a, **k):
        seen.append(s)
        return orig(self, s, *a, **k)

    Image.Image.resize = spy
    try:
        out = resize_and_crop(im, 256, 224)
    finally:
        Image.Image.resize = orig
    assert out.size == (224, 224)
    assert (seen[0] if seen else size) == expect


def test_resize_matches_pillow_bicubic():
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    out = resize_and_crop(im, 40, 32, "bicubic")
    ref = im.resize((60, 40), Image.Resampling.BICUBIC).crop((14, 4, 46, 36))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        resize_and_crop(Image.new("RGB", (8, 8)), 8, 8, "lanczos")


def test_preprocess_pipeline_matches_definition():
    rng = np.random.default_rng(4)
    im = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    q = preprocess(im, SPEC, INPUT)
    assert q.dtype == np.uint8 and q.shape == (32, 32, 3) and q.flags.c_contiguous
    # the definition, written out: resize 50x70 -> 40x56, crop left 12, top 4, float32 math
    r = np.asarray(im.resize((56, 40), Image.Resampling.BILINEAR))[4:36, 12:44]
    x = (r.astype(np.float32) / np.float32(255) - np.float32(SPEC["mean"])) / np.float32(SPEC["std"])
    np.testing.assert_array_equal(q, quant.quantize_activation(x, INPUT["scale"], INPUT["zero_point"]))


def test_preprocess_constant_image():
    q = preprocess(np.full((32, 32, 3), 124, np.uint8), SPEC, INPUT)
    x = (np.float32(124) / np.float32(255) - np.float32(0.485)) / np.float32(0.229)
    expect = int(np.floor(np.float32(x) / np.float32(INPUT["scale"]) + np.float32(114.5)))
    assert q[0, 0, 0] == expect and np.all(q[..., 0] == expect)


def test_preprocess_rejects_inconsistent_spec():
    with pytest.raises(ValueError, match="does not match"):
        preprocess(Image.new("RGB", (40, 40)), dict(SPEC, crop=30), INPUT)


def test_preprocess_grayscale_path(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (40, 40), 124).save(p)
    a = preprocess(p, SPEC, INPUT)
    b = preprocess(np.full((40, 40, 3), 124, np.uint8), SPEC, INPUT)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bounded memory, warnings

HOSTILE_STRIPS = [(20000, 1), (100000, 1), (1, 100000)]    # ~100-400 bytes as PNG
SPEC_224 = dict(SPEC, resize=256, crop=224)
INPUT_224 = dict(INPUT, height=224, width=224)


@pytest.mark.parametrize("w,h", HOSTILE_STRIPS)
def test_extreme_aspect_ratio_is_cropped_from_the_source(tmp_path, w, h):
    # Resize(256) would make these 5,120,000 x 256 (5.3 GB) or 25,600,000 x 256 pixels.
    p = tmp_path / "strip.png"
    Image.fromarray(two_colour_strip(w, h)).save(p)
    out = np.asarray(resize_and_crop(load_image(p), 256, 224))
    assert out.shape == (224, 224, 3)
    # the crop is centred on the red/blue boundary: red at one end, blue at the other
    first, last = (out[:, 0], out[:, -1]) if w > h else (out[0], out[-1])
    assert (first[:, 0] > 200).all() and (first[:, 2] < 55).all()
    assert (last[:, 2] > 200).all() and (last[:, 0] < 55).all()
    q = preprocess(p, SPEC_224, INPUT_224)
    assert q.shape == (224, 224, 3) and q.dtype == np.uint8


PEAK_RSS_SCRIPT = """
import json, resource, sys
import numpy as np
from ternet.preprocess import preprocess
spec, inp = json.loads(sys.argv[1]), json.loads(sys.argv[2])
preprocess(np.zeros((8, 8, 3), np.uint8), spec, inp)      # imports and first-use allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[3:]:
    preprocess(path, spec, inp)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kB on Linux")
def test_extreme_aspect_ratio_peak_memory_is_bounded(tmp_path):
    """Peak RSS growth while preprocessing the hostile strips, in a fresh process. Building
    the resized image whole took 5.3 GB for 20000 x 1 and tried ~26 GB for 100000 x 1."""
    paths = []
    for w, h in HOSTILE_STRIPS:
        paths.append(tmp_path / f"{w}x{h}.png")
        Image.fromarray(two_colour_strip(w, h)).save(paths[-1])
    r = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, json.dumps(SPEC_224),
                        json.dumps(INPUT_224),
                        *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 64 * 1024, f"peak RSS grew by {int(r.stdout)} kB"


@pytest.mark.parametrize("interpolation,image", [("bilinear", "noise"), ("bicubic", "smooth")])
def test_bounded_path_matches_full_resize(monkeypatch, interpolation, image):
    """Forced onto the bounded path, the crop is where a full resize puts it (a one-pixel shift
    on noise would differ by ~100). Values may differ by one rounding step (Pillow takes the
    window's corners as float32); with bicubic, by two on a smooth image (on noise, Pillow's
    pass order decides how overshoot is clipped, so that case is not compared)."""
    rng = np.random.default_rng(11)
    cases = [((700, 23), 40, 32), ((23, 700), 40, 32), ((2900, 61), 50, 48), ((9, 450), 20, 30),
             ((451, 300), 40, 32), ((300, 451), 64, 60), ((1000, 3), 12, 16)]
    for (w, h), resize, crop in cases:
        if image == "noise":
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            a = np.stack([128 + 90 * np.sin(xx / 7 + yy / 11), 128 + 90 * np.cos(xx / 5),
                          128 + 90 * np.sin(yy / 3)], -1).round().astype(np.uint8)
        im = Image.fromarray(a)
        full = np.asarray(resize_and_crop(im, resize, crop, interpolation)).astype(int)
        monkeypatch.setattr(pre, "MAX_RESIZED_PIXELS", 0)
        bounded = np.asarray(resize_and_crop(im, resize, crop, interpolation)).astype(int)
        monkeypatch.undo()
        tol = 1 if interpolation == "bilinear" else 2
        assert np.abs(full - bounded).max() <= tol, ((w, h), resize, crop)


def test_aspect_ratio_at_the_limit_takes_the_exact_path():
    # 512 x 2 -> Resize(256) -> 65536 x 256 = MAX_RESIZED_PIXELS: still built whole
    im = Image.fromarray(np.random.default_rng(12).integers(0, 256, (2, 512, 3), dtype=np.uint8))
    assert 65536 * 256 == pre.MAX_RESIZED_PIXELS
    ref = im.resize((65536, 256), Image.Resampling.BILINEAR).crop((32656, 16, 32880, 240))
    np.testing.assert_array_equal(np.asarray(resize_and_crop(im, 256, 224)), np.asarray(ref))


def test_decoded_pixel_cap_refuses_other_formats(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (40, 30), RED).save(p)
    monkeypatch.setattr(pre, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert str(e.value) == f"{p}: image is 40 x 30 pixels, more than the 1000-pixel limit"


def test_decoded_pixel_cap_decodes_jpeg_smaller(tmp_path, monkeypatch):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (100, 80), (200, 40, 90)).save(p, quality=95)
    assert load_image(p).size == (100, 80)                  # under the cap: decoded whole
    monkeypatch.setattr(pre, "MAX_PIXELS", 1000)
    im = load_image(p)          # 1/2 scale is 50 x 40 = 2000 pixels: too many; 1/4 fits
    assert im.size == (25, 20)
    assert np.abs(np.asarray(im).astype(int) - (200, 40, 90)).max() <= 8


def test_corrupt_exif_is_ignored_without_a_warning(tmp_path):
    p = corrupt_exif_jpeg(tmp_path / "exif.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # any warning that escapes fails the test
        im = load_image(p)
    assert im.size == (40, 40)
    assert max(abs(a - b) for a, b in zip(px(im, (20, 20)), (10, 200, 30))) < 8


def test_all_nan_float_image_is_an_image_error(tmp_path):
    p = all_nan_tiff(tmp_path / "nan.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # numpy's "All-NaN slice" must not escape
        with pytest.raises(ImageError, match=r"nan\.tif: float image whose pixels are all NaN"):
            load_image(p)


def test_partly_nan_float_image_counts_nan_as_black():
    a = np.array([[np.nan, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(a, "F")))[0, :, 0],
                                  [0, 128, 255])


def test_image_extensions_are_readable_by_pillow():
    Image.init()
    registered = Image.registered_extensions()
    for ext in pre.IMAGE_EXTENSIONS:
        fmt = registered.get(ext)
        # MPO files are opened by the JPEG plugin; a plugin missing from this Pillow is fine
        assert fmt is None or fmt in Image.OPEN or fmt == "MPO", ext
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"} <= pre.IMAGE_EXTENSIONS
    assert not {".pdf", ".txt", ".eps", ".h5", ".mpg"} & pre.IMAGE_EXTENSIONS
