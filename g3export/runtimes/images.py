"""Image input for the runtime: decoding, Gemma 3 preprocessing and Pan & Scan (GEMMA3_SPEC §3b, §3d).

Contract:

    load_image(path)                     -> PIL.Image, mode RGB, fully decoded
    preprocess(img, cfg)                 -> np.ndarray float32 [3, S, S], S = cfg.vision.image_size
    pan_and_scan_boxes(w, h, ...)        -> [(left, top, right, bottom), ...]  ([] = no crops)
    pan_and_scan_crops(img, ...)         -> [PIL.Image, ...]                   ([] = no crops)
    prepare_images(paths, cfg, pan_and_scan=False)
                                         -> (pixel_values float32 [N_total, 3, S, S],
                                             crops_per_image: list[int])
    load_images(paths, cfg)              -> pixel_values [N, 3, S, S] (one view per image)

* Decoding (`load_image`). Accepted formats: PNG, JPEG, WebP, GIF (first frame) and BMP; anything
  else that Pillow happens to read (TGA, ICO, PSD, ...) is refused, so that what works is what is
  documented and tested. The file is decoded completely while loading, so a truncated or corrupt
  file fails here with ImageError, not later inside the model. The EXIF orientation is applied (as
  transformers' `load_image` does). Transparency (RGBA, LA, PA, P or L with a transparent colour) is
  composited onto white and everything else is converted with Pillow's `convert("RGB")`: this is
  what transformers' image processors do with a PIL image (`image_transforms.convert_to_rgb`).
  Every failure is an ImageError (a ValueError) whose message names the file, what is wrong and
  what to do.
* Preprocessing (`preprocess`), exactly transformers' Gemma3ImageProcessor (PIL backend): resize
  the RGB uint8 image to S x S with PIL BILINEAR (aspect ratio not kept), multiply by 1/255 in
  float64 and cast to float32, then (x - 0.5) / 0.5 in float32 — range [-1, 1], no clipping
  (gemma_pytorch and JAX clip; HF does not, and the weights are HF's). Channels first.
* Pan & Scan (`pan_and_scan_boxes`), HF's algorithm and defaults (min crop 256, at most 4 crops,
  activation ratio 1.2): crops are taken along the long side only; n = floor(long/short + 0.5),
  capped at floor(long / min_crop), then clamped to [2, max_crops]; crop side ceil(long / n) along
  the long side, the whole short side across; nothing is cropped when the aspect ratio is below the
  activation ratio or a crop would be smaller than min_crop. The last crop is cut at the image edge
  (HF slices an array, which never pads), so it may be narrower than the others.
* `prepare_images`: each image gives its full view, then (with pan_and_scan) its crops in order,
  each preprocessed on its own; crops_per_image[i] = 1 + number of crops of image i (1 without
  Pan & Scan) — the argument `build_prompt_ids(images=...)` takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from ..errors import UserError

# The formats we accept, as Pillow names them (Image.format), and how users know them.
SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}

PAN_AND_SCAN_MIN_CROP_SIZE = 256
PAN_AND_SCAN_MAX_NUM_CROPS = 4
PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE = 1.2


class ImageError(UserError, ValueError):
    """An image that cannot be used; the message says which file, what is wrong and what to do."""


def _supported() -> str:
    return ", ".join(SUPPORTED_FORMATS.values())


def load_image(path: str | Path):
    """Open, fully decode and convert one image file to RGB (see the module docstring)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..userfiles import require_regular_file

    p = require_regular_file(Path(path).expanduser(), ImageError, "image file")  # no FIFO/device
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot read image file {p}: {e.strerror or e}") from None
    if size == 0:
        raise ImageError(f"image file {p} is empty (0 bytes); give a {_supported()} image")
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        raise ImageError(f"{p} is not an image Pillow can identify (wrong extension, or not an "
                         f"image at all); give a {_supported()} file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{p} is too large to decode safely ({e}); downscale it first") from None
    except OSError as e:
        raise ImageError(f"{p} could not be opened as an image: it is truncated, corrupt or not an "
                         f"image ({e}); re-export or re-download it, or give a {_supported()} "
                         "file") from None
    with img:
        fmt = img.format
        if fmt not in SUPPORTED_FORMATS:
            raise ImageError(f"{p} is a {fmt} image, which is not supported; convert it to one of "
                             f"{_supported()}")
        try:
            img.load()  # a full decode: truncated or corrupt data fails here
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{p} is too large to decode safely ({e}); downscale it first") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{p} could not be decoded as {SUPPORTED_FORMATS[fmt]}: the file is "
                             f"truncated or corrupt ({e}); re-export or re-download it") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError(f"{p} has no pixels ({rgb.width}x{rgb.height})")
    return rgb


