"""Procedural demo corpora: a glyph corpus to pre-train on and scikit-learn's digits to probe.

``make_glyph_corpus`` draws an ImageNet-21k-style class-folder tree of synthetic "glyphs":
every class is 2-3 random cubic Bezier strokes, every sample a jittered, rotated, scaled and
shifted copy, rendered as bright strokes on black and degraded to look like scikit-learn's
8x8 digits upsampled to 32x32. Pre-training ``vit_demo`` on it lifts digits few-shot accuracy
well above random init (measured: digits 10-shot 0.420 -> 0.671 in 400 steps, README), which
is what the demo has to show; a corpus of coloured geometric shapes, tried first, was learnt
but did not transfer.
``make_digits_corpus`` writes those digits (bundled with scikit-learn, no download) as class
folders for the few-shot evaluation.

Only numpy, Pillow and scikit-learn are needed; every image is seeded by (seed, class,
index), so the corpus is the same whichever process draws it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .disk import reporting_full

JPEG_QUALITY = 95
# The optdigits bitmaps are 32x32 binary images averaged over 4x4 blocks to 8x8.
_BITMAP = 32
_DIGIT_GRID = 8
_CURVE_POINTS = 24
_T = np.linspace(0.0, 1.0, _CURVE_POINTS)
_BERNSTEIN = np.stack([(1 - _T) ** 3, 3 * (1 - _T) ** 2 * _T, 3 * (1 - _T) * _T**2, _T**3], axis=1)
# Stream tags that keep the random streams of templates, samples and pairings apart.
_TEMPLATE, _SAMPLE, _PAIRING = 1, 2, 3


def class_name(index: int) -> str:
    return f"glyph_{index:03d}"


def glyph_template(seed: int, class_index: int) -> np.ndarray:
    """Control points (strokes, 4, 2) of one class, centred, largest side 1."""
    rng = np.random.default_rng([seed, _TEMPLATE, class_index])
    num_strokes = int(rng.integers(2, 4))
    strokes = []
    for s in range(num_strokes):
        # Later strokes often start on an earlier one, as pen strokes of a character do.
        if s and rng.random() < 0.6:
            prev = strokes[int(rng.integers(len(strokes)))]
            start = _BERNSTEIN[int(rng.integers(_CURVE_POINTS))] @ prev
        else:
            start = rng.uniform(0.0, 1.0, 2)
        rest = start + rng.uniform(-0.7, 0.7, (3, 2))
        strokes.append(np.vstack([start, rest]))
    ctrl = np.stack(strokes)
    pts = _BERNSTEIN @ ctrl  # (strokes, points, 2)
    lo, hi = pts.reshape(-1, 2).min(0), pts.reshape(-1, 2).max(0)
    return (ctrl - (lo + hi) / 2) / max(float((hi - lo).max()), 1e-6)


def _place(ctrl: np.ndarray, rng: np.random.Generator, size: float, centre: np.ndarray) -> np.ndarray:
    """Jitter, rotate, scale and shift a template into canvas units [0, 1]."""
    ctrl = ctrl + rng.normal(0.0, 0.03, ctrl.shape)
    angle = rng.uniform(-0.3, 0.3)
    c, s = np.cos(angle), np.sin(angle)
    scale = size * rng.uniform(0.8, 1.15) * np.array([rng.uniform(0.7, 1.0), 1.0])
    shift = rng.uniform(-0.06, 0.06, 2)
    return ctrl @ np.array([[c, s], [-s, c]]) * scale + centre + shift


def _draw(strokes: list[np.ndarray], rng: np.random.Generator, out_size: int) -> Image.Image:
    """Render strokes (canvas units) as bright on black, degraded like the upsampled digits."""
    if rng.random() < 0.5:
        # The digits' own path: a binary 32x32 bitmap, 4x4 block averages, bilinear up.
        canvas, width = _BITMAP, int(rng.integers(3, 6))
        img = Image.new("L", (canvas, canvas), 0)
        _stroke(ImageDraw.Draw(img), strokes, canvas, width)
        img = img.resize((_DIGIT_GRID, _DIGIT_GRID), Image.BOX)
        return img.resize((out_size, out_size), Image.BILINEAR)
    canvas = 2 * out_size
    width = max(1, round(rng.uniform(0.09, 0.16) * canvas))
    img = Image.new("L", (canvas, canvas), 0)
    _stroke(ImageDraw.Draw(img), strokes, canvas, width)
    img = img.resize((out_size, out_size), Image.BOX)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0) * out_size / 32))


def _stroke(draw: ImageDraw.ImageDraw, strokes: list[np.ndarray], canvas: int, width: int) -> None:
    for ctrl in strokes:
        pts = _BERNSTEIN @ ctrl * canvas
        draw.line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")


def render_glyph(templates: list[np.ndarray], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One sample (RGB, size x size) showing each template once; two share the canvas."""
    if len(templates) == 1:
        placed = [_place(templates[0], rng, 0.9, np.array([0.5, 0.5]))]
    else:
        # Side by side, in random order, each at half the size.
        order = rng.permutation(len(templates))
        xs = np.linspace(0.28, 0.72, len(templates))
        placed = [_place(templates[i], rng, 0.45, np.array([xs[j], 0.5])) for j, i in enumerate(order)]
    strokes = [stroke for ctrl in placed for stroke in ctrl]
    return _draw(strokes, rng, size).convert("RGB")


