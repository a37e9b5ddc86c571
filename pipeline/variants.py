"""The ViT's named variants (the paper's Table 1 and its neighbours): shapes only, no torch, so
that checking a config (``pipeline.config``, ``launch/validate.py``) starts in a fraction of a
second. :mod:`pipeline.model` builds them and re-exports both names."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ViTSpec:
    """Shape of a ViT: the paper's Table 1 plus patch size and input resolution."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int = 16
    img_size: int = 224


# Paper Table 1 has B, L and H only. Ti and S are DeiT's (Touvron et al. 2021), as in the
# vit_jax/big_vision configs; g is ViT-g/14 of "Scaling Vision Transformers" (Zhai et al. 2021).
_BASES = {
    "ti": ViTSpec(width=192, depth=12, heads=3, mlp_dim=768),
    "s": ViTSpec(width=384, depth=12, heads=6, mlp_dim=1536),
    "b": ViTSpec(width=768, depth=12, heads=12, mlp_dim=3072),
    "l": ViTSpec(width=1024, depth=24, heads=16, mlp_dim=4096),
    "h": ViTSpec(width=1280, depth=32, heads=16, mlp_dim=5120),
    "g": ViTSpec(width=1408, depth=40, heads=16, mlp_dim=6144),
}

VARIANTS: dict[str, ViTSpec] = {
    f"vit_{base}{patch}": replace(spec, patch_size=patch) for base, spec in _BASES.items() for patch in (32, 16, 14, 8)
}
# A few-minute CPU model for the demo and the tests: 32x32 inputs in 4x4 patches.
VARIANTS["vit_demo"] = ViTSpec(width=128, depth=4, heads=4, mlp_dim=512, patch_size=4, img_size=32)
VARIANTS["vit_tiny_test"] = ViTSpec(width=32, depth=2, heads=2, mlp_dim=64, patch_size=4, img_size=16)
