"""Detection and false-positive rates of data_prep's test-set de-duplication.

    .venv/bin/python bench/dedup_rates.py [--test 1000] [--corpus 3000] [--max-distance 6]
    .venv/bin/python bench/dedup_rates.py --scale 100000    # the index of a 100k test set

Draws distinct procedural scenes (gradient or value-noise backgrounds, 3-13 filled or
outlined shapes, lines and chords, 0-2 random words in random sizes, sometimes blurred,
sensor-like noise; 160-360 px a side), stored as JPEG q90. The first `--test` are the test
set; each gets one copy of each kind:
  resized     scaled to 50% (bicubic), JPEG q90
  jpeg_q50    re-encoded at JPEG quality 50
  cropped     5-10% cut off each side (each side drawn on its own), JPEG q90
  greyscale   converted to L, JPEG q90
A copy is caught when its nearest test hash within max_distance is one of its own test
image's. The other `--corpus` scenes are distinct from every test image: the false-positive
rate is the fraction of them flagged. Hashing goes through data_prep's own code (test
images: `decode_rgb` + `hash_crops`, as the test-set tasks do; corpus: `process_image`,
as the shard tasks do) and lookups through `NearDuplicateIndex`.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.config import DedupConfig, ImageConfig  # noqa: E402
from data_prep.dedup import (  # noqa: E402
    DECODE_SIDE,
    NearDuplicateIndex,
    crop_boxes,
    hash_crops,
    popcount,
)
from data_prep.process import decode_rgb, process_image  # noqa: E402
from data_prep.shard import LOOKUP_BATCH  # noqa: E402

CORPUS_SEED = 1_000_000  # corpus scenes are drawn from seeds far from the test set's


def draw_scene(seed: int) -> Image.Image:
    """A distinct RGB scene for each seed."""
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(160, 361, 2))
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    background = int(rng.integers(0, 3))
    if background == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    elif background == 1:  # radial gradient
        t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
    else:  # smooth value noise
        cells = (rng.random((int(rng.integers(2, 8)), int(rng.integers(2, 8)))) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(cells).resize((w, h), Image.Resampling.BICUBIC), np.float64)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 14))):
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        fill = colour if rng.random() < 0.6 else None
        x0, y0 = rng.uniform(-0.2, 1) * w, rng.uniform(-0.2, 1) * h
        box = (x0, y0, x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h)
        points = [tuple(p) for p in rng.random((int(rng.integers(3, 7)), 2)) * [w, h]]
        shape = int(rng.integers(0, 5))
        if shape == 0:
            draw.ellipse(box, fill=fill, outline=colour, width=int(rng.integers(1, 6)))
        elif shape == 1:
            draw.rectangle(box, fill=fill, outline=colour, width=int(rng.integers(1, 6)))
        elif shape == 2:
            draw.polygon(points, fill=fill, outline=colour)
        elif shape == 3:
            draw.line(points, fill=colour, width=int(rng.integers(1, 10)))
        else:
            draw.chord(box, float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=fill, outline=colour)
    for _ in range(int(rng.integers(0, 3))):
        word = "".join(chr(c) for c in rng.integers(65, 91, int(rng.integers(3, 10))))
        font = ImageFont.load_default(size=float(rng.uniform(10, 50)))
        draw.text(
            (rng.uniform(0, 0.7) * w, rng.uniform(0, 0.8) * h),
            word,
            font=font,
            fill=tuple(int(x) for x in rng.integers(0, 256, 3)),
        )
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2))))
    noisy = np.asarray(img, np.float64) + rng.normal(0, rng.uniform(0, 8), (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _crop(img: Image.Image, rng: np.random.Generator | None, box=None) -> Image.Image:
    w, h = img.size
    left, top, right, bottom = rng.uniform(0.05, 0.10, 4) if box is None else box
    return img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


COPIES: dict[str, Callable[[Image.Image, np.random.Generator], bytes]] = {
    "resized": lambda img, rng: encode(img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)),
    "jpeg_q50": lambda img, rng: encode(img, 50),
    "cropped": lambda img, rng: encode(_crop(img, rng)),
    "greyscale": lambda img, rng: encode(img.convert("L")),
}


# Crops outside the 5-10%-per-side range the defaults are made for, to show where they end.
OTHER_CROPS = {
    "2% each side": (0.02,) * 4,
    "5% each side": (0.05,) * 4,
    "10% each side": (0.10,) * 4,
    "12% each side": (0.12,) * 4,
    "10% off the left": (0.10, 0, 0, 0),
}


def corpus_hash(data: bytes) -> int:
    """A corpus image's hash as a shard task computes it."""
    h = process_image(data, ImageConfig(), with_hash=True).phash
    assert h is not None
    return h


def test_index(test_jpegs: list[bytes], dedup: DedupConfig) -> NearDuplicateIndex:
    """The index the job builds for a test set of these JPEGs (ids "0", "1", ...)."""
    boxes = crop_boxes(dedup.crop, dedup.crop_shift, dedup.crop_steps)
    hashes = [hash_crops(decode_rgb(d, ImageConfig().max_pixels, DECODE_SIDE), boxes) for d in test_jpegs]
    return NearDuplicateIndex(
        ["test"],
        [str(i) for i in range(len(test_jpegs))],
        np.zeros(len(test_jpegs)),
        np.array(hashes, np.uint64),
        boxes,
        dedup.max_distance,
    )


