"""The Vision Transformer of Dosovitskiy et al. (arXiv 2010.11929) and its named variants.

One file holds the model, its blocks and the helpers that belong next to it (initialisation,
position-embedding resizing, FLOP counting); the variants' shapes are in :mod:`pipeline.variants`.
Parameter names follow timm's ``VisionTransformer`` so that exported weights load there unchanged.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.variants import VARIANTS, ViTSpec  # the registry of variants (torch-free), re-exported


class PatchEmbed(nn.Module):
    """Image to a sequence of patch embeddings by a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, width: int, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training, each sample's
    branch output is zeroed with probability ``rate`` and the kept ones scaled by 1/(1-rate);
    identity in eval mode. Draws from the torch RNG, so the RNG state that checkpoints save
    (and ``torch.utils.checkpoint`` replays in recomputation) fixes the draws."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        # Uniform draws compared with ``keep`` rather than ``bernoulli_(keep)``, and no branch on
        # the rate: under torch.compile the rate stays a symbolic input, so the blocks of a
        # model (each its own rate) share one compiled graph instead of one each.
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 (first block) to ``rate`` (last), as timm."""
    return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)); both branches under
    stochastic depth when ``drop_path`` > 0."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PreLogits(nn.Module):
    """The optional representation layer (Dense + tanh) used during pre-training."""

    def __init__(self, width: int, size: int):
        super().__init__()
        self.fc = nn.Linear(width, size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT with a class token or global average pooling, as in the paper.

    ``forward_features`` returns the pre-logits representation (what few-shot probes use);
    ``forward`` adds the classifier head. ``drop_path`` is the last block's stochastic-depth
    rate (AugReg's 0.1; rates rise linearly over depth from 0). ``head_bias_init`` -10 with the sigmoid loss is
    big_vision's i21k/JFT recipe (its ``vit_i21k.py`` config), not something the paper states.
    """

    def __init__(
        self,
        spec: ViTSpec,
        num_classes: int = 1000,
        pool: str = "token",
        representation_size: int | None = None,
        dropout: float = 0.0,
        head_bias_init: float = 0.0,
        grad_checkpointing: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if pool not in ("token", "gap"):
            raise ValueError(f"pool must be 'token' or 'gap', got {pool!r}")
        self.spec = spec
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens = 1 if pool == "token" else 0
        width = spec.width
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "token" else None
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + self.num_prefix_tokens, width))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, spec.heads, spec.mlp_dim, dropout, rate) for rate in drop_path_rates(drop_path, spec.depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pre_logits = PreLogits(width, representation_size) if representation_size else None
        self.num_features = representation_size or width
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else None
        self.init_weights(head_bias_init)

    @torch.no_grad()
    def init_weights(self, head_bias_init: float = 0.0) -> None:
        """The paper's (vit_jax) initialisation."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.endswith("attn.qkv"):
                # vit_jax has three (D, D) Dense kernels for q, k and v, each Xavier-uniform on its
                # own; one bound over the fused (3D, D) matrix would be sqrt(2)x smaller.
                for part in module.weight.chunk(3, dim=0):
                    nn.init.xavier_uniform_(part)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.normal_(module.bias, std=1e-6) if ".mlp." in f".{name}." else nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))  # lecun normal
                nn.init.zeros_(module.bias)
        if self.pre_logits is not None:
            nn.init.trunc_normal_(self.pre_logits.fc.weight, std=math.sqrt(1.0 / self.spec.width))
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, head_bias_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "token" else x.mean(dim=1)
        return self.pre_logits(x) if self.pre_logits is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(x) if self.head is not None else x

    def reset_head(self, num_classes: int) -> None:
        """Drop the pre-training head (and pre-logits) for transfer; new head is zero-init."""
        self.pre_logits = None
        self.num_features = self.spec.width
        self.head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)


def get_spec(name: str, **overrides) -> ViTSpec:
    """The registered spec ``name`` with any non-None field overridden."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(VARIANTS))}")
    known = {f.name for f in fields(ViTSpec)}
    return replace(VARIANTS[name], **{k: v for k, v in overrides.items() if k in known and v is not None})


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Build a registered variant, e.g. ``create_model("vit_l16", num_classes=21843)``.

    Spec fields (width, depth, heads, mlp_dim, patch_size, img_size) may be overridden;
    the rest go to :class:`VisionTransformer`.
    """
    spec_keys = {f.name for f in fields(ViTSpec)}
    spec = get_spec(name, **{k: v for k, v in kwargs.items() if k in spec_keys})
    return VisionTransformer(spec, **{k: v for k, v in kwargs.items() if k not in spec_keys})


def from_config(model_cfg, num_classes: int, **kwargs) -> VisionTransformer:
    """The architecture a config's ``model`` section names (variant, resolution, patch,
    pooling, pre-logits) with a ``num_classes`` head; ``kwargs``: the rest (``img_size`` to
    override the resolution, dropout, drop path, ...), which a caller states for its purpose."""
    kwargs.setdefault("img_size", model_cfg.img_size)
    return create_model(
        model_cfg.name,
        num_classes=num_classes,
        patch_size=model_cfg.patch_size,
        pool=model_cfg.pool,
        representation_size=model_cfg.representation_size,
        **kwargs,
    )


def count_params(name: str, **kwargs) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def flops_per_image(spec: ViTSpec, num_classes: int = 0, training: bool = True) -> float:
    """Model FLOPs (multiply-add = 2) for one image; training counts forward + backward (3x)."""
    n = (spec.img_size // spec.patch_size) ** 2 + 1
    d, m = spec.width, spec.mlp_dim
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    total = spec.depth * per_layer + 2 * (n - 1) * 3 * spec.patch_size**2 * d + 2 * d * num_classes
    return 3.0 * total if training else float(total)


POS_EMBED_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_pos_embed(
    posemb: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize (1, prefix + g*g, D) position embeddings to a new grid by 2-D interpolation.

    The class-token embedding is kept apart, as in the paper's fine-tuning at higher
    resolution. Returns the input unchanged when the grid already matches.
    ``bilinear`` is vit_jax's ``scipy.ndimage.zoom(grid, order=1)``, which maps corner onto
    corner: that is ``align_corners=True`` (``False`` differs from it by up to ~0.7 of the
    values' scale); ``bicubic`` is timm's (``align_corners=False``).
    """
    if interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {interpolation!r}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings of {grid.shape[1]} tokens are not a square grid")
    if old == new_grid:
        return posemb
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=interpolation, align_corners=interpolation == "bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
