"""Image loading (modes, EXIF, bad files) and the model preprocessing recipe."""
import numpy as np
import pytest
from PIL import Image

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
