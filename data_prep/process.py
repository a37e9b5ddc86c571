"""One sample's image: verify it decodes, orient it, make it RGB, resize it, encode it.

`process_image` either returns the bytes to store or raises `SampleError` with the reason
the sample is skipped; it never lets a bad image crash a shard.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import failures as F
from .config import ImageConfig
from .dedup import phash
from .failures import SampleError

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


@dataclass
class Processed:
    """The JPEG to store and facts about its source image."""

    data: bytes
    width: int  # of the source image as displayed (after EXIF orientation), before resizing
    height: int
    mode: str  # the source's Pillow mode, e.g. "RGB", "CMYK", "I;16"
    kept_original: bool  # `data` is the source file's own bytes
    phash: int | None = None  # 64-bit perceptual hash of the stored image, when asked for


def target_size(width: int, height: int, resize_mode: str, size: int) -> tuple[int, int] | None:
    """The size to resize to, or None when the image is already small enough. The bounded
    side (shorter or longer) becomes `size`; the other keeps the aspect ratio."""
    if resize_mode == "none":
        return None
    side = min(width, height) if resize_mode == "shorter" else max(width, height)
    if side <= size:
        return None
    if width == side:
        return size, max(1, (height * size + side // 2) // side)
    return max(1, (width * size + side // 2) // side), size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha is composited on white, 16-bit data is scaled
    (not clipped) to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        mode, img = "RGBA", img.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if mode in _SIXTEEN_BIT_MODES or a.max(initial=0) > 255:
            a = (a + 128) // 257
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def process_image(data: bytes, opts: ImageConfig, with_hash: bool = False) -> Processed:
    """Verify, orient, convert and resize one encoded image; with `with_hash`, also its
    perceptual hash (`data_prep.dedup.phash`). Raises `SampleError`."""
    if not data:
        raise SampleError(F.EMPTY_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, opts.max_pixels)
        orientation = _orientation(img)
        width, height = img.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        new_size = target_size(width, height, opts.resize_mode, opts.size)
        keep = (
            opts.keep_original and new_size is None and orientation == 1 and img.format == "JPEG" and img.mode == "RGB"
        )
        if new_size is not None and img.format == "JPEG":
            stored = new_size if orientation < 5 else new_size[::-1]
            if min(img.width // stored[0], img.height // stored[1]) >= 2:
                # DCT-domain downscaling: decodes at 1/2, 1/4 or 1/8 size, never below `stored`.
                img.draft(None, stored)
        mode = img.mode
        _load(img)
    if keep:
        return Processed(data, width, height, mode, kept_original=True, phash=phash(img) if with_hash else None)
    try:
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        img = to_rgb(img)
        if new_size is not None:
            img = img.resize(new_size, _RESAMPLE[opts.resample])
        out = io.BytesIO()
        img.save(out, "JPEG", quality=opts.quality)
    except Exception as e:  # noqa: BLE001 - any library failure is one skipped sample
        raise SampleError(F.PROCESS_ERROR, f"{type(e).__name__}: {e}") from None
    return Processed(out.getvalue(), width, height, mode, kept_original=False, phash=phash(img) if with_hash else None)


def decode_rgb(data: bytes, max_pixels: int, min_side: int = 0) -> Image.Image:
    """One encoded image decoded, oriented and in RGB, as `process_image` sees it; a JPEG is
    decoded at a reduced scale when both sides stay >= `min_side`. Raises `SampleError`."""
    if not data:
        raise SampleError(F.EMPTY_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        orientation = _orientation(img)
        if min_side and img.format == "JPEG":
            img.draft(None, (min_side, min_side))
        _load(img)
    try:
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001 - any library failure is one skipped image
        raise SampleError(F.PROCESS_ERROR, f"{type(e).__name__}: {e}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError(F.TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError:
        raise SampleError(F.NOT_AN_IMAGE, f"{len(data)} bytes, unknown format") from None
    except Exception as e:  # noqa: BLE001 - a header a plugin chokes on
        raise SampleError(F.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError(F.TOO_MANY_PIXELS, f"{w}x{h} > {max_pixels} pixels")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        return 1
    return value if isinstance(value, int) else 1


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except OSError as e:
        if "truncated" in str(e) or "broken data stream" in str(e):
            raise SampleError(F.TRUNCATED_IMAGE, str(e)) from None
        raise SampleError(F.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    except Image.DecompressionBombError as e:
        raise SampleError(F.TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # noqa: BLE001 - plugins raise SyntaxError, ValueError, ...
        raise SampleError(F.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
