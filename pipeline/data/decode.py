"""Decoding and transforms: labels, the Inception crop and flip for training, the centre
crop for evaluation, and the model's input scaling.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def sample_labels(sample: dict) -> list[int]:
    if "json" in sample:
        labels = json.loads(sample["json"]).get("labels")
        if labels:
            return [int(x) for x in labels]
    return [int(sample["cls"])]


def inception_crop_box(
    width: int, height: int, rng: random.Random, area: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random crop of ``area`` fraction and aspect ratio in [3/4, 4/3] (Inception style)."""
    for _ in range(10):
        target = width * height * rng.uniform(*area)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def decode_train(data: bytes, size: int, rng: random.Random, area: tuple[float, float], flip: bool) -> np.ndarray:
    """Decode, inception-crop, flip and resize to ``size``: HWC uint8.

    The crop is chosen on the header's size first so that large JPEGs decode at a reduced
    scale (``draft``) whenever the crop still has at least ``size`` pixels per side.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        box = inception_crop_box(width, height, rng, area)
        scale = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        if scale >= 2 and img.format == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8, the largest not past `scale`; the returned box
            # is the original extent in drafted pixels (exactly 1/k: the last block is partial).
            drafted = img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
            if drafted is not None:
                k = width / drafted[1][2]
                box = tuple(c / k for c in box)
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((size, size), Image.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def decode_eval(data: bytes, size: int, crop_ratio: float) -> np.ndarray:
    """Resize the shorter side to ``size / crop_ratio``, then centre-crop ``size``: HWC uint8."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (eval_resize(size, crop_ratio),) * 2)  # a JPEG decodes at a reduced scale
        return eval_crop(img, size, crop_ratio)


def eval_resize(size: int, crop_ratio: float) -> int:
    """The shorter side an eval image is resized to before its centre crop of ``size``."""
    return max(size, round(size / crop_ratio))


def eval_crop(img: Image.Image, size: int, crop_ratio: float) -> np.ndarray:
    """A decoded image as evaluation sees it: shorter side resized (bilinear) to
    :func:`eval_resize`, centre crop ``size``; HWC uint8 RGB. The served model uses it too.

    The longer side is truncated, not rounded, as torchvision's ``Resize(int)`` and
    transformers' image processors do, so an exported model's processor gives these pixels."""
    resize = eval_resize(size, crop_ratio)
    img = img.convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    other = int(resize * long / short)
    img = img.resize((resize, other) if w <= h else (other, resize), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC -> NCHW in [-1, 1] (done on the device, so workers ship bytes, not floats)."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def multi_hot(labels: list[list[int]], num_classes: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(len(labels), num_classes)`` float rows with a 1 at each label, written into ``out`` if given."""
    out = torch.zeros(len(labels), num_classes) if out is None else out.zero_()
    rows = out.numpy()  # numpy indexing: a tenth of torch's per-call cost, 64 calls a batch
    for row, ls in enumerate(labels):
        rows[row, ls] = 1.0
    return out
