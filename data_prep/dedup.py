"""De-duplication against downstream test sets (the ViT paper, section 4.1): perceptual
hashes, the test sets' hash index, and its near-duplicate lookup.

- `phash`: a 64-bit DCT hash (greyscale, 32x32 box resize, 2-D DCT, the 8x8 lowest
  frequencies without DC, thresholded at their median: 63 informative bits, the top bit 0).
  Resizing, JPEG re-encoding and greyscale move it by a few bits; a crop moves it by many,
  so each test image is also hashed cropped (`crop_boxes`): a slightly cropped copy is close
  to one of those crops.
- `NearDuplicateIndex`: every hash of every test image, searched by multi-index hashing
  (Norouzi et al., CVPR 2012): the 64 bits are cut into m bands; two hashes within d bits
  differ by at most d // m bits in at least one band (pigeonhole), so a query probes each
  band's table at every key within d // m bits of its own band and verifies the candidates'
  full distance. Each band's table is dense (an offset per possible key into the entries
  sorted by that band), so a probe costs two array reads; m is chosen for the index size.
- The test sets are listed and hashed by `data_prep.testsets`, which the job runs as Ray
  tasks; the index is built once in the driver and shipped to the shard tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from PIL import Image

HASH_SIDE = 32
LOW_FREQS = 8
_K = np.arange(HASH_SIDE)
_DCT = np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:LOW_FREQS, None] / (2 * HASH_SIDE))
WHOLE = (0.0, 0.0, 0.0, 0.0)
DECODE_SIDE = 128  # test images are decoded at a reduced JPEG scale, but no smaller than this
MAX_BANDS = 16
MIN_BANDS = 3  # bands of at most 22 bits: a dense table of 2**22 offsets is 16 MB


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of `img` (any mode) as an int."""
    grey = np.asarray(img.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    coeffs = (_DCT @ grey @ _DCT.T).ravel()[1:]
    bits = np.concatenate([[False], coeffs > np.median(coeffs)])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def to_hex(h: int) -> str:
    return f"{h:016x}"


def crop_boxes(crop: float, shift: float, steps: int = 1) -> list[tuple[float, float, float, float]]:
    """The (left, top, right, bottom) fractions each test image is hashed at: whole, then the
    (2*steps+1)**2 crops that take crop + k*shift/steps off the left (top), k = -steps..steps,
    and the rest of 2*crop off the right (bottom): a copy cropped by crop +- shift on each
    side is within shift/(2*steps) per side of one of them."""
    if crop <= 0:
        return [WHOLE]
    offsets = sorted({round(crop + shift * k / steps, 6) for k in range(-steps, steps + 1)})
    return [WHOLE] + [
        (left, top, round(2 * crop - left, 6), round(2 * crop - top, 6)) for left in offsets for top in offsets
    ]


def box_name(box: tuple[float, float, float, float]) -> str:
    """`whole`, or `crop l,t,r,b` in percent of each side."""
    if box == WHOLE:
        return "whole"
    return "crop " + ",".join(f"{100 * f:.3g}" for f in box)


def hash_crops(img: Image.Image, boxes: list[tuple[float, float, float, float]]) -> list[int]:
    """`phash` of each crop box of `img`."""
    w, h = img.size
    out = []
    for left, top, right, bottom in boxes:
        part = (
            img
            if (left, top, right, bottom) == WHOLE
            else img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
        )
        out.append(phash(part))
    return out


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


# ---------------------------------------------------------------- the index


@dataclass
class Match:
    """The test image nearest a corpus hash, within `max_distance`."""

    test_set: str
    test_id: str
    distance: int
    kind: str  # which hash of the test image matched: `whole` or `crop l,t,r,b`


def choose_bands(n: int, max_distance: int) -> int:
    """The band count m that minimises the expected work of one lookup: m tables probed at
    every key within max_distance // m bits, plus the candidates found (for n uniform
    hashes, n / 2**width per probed key), each verified."""

    def cost(m: int) -> float:
        width, radius = 64 // m, max_distance // m
        probes = sum(math.comb(width, k) for k in range(radius + 1))
        return m * probes * (1 + n / 2.0**width)

    return min(range(MIN_BANDS, MAX_BANDS + 1), key=cost)


class NearDuplicateIndex:
    """Every hash of every test image, for near-duplicate lookups of corpus hashes.

    Entry e, `hashes[e]`, is the hash of crop `boxes[e % len(boxes)]` of test image
    i = e // len(boxes), which belongs to test set `sets[test_set[i]]` and is called `ids[i]`
    there."""

    def __init__(
        self,
        sets: list[str],
        ids: list[str],
        test_set: np.ndarray,
        hashes: np.ndarray,
        boxes: list[tuple[float, float, float, float]],
        max_distance: int,
    ):
        self.sets, self.ids, self.boxes = sets, ids, boxes
        self.test_set = np.asarray(test_set, np.int32)
        self.hashes = np.ascontiguousarray(hashes, np.uint64).ravel()
        self.max_distance = max_distance
        m = choose_bands(len(self.hashes), max_distance)
        radius = max_distance // m
        widths = [64 // m + (i < 64 % m) for i in range(m)]
        shifts = np.cumsum([0] + widths[:-1]).tolist()
        # Per band: (shift, width, where each key's entries start in `order`, the entries
        # sorted by that band, the xor masks to probe): 4 bytes per hash and band.
        self.tables = []
        for shift, width in zip(shifts, widths, strict=True):
            keys = ((self.hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
            order = np.argsort(keys, kind="stable").astype(np.int32)
            starts = np.searchsorted(keys[order], np.arange((1 << width) + 1)).astype(np.int32)
            masks = np.array(
                [sum(1 << b for b in bits) for k in range(radius + 1) for bits in combinations(range(width), k)],
                np.int64,
            )
            self.tables.append((shift, width, starts, order, masks))
        blob = hashlib.sha256(json.dumps([sets, ids, boxes, max_distance]).encode())
        blob.update(self.hashes.tobytes())
        blob.update(self.test_set.tobytes())
        self.digest = blob.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each uint64 query hash: the index entry nearest it within `max_distance` (ties:
        the lowest entry) and its distance; entry -1 and distance -1 where none is."""
        queries = np.asarray(queries, np.uint64)
        found_q: list[np.ndarray] = []
        found_e: list[np.ndarray] = []
        for shift, width, starts, order, masks in self.tables:
            band = ((queries >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
            probes = (band[:, None] ^ masks[None, :]).ravel()
            lo = starts[probes]
            counts = starts[probes + 1] - lo
            total = int(counts.sum())
            if not total:
                continue
            ends = np.cumsum(counts)
            offsets = np.arange(total) - np.repeat(ends - counts, counts)
            found_e.append(order[np.repeat(lo, counts) + offsets].astype(np.int64))
            found_q.append(np.repeat(np.arange(len(queries)).repeat(len(masks)), counts))
        best_e = np.full(len(queries), -1, np.int64)
        best_d = np.full(len(queries), -1, np.int64)
        if not found_q:
            return best_e, best_d
        q, e = np.concatenate(found_q), np.concatenate(found_e)
        d = popcount(queries[q] ^ self.hashes[e])
        near = d <= self.max_distance
        q, e, d = q[near], e[near], d[near]
        order = np.lexsort((e, d, q))
        first = order[np.r_[True, q[order][1:] != q[order][:-1]]] if len(order) else order
        best_e[q[first]], best_d[q[first]] = e[first], d[first]
        return best_e, best_d

    def matches(self, hashes: list[int]) -> list[Match | None]:
        """The nearest test image to each corpus hash, or None beyond `max_distance`."""
        entries, distances = self.nearest(np.array(hashes, np.uint64))
        out: list[Match | None] = []
        for entry, distance in zip(entries.tolist(), distances.tolist(), strict=True):
            if entry < 0:
                out.append(None)
                continue
            image, box = divmod(entry, len(self.boxes))
            out.append(
                Match(self.sets[int(self.test_set[image])], self.ids[image], distance, box_name(self.boxes[box]))
            )
        return out

    def match(self, h: int) -> Match | None:
        """The nearest test image to one corpus hash, or None beyond `max_distance`."""
        return self.matches([h])[0]
