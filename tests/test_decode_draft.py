"""Reduced-scale JPEG decoding (``draft``) in the training crop changes speed, not samples.

``decode_train`` draws the inception crop on the header's size, then lets libjpeg decode at
1/2, 1/4 or 1/8 scale when the crop keeps at least the output resolution. These tests hold
it to a full-size decode of the same crop: the same crop draws, the same crop statistics
and nearly the same pixels.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

from pipeline.data import decode_train, inception_crop_box

W, H = 1001, 751  # not multiples of 8: the drafted last block is partial
AREA = (0.05, 1.0)
SEEDS = range(150)


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A q90 JPEG whose red channel ramps with x and green with y (so an output's colours
    say where its crop was), with shapes and sensor-like noise in blue."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([255 * xx / (W - 1), 255 * yy / (H - 1), 96 + rng.normal(0, 6, (H, W))], axis=-1)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(12):
        x, y, r = rng.integers(0, W), rng.integers(0, H), rng.integers(20, 120)
        shade = int(rng.integers(0, 256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            (x - r, y - r, x + r, y + r), fill=(int(255 * x / (W - 1)), int(255 * y / (H - 1)), shade)
        )
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=90)
    return out.getvalue()


def full_size_reference(data: bytes, size: int, rng: random.Random) -> np.ndarray:
    """The same crop, flip and resize from a full-size decode."""
    with Image.open(io.BytesIO(data)) as img:
        box = inception_crop_box(*img.size, rng, AREA)
        img = img.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def crop_seen(image: np.ndarray) -> tuple[float, float]:
    """(area fraction, log aspect) of the crop an output shows, read off the colour ramps."""
    r, g = image[..., 0].astype(float), image[..., 1].astype(float)
    w = (np.percentile(r, 99) - np.percentile(r, 1)) / 255 * W
    h = (np.percentile(g, 99) - np.percentile(g, 1)) / 255 * H
    return w * h / (W * H), math.log(w / h)


@pytest.fixture(scope="module")
def decoded(photo) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """(drafted, full-size) outputs per seed at two output sizes."""
    return {
        size: [
            (
                decode_train(photo, size, random.Random(s), AREA, True),
                full_size_reference(photo, size, random.Random(s)),
            )
            for s in SEEDS
        ]
        for size in (64, 224)
    }


def test_most_crops_decode_at_reduced_scale(photo, monkeypatch):
    scales = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        scales.append(round(W / result[1][2]))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for s in SEEDS:
        decode_train(photo, 64, random.Random(s), AREA, True)
    assert len(scales) > 0.9 * len(SEEDS) and set(scales) <= {2, 4, 8} and 8 in scales


def test_drafted_outputs_match_a_full_size_decode_of_the_same_crop(decoded):
    for size, pairs in decoded.items():
        diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in pairs]
        assert all(a.shape == (size, size, 3) and a.dtype == np.uint8 for a, _ in pairs)
        assert np.mean(diffs) < 0.75 and max(diffs) < 1.5, (size, np.mean(diffs), max(diffs))


def test_crop_area_and_aspect_statistics_equal_the_full_size_decode(decoded):
    draws = []
    for s in SEEDS:
        x0, y0, x1, y1 = inception_crop_box(W, H, random.Random(s), AREA)
        draws.append(((x1 - x0) * (y1 - y0) / (W * H), math.log((x1 - x0) / (y1 - y0))))
    deciles = np.linspace(0.1, 0.9, 9)
    for pairs in decoded.values():
        ours = np.array([crop_seen(a) for a, _ in pairs])
        full = np.array([crop_seen(b) for _, b in pairs])
        assert (np.abs(ours - full).max(axis=0) < (0.02, 0.05)).all()  # per sample: the same crop
        assert (np.abs(ours.mean(axis=0) - full.mean(axis=0)) < (0.005, 0.01)).all()
        # and both are the inception draws (read off colours, so only roughly)
        gap = np.abs(np.quantile(ours, deciles, axis=0) - np.quantile(draws, deciles, axis=0))
        assert (gap.max(axis=0) < (0.06, 0.08)).all()