def caught(index: NearDuplicateIndex, copies: list[bytes]) -> float:
    """The fraction of copies (of test images 0, 1, ...) whose nearest test hash within
    max_distance is one of their own test image's."""
    entry, _ = index.nearest(np.array([corpus_hash(c) for c in copies], np.uint64))
    own = (entry >= 0) & (entry // len(index.boxes) == np.arange(len(copies)))
    return float(own.mean())


def measure(n_test: int, n_corpus: int, dedup: DedupConfig, seed: int = 0, other_crops: bool = False) -> dict:
    """Detection rate per kind of copy, false-positive rate on distinct images, and the rate
    per (corpus image, test hash) pair at each distance, for extrapolating to other sizes."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    test_imgs = [draw_scene(seed * 10_000_000 + i) for i in range(n_test)]
    index = test_index([encode(img) for img in test_imgs], dedup)
    detected = {kind: caught(index, [make(img, rng) for img in test_imgs]) for kind, make in COPIES.items()}
    other = (
        {name: caught(index, [encode(_crop(img, None, box)) for img in test_imgs]) for name, box in OTHER_CROPS.items()}
        if other_crops
        else {}
    )
    corpus = np.array(
        [corpus_hash(encode(draw_scene(seed * 10_000_000 + CORPUS_SEED + i))) for i in range(n_corpus)], np.uint64
    )
    lookup = time.perf_counter()
    entry, _ = index.nearest(corpus)
    lookup = time.perf_counter() - lookup
    within = np.zeros(dedup.max_distance + 1)  # (corpus image, test hash) pairs at each distance
    for q, e in zip(corpus, entry, strict=True):
        counts = np.bincount(popcount(index.hashes ^ q), minlength=65)[: dedup.max_distance + 1]
        assert (e >= 0) == (counts.sum() > 0), "the index and a full scan disagree"
        within += counts
    pairs = max(1, n_corpus * len(index.hashes))
    return {
        "test_images": n_test,
        "corpus_images": n_corpus,
        "hashes_per_test_image": len(index.boxes),
        "max_distance": dedup.max_distance,
        "detected": detected,
        "other_crops": other,
        "false_positives": int((entry >= 0).sum()),
        "false_positive_rate": float((entry >= 0).sum() / max(1, n_corpus)),
        "per_pair_rate": {d: float(within[: d + 1].sum() / pairs) for d in range(0, dedup.max_distance + 1, 2)},
        "bands": len(index.tables),
        "lookup_us": 1e6 * lookup / max(1, n_corpus),
        "seconds": time.perf_counter() - start,
    }


def index_scale(n_test: int, dedup: DedupConfig) -> str:
    """Build time, size and lookup time of the index of `n_test` test images (random hashes:
    real ones cluster more, so expect more candidates per lookup)."""
    import pickle

    rng = np.random.default_rng(0)
    boxes = crop_boxes(dedup.crop, dedup.crop_shift, dedup.crop_steps)
    hashes = rng.integers(0, 2**63, (n_test, len(boxes)), dtype=np.uint64)
    start = time.perf_counter()
    index = NearDuplicateIndex(
        ["t"], [f"class/{i:06d}.jpg" for i in range(n_test)], np.zeros(n_test), hashes, boxes, dedup.max_distance
    )
    build = time.perf_counter() - start
    queries = rng.integers(0, 2**63, 1024, dtype=np.uint64).tolist()
    start = time.perf_counter()
    for q in queries[:256]:
        index.match(q)
    one = (time.perf_counter() - start) / 256
    start = time.perf_counter()
    for i in range(0, len(queries), LOOKUP_BATCH):
        index.matches(queries[i : i + LOOKUP_BATCH])
    batched = (time.perf_counter() - start) / len(queries)
    return (
        f"index of {n_test} test images x {len(boxes)} = {len(index.hashes)} hashes: built in "
        f"{build:.1f} s, {len(index.tables)} bands, {len(pickle.dumps(index, 5)) / 1e6:.0f} MB "
        f"pickled; lookup {batched * 1e6:.0f} us per corpus sample in batches of "
        f"{LOOKUP_BATCH} as shard tasks do ({one * 1e6:.0f} us one at a time)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--corpus", type=int, default=3000)
    parser.add_argument("--max-distance", type=int, default=DedupConfig.max_distance)
    parser.add_argument("--crop", type=float, default=DedupConfig.crop)
    parser.add_argument("--crop-shift", type=float, default=DedupConfig.crop_shift)
    parser.add_argument("--crop-steps", type=int, default=DedupConfig.crop_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale", type=int, default=0, help="only time the index of this many test images (random hashes)"
    )
    args = parser.parse_args()
    dedup = DedupConfig(
        max_distance=args.max_distance, crop=args.crop, crop_shift=args.crop_shift, crop_steps=args.crop_steps
    )
    if args.scale:
        print(index_scale(args.scale, dedup))
        return
    r = measure(args.test, args.corpus, dedup, args.seed, other_crops=True)
    print(
        f"{r['test_images']} test images x {r['hashes_per_test_image']} hashes, "
        f"max_distance {r['max_distance']} bits, {r['bands']} bands"
    )
    print(f"{'copy kind':<12}{'caught':>10}")
    for kind, rate in r["detected"].items():
        print(f"{kind:<12}{rate:>10.1%}")
    print(
        "beyond the 5-10% per side the crops are made for: "
        + ", ".join(f"{name} {rate:.1%}" for name, rate in r["other_crops"].items())
    )
    print(
        f"false positives: {r['false_positives']} of {r['corpus_images']} distinct images "
        f"({r['false_positive_rate']:.2%})"
    )
    print(
        "per (corpus image, test hash) pair within d bits: "
        + ", ".join(f"d<={d}: {p:.2e}" for d, p in r["per_pair_rate"].items())
    )
    print(f"lookup {r['lookup_us']:.0f} us per corpus image (batched); {r['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
