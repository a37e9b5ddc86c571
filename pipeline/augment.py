"""The AugReg augmentations ("How to train your ViT?", Steiner et al. 2021): RandAugment and mixup.

Both are deterministic functions of named inputs, never of a global RNG, so an exact resume
replays them bit for bit:

* :func:`randaugment` draws from :func:`sample_rng` of (seed, sample key, pass);
* :func:`mixup` draws its one lambda per micro-batch from (seed, step, micro-batch).

RandAugment follows the TensorFlow implementation big_vision uses (``randaug(N, M)``, from the
EfficientNet code): N layers, each picks one of 16 ops uniformly and applies it with a
probability drawn from U(0.2, 0.8); magnitude M is on the 0-10 scale and may exceed it
(``randaug(2, 15)``, ``randaug(2, 20)``); rotations, shears, solarize thresholds and so on scale
linearly with M/10. Pixel sizes that TF states for 224 px images (translate 100 px, cutout 40 px)
scale with the image. Two deliberate differences, both to keep a low magnitude harmless:
posterize keeps ``8 - int(M/10 * 4)`` bits (TF keeps ``int(M/10 * 4)``, i.e. 0 bits = black at
M 0) — solarize keeps TF's threshold ``M/10 * 256``, so at M 0 it inverts, which is why
big_vision notes that ``randaug(2, 0)`` is "actually not nothing".
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)
MAX_LEVEL = 10.0


def sample_rng(seed: int, key: str, pass_idx: int) -> random.Random:
    """The augmentation RNG of one sample in one pass over the data: a function of (seed, key, pass) only."""
    digest = hashlib.blake2b(f"{seed}/{pass_idx}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=FILL)


def _solarize_add(img: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
    a = np.asarray(img, dtype=np.int16)
    added = np.clip(a + addition, 0, 255)
    return Image.fromarray(np.where(a < threshold, added, a).astype(np.uint8))


def _cutout(img: Image.Image, half: int, rng: random.Random) -> Image.Image:
    a = np.array(img)
    h, w = a.shape[:2]
    cy, cx = rng.randrange(h), rng.randrange(w)
    a[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = FILL
    return Image.fromarray(a)


def _apply(name: str, img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    """One op at magnitude ``m`` (0-10 scale, may be larger)."""
    f = m / MAX_LEVEL
    size = img.size[0]
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(f * 30.0, rng), resample=Image.NEAREST, fillcolor=FILL)
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, min(8, 8 - int(f * 4))))
    if name == "Solarize":
        return ImageOps.solarize(img, int(f * 256))
    if name == "SolarizeAdd":
        return _solarize_add(img, int(f * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhancer = {
            "Color": ImageEnhance.Color,
            "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness,
            "Sharpness": ImageEnhance.Sharpness,
        }[name]
        return enhancer(img).enhance(max(0.0, f * 1.8 + 0.1))
    if name == "ShearX":
        return _affine(img, (1, _signed(f * 0.3, rng), 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, _signed(f * 0.3, rng), 1, 0))
    if name == "TranslateX":
        return _affine(img, (1, 0, _signed(f * 100 / 224 * size, rng), 0, 1, 0))
    if name == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, _signed(f * 100 / 224 * size, rng)))
    if name == "Cutout":
        return _cutout(img, int(f * 40 / 224 * size), rng)
    raise ValueError(f"unknown RandAugment op {name!r}")


OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)


def randaugment(image: np.ndarray, num_layers: int, magnitude: float, rng: random.Random) -> np.ndarray:
    """RandAugment(N=``num_layers``, M=``magnitude``) of an HWC uint8 RGB image; HWC uint8 out."""
    img = Image.fromarray(image)
    for _ in range(num_layers):
        op = OPS[rng.randrange(len(OPS))]
        if rng.random() < rng.uniform(0.2, 0.8):
            img = _apply(op, img, magnitude, rng)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def mixup_lambda(alpha: float, seed: int, step: int, micro: int) -> float:
    """big_vision's mixup weight: p ~ Beta(alpha, alpha), then max(p, 1 - p), from (seed, step, micro-batch)."""
    p = float(np.random.default_rng([seed, step, micro, 0x6D6978]).beta(alpha, alpha))
    return max(p, 1.0 - p)


def mixup(images: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with its neighbour in the batch (big_vision rolls the batch by one):
    ``lam * x + (1 - lam) * roll(x, 1)``, and the (multi-hot) targets alike."""
    mixed = images.mul(lam).add_(images.roll(1, dims=0), alpha=1.0 - lam)
    return mixed, targets * lam + targets.roll(1, dims=0) * (1.0 - lam)