def to_rgb(img):
    """RGB copy of a PIL image: transparency composited onto white, other modes convert("RGB")."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _image_size(cfg) -> int:
    if getattr(cfg, "vision", None) is None:
        raise ImageError(f"model {getattr(cfg, 'name', '?')} has no vision encoder and takes no "
                         "images; drop --image or use a 4b, 12b or 27b model")
    return int(cfg.vision.image_size)


def preprocess(img, cfg) -> np.ndarray:
    """One PIL image -> float32 [3, S, S] in [-1, 1], as HF's Gemma3ImageProcessor computes it."""
    from PIL import Image

    s = _image_size(cfg)
    if img.mode != "RGB":
        img = to_rgb(img)
    resized = img.resize((s, s), resample=Image.Resampling.BILINEAR)
    x = np.asarray(resized, dtype=np.uint8)                       # [S, S, 3]
    x = (x.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)  # HF rescales in float64
    half = np.float32(0.5)
    x = (x - half) / half
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pan_and_scan_boxes(width: int, height: int,
                       min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
                       max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
                       min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE
                       ) -> list[tuple[int, int, int, int]]:
    """Pan & Scan crop boxes (left, top, right, bottom) of a width x height image; [] for none."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        n_w = int(math.floor(width / height + 0.5))
        n_w = min(int(math.floor(width / min_crop_size)), n_w)
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(int(math.floor(height / min_crop_size)), n_h)
        n_h, n_w = min(max_num_crops, max(2, n_h)), 1
    crop_w = int(math.ceil(width / n_w))
    crop_h = int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
            for y in range(0, crop_h * n_h, crop_h) for x in range(0, crop_w * n_w, crop_w)]


def pan_and_scan_crops(img, min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
                       max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
                       min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE) -> list:
    """The Pan & Scan crops of a PIL image (not including the image itself); [] for none."""
    boxes = pan_and_scan_boxes(img.width, img.height, min_crop_size, max_num_crops,
                               min_ratio_to_activate)
    return [img.crop(b) for b in boxes]


def prepare_images(paths: Sequence[str | Path], cfg, pan_and_scan: bool = False
                   ) -> tuple[np.ndarray, list[int]]:
    """Load and preprocess images: (pixel_values [N_total, 3, S, S] float32, crops_per_image).

    Each image contributes its full view and, with pan_and_scan, its crops after it;
    crops_per_image[i] counts them all (1 + crops).
    """
    s = _image_size(cfg)
    views, counts = [], []
    for path in paths:
        img = load_image(path)
        crops = pan_and_scan_crops(img) if pan_and_scan else []
        views += [preprocess(v, cfg) for v in (img, *crops)]
        counts.append(1 + len(crops))
    if not views:
        return np.zeros((0, 3, s, s), dtype=np.float32), []
    return np.stack(views), counts


def load_images(paths: Sequence[str | Path], cfg) -> np.ndarray:
    """pixel_values [N, 3, S, S] float32 of N images, one view each (prepare_images without Pan &
    Scan; kept for callers that take no crops)."""
    return prepare_images(paths, cfg, pan_and_scan=False)[0]
