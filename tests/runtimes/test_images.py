"""g3export.runtimes.images against transformers' Gemma3ImageProcessorPil (the PIL backend; the
torchvision backend is not installed here): preprocessing of real PNG / JPEG / WebP files
(non-square, RGBA, LA, palette with transparency, grayscale, CMYK), Pan & Scan crops on several
aspect ratios, and every kind of bad file raising ImageError with a message that says what to do.

Unsupported format used in the tests: TGA. Pillow reads it, but it is not one of the formats we
document (PNG, JPEG, WebP, GIF, BMP), so load_image refuses it by name.
"""

from __future__ import annotations

import numpy as np
import pytest

from g3export.modeling.config import preset
from g3export.runtimes.images import (ImageError, load_image, pan_and_scan_boxes, pan_and_scan_crops,
                                      prepare_images, preprocess)

Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

TINY = preset("tiny-vision")    # image_size 32
FULL = preset("4b")             # image_size 896


def _hf_processor(size: int) -> Gemma3ImageProcessorPil:
    # The values a Gemma 3 preprocessor_config.json holds (do_pan_and_scan etc. come from the
    # Gemma3Processor's defaults when null).
    return Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, rescale_factor=1 / 255, resample=2,
                                   do_convert_rgb=True)


def _pixels(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """A smooth gradient plus noise: resizing has real work to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) % 97) * 2.6,
                     rng.uniform(0, 255, (h, w))], -1)[..., :c]
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    files = {}

    def save(name, img, **kw):
        files[name] = d / name
        img.save(files[name], **kw)

    save("wide_rgb.png", Image.fromarray(_pixels(45, 130, 3, 0)))
    save("tall_rgb.jpg", Image.fromarray(_pixels(300, 70, 3, 1)), quality=90)
    save("square.webp", Image.fromarray(_pixels(64, 64, 3, 2)), quality=80)
    save("rgba.png", Image.fromarray(_pixels(50, 77, 4, 3), "RGBA"))
    save("rgba.webp", Image.fromarray(_pixels(33, 41, 4, 4), "RGBA"), lossless=True)
    save("gray.png", Image.fromarray(_pixels(40, 90, 1, 5)[..., 0], "L"))
    save("gray.jpg", Image.fromarray(_pixels(120, 60, 1, 6)[..., 0], "L"))
    la = Image.fromarray(_pixels(30, 30, 4, 7)[..., [0, 3]].copy(), "LA")
    save("la.png", la)
    pal = Image.fromarray(_pixels(48, 36, 3, 8)).quantize(16)
    save("palette_transparent.png", pal, transparency=3)
    save("cmyk.jpg", Image.fromarray(_pixels(37, 52, 4, 9), "CMYK"))
    save("anim.gif", Image.fromarray(_pixels(20, 50, 3, 10)).convert("P"))
    save("big_wide.png", Image.fromarray(_pixels(400, 1000, 3, 11)))
    save("big_tall.jpg", Image.fromarray(_pixels(1100, 300, 3, 12)), quality=95)
    return files


@pytest.mark.parametrize("cfg", [TINY, FULL], ids=["32px", "896px"])
def test_preprocess_matches_hf(image_files, cfg):
    s = cfg.vision.image_size
    hf = _hf_processor(s)
    for name, path in image_files.items():
        ours = preprocess(load_image(path), cfg)
        assert ours.shape == (3, s, s) and ours.dtype == np.float32, name
        with Image.open(path) as raw:  # HF converts (white behind transparency) itself
            theirs = hf(images=[raw], return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0, err_msg=name)
        assert ours.min() >= -1.0 and ours.max() <= 1.0


def test_transparency_is_white_and_modes_are_rgb(image_files, tmp_path):
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))      # fully transparent
    img.save(tmp_path / "clear.png")
    rgb = load_image(tmp_path / "clear.png")
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == (255, 255, 255)
    for path in image_files.values():
        assert load_image(path).mode == "RGB"


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_pixels(20, 40, 3, 13))          # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6                                      # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


# -- Pan & Scan --------------------------------------------------------------------------------

SIZES = [(1000, 400), (400, 1000), (2000, 300), (300, 2000), (1200, 1000), (1199, 1000),
         (1100, 1000), (600, 500), (500, 400), (5000, 300), (1001, 333), (333, 1001), (513, 256),
         (800, 800), (1537, 512), (767, 300)]


@pytest.mark.parametrize("w,h", SIZES)
def test_pan_and_scan_matches_hf(w, h):
    hf = _hf_processor(32)
    arr = _pixels(h, w, 3, w * 7 + h)
    theirs = hf.pan_and_scan(np.moveaxis(arr, -1, 0), 256, 4, 1.2)
    ours = pan_and_scan_crops(Image.fromarray(arr))
    assert len(ours) == len(theirs)
    assert len(pan_and_scan_boxes(w, h)) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.moveaxis(np.asarray(a), -1, 0), b)


@pytest.mark.parametrize("params", [(64, 3, 1.5), (100, 8, 1.0), (16, 2, 2.0)])
def test_pan_and_scan_parameters_match_hf(params):
    hf = _hf_processor(32)
    for w, h in [(400, 90), (90, 400), (250, 200), (1000, 101)]:
        arr = _pixels(h, w, 3, w + h)
        theirs = hf.pan_and_scan(np.moveaxis(arr, -1, 0), *params)
        ours = pan_and_scan_crops(Image.fromarray(arr), *params)
        assert [np.moveaxis(np.asarray(a), -1, 0).shape for a in ours] == [b.shape for b in theirs]
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(np.moveaxis(np.asarray(a), -1, 0), b)


def test_pan_and_scan_boxes_examples():
    # 1000 / 400 = 2.5 rounds half up to 3 crops of ceil(1000 / 3) = 334
    assert pan_and_scan_boxes(1000, 400) == [(0, 0, 334, 400), (334, 0, 668, 400), (668, 0, 1000, 400)]
    assert pan_and_scan_boxes(400, 1000) == [(0, 0, 400, 334), (0, 334, 400, 668), (0, 668, 400, 1000)]
    assert pan_and_scan_boxes(600, 500) == [(0, 0, 300, 500), (300, 0, 600, 500)]  # at least 2
    assert pan_and_scan_boxes(5000, 300) == [(0, 0, 1250, 300), (1250, 0, 2500, 300),
                                             (2500, 0, 3750, 300), (3750, 0, 5000, 300)]
    assert pan_and_scan_boxes(1001, 333)[-1] == (668, 0, 1001, 333)   # ceil: the last is narrower
    assert pan_and_scan_boxes(800, 800) == []                         # ratio below 1.2
    assert pan_and_scan_boxes(500, 400) == []                         # crops would be < 256


def test_prepare_images_matches_hf(image_files):
    hf = _hf_processor(32)
    paths = [image_files["big_wide.png"], image_files["wide_rgb.png"], image_files["big_tall.jpg"]]
    for pas in (False, True):
        pixels, counts = prepare_images(paths, TINY, pan_and_scan=pas)
        raws = [Image.open(p) for p in paths]
        out = hf(images=raws, return_tensors="np", do_pan_and_scan=pas, pan_and_scan_min_crop_size=256,
                 pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
        for r in raws:
            r.close()
        assert counts == [1 + int(n) for n in out["num_crops"]]
        assert pixels.shape == out["pixel_values"].shape and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, out["pixel_values"], atol=1e-6, rtol=0)
    # 1000x400: 3 crops; 130x45: too small; 300x1100: round(3.67) = 4 crops of 275
    assert prepare_images(paths, TINY, pan_and_scan=True)[1] == [4, 1, 5]


def test_prepare_images_text_only_model(image_files):
    with pytest.raises(ImageError, match="no vision encoder"):
        prepare_images([image_files["gray.png"]], preset("tiny"))


# -- bad files ---------------------------------------------------------------------------------

def _truncate(src, dst, keep: float):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture
def bad_files(image_files, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is a text file, not a picture\n")
    Image.fromarray(_pixels(20, 30, 3, 14)).save(tmp_path / "picture.tga")
    (tmp_path / "adir.png").mkdir()
    return {
        "missing": (tmp_path / "nope.png", "does not exist"),
        "empty": (tmp_path / "empty.png", "empty"),
        "truncated png": (_truncate(image_files["big_wide.png"], tmp_path / "cut.png", 0.5), "truncated"),
        "truncated jpeg": (_truncate(image_files["big_tall.jpg"], tmp_path / "cut.jpg", 0.5), "truncated"),
        "truncated webp": (_truncate(image_files["square.webp"], tmp_path / "cut.webp", 0.6), "truncated"),
        "png header only": (_truncate(image_files["big_wide.png"], tmp_path / "hdr.png", 0.002), ""),
        "text named .png": (tmp_path / "notes.png", "not an image"),
        "unsupported TGA": (tmp_path / "picture.tga", "TGA image, which is not supported"),
        "directory": (tmp_path / "adir.png", "directory"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "truncated png", "truncated jpeg", "truncated webp",
                                  "png header only", "text named .png", "unsupported TGA", "directory"])
def test_bad_files_raise_image_error(bad_files, case):
    path, words = bad_files[case]
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path.name) in msg and words in msg, msg
    # every message says what to do
    assert any(w in msg for w in ("check", "give", "convert", "re-export", "downscale")), msg
    with pytest.raises(ImageError):
        prepare_images([path], TINY)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)