def _write_class(args: tuple) -> list[dict]:
    out_dir, seed, num_classes, c, per_class, size, pairs = args
    templates = {c: glyph_template(seed, c)}
    name = class_name(c)
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    records = []
    for i in range(per_class):
        rng = np.random.default_rng([seed, _SAMPLE, c, i])
        labels = [c]
        if i in pairs:
            other = int(rng.integers(num_classes - 1))
            labels.append(other + (other >= c))  # any class but c
        for lab in labels:
            if lab not in templates:
                templates[lab] = glyph_template(seed, lab)
        img = render_glyph([templates[lab] for lab in labels], rng, size)
        rel = f"{name}/{name}_{i:05d}.jpg"
        img.save(os.path.join(out_dir, rel), quality=JPEG_QUALITY)
        records.append({"path": rel, "labels": [class_name(lab) for lab in labels]})
    return records


def _reporting_full(out_dir: str, expected: int):
    """A full disk while drawing: the partial corpus goes (a rerun draws it again) and one line
    says where and how much (``data_prep.disk``)."""
    return reporting_full(
        out_dir,
        expected,
        "the partial corpus was removed; free space there or point output_dir at a larger disk, then rerun",
        cleanup=lambda: shutil.rmtree(out_dir, ignore_errors=True),
    )


def make_glyph_corpus(
    out_dir: str,
    num_classes: int = 100,
    per_class: int = 128,
    size: int = 32,
    seed: int = 0,
    multi_label_fraction: float = 0.0,
    workers: int = 1,
) -> dict:
    """Write ``out_dir/glyph_NNN/glyph_NNN_IIIII.jpg``: ``per_class`` images of each class.

    With ``multi_label_fraction > 0`` that fraction of the images (drawn per seed) shows two
    glyphs of different classes, filed under the first, and ``out_dir/manifest.jsonl`` lists
    every image as ``{"path": <relative to out_dir>, "labels": [class names]}``.
    ``workers > 1`` draws classes in processes; the bytes written are the same.
    Returns ``{"out_dir", "classes", "images", "multi_label_images", "manifest", "seconds"}``.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"need num_classes >= 1 and per_class >= 1, got {num_classes}, {per_class}")
    if not 0.0 <= multi_label_fraction <= 1.0:
        raise ValueError(f"multi_label_fraction must be in [0, 1], got {multi_label_fraction}")
    if multi_label_fraction > 0 and num_classes < 2:
        raise ValueError("multi-label images need at least 2 classes")
    start = time.perf_counter()
    total = num_classes * per_class
    num_pairs = round(multi_label_fraction * total)
    chosen = np.random.default_rng([seed, _PAIRING]).choice(total, num_pairs, replace=False)
    pairs = [set() for _ in range(num_classes)]
    for flat in chosen.tolist():
        pairs[flat // per_class].add(flat % per_class)
    jobs = [(out_dir, seed, num_classes, c, per_class, size, pairs[c]) for c in range(num_classes)]
    with _reporting_full(out_dir, total * size * size):  # about a KB per 32 px JPEG
        os.makedirs(out_dir, exist_ok=True)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                per_class_records = list(pool.map(_write_class, jobs, chunksize=4))
        else:
            per_class_records = [_write_class(job) for job in jobs]
        manifest = None
        if num_pairs:
            manifest = os.path.join(out_dir, "manifest.jsonl")
            with open(manifest + ".tmp", "w") as f:
                for records in per_class_records:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(manifest + ".tmp", manifest)
    return {
        "out_dir": out_dir,
        "classes": num_classes,
        "images": total,
        "multi_label_images": num_pairs,
        "manifest": manifest,
        "seconds": round(time.perf_counter() - start, 2),
    }


def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as (N, size, size, 3) uint8 bright-on-black, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.empty((len(digits.images), size, size, 3), np.uint8)
    for i, small in enumerate(digits.images):
        img = Image.fromarray(np.round(small * (255 / 16)).astype(np.uint8), "L")
        images[i] = np.asarray(img.resize((size, size), Image.BILINEAR).convert("RGB"))
    return images, digits.target.astype(np.int64)


def make_digits_corpus(out_dir: str, size: int = 32) -> dict:
    """Write scikit-learn's digits as ``out_dir/<digit>/<index>.jpg`` (index in sklearn order).

    Returns ``{"out_dir", "classes", "images", "seconds"}``.
    """
    start = time.perf_counter()
    images, labels = load_digits_images(size)
    with _reporting_full(out_dir, len(labels) * size * size):
        for digit in range(10):
            os.makedirs(os.path.join(out_dir, str(digit)), exist_ok=True)
        for index, (img, digit) in enumerate(zip(images, labels, strict=True)):
            path = os.path.join(out_dir, str(digit), f"{index:04d}.jpg")
            Image.fromarray(img).save(path, quality=JPEG_QUALITY)
    return {
        "out_dir": out_dir,
        "classes": 10,
        "images": len(labels),
        "seconds": round(time.perf_counter() - start, 2),
    }
