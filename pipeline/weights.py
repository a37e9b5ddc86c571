"""Published ViT weights into our model: vit_jax / big_vision ``.npz`` and timm safetensors.

Three layouts are read, told apart by their keys:

- **vit_jax** (google-research/vision_transformer, the paper's checkpoints): ``embedding/kernel``
  (HWIO), ``cls``, ``Transformer/posembed_input/pos_embedding`` (class token included),
  ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3/Dense_{0,1}}``, ``Transformer/encoder_norm``, optional ``pre_logits`` and ``head``;
  attention kernels are (D, heads, head_dim) for query/key/value and (heads, head_dim, D) for
  out. A ``opt/target/`` prefix (whole training state) is stripped.
- **big_vision**: the same under ``params/``, but ``pos_embedding`` at the top covers the patches
  only (the class token gets none), blocks are ``LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0``, and may be stacked on a leading depth axis
  (``Transformer/encoderblock/...``, ``scan_layers``).
- **timm** (safetensors or ``.npz`` of a ``VisionTransformer`` state dict): our own names.

The model's spec (width, depth, heads, MLP size, patch, grid, pooling, pre-logits, classes) is
read from the shapes; timm files do not carry the number of heads, so it comes from the
registered variant of that width unless given. Note that vit_jax's ``nn.gelu`` is flax's tanh
approximation while our model (as timm) uses the exact GELU; timm loads these weights the
same way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields

import fsspec
import numpy as np
import torch

from pipeline.model import VARIANTS, VisionTransformer, ViTSpec, create_model, resize_pos_embed

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` or ``.safetensors`` file (any fsspec URL), as float32 numpy."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".safetensors"):
        from safetensors.numpy import load

        arrays = load(data)
    elif path.endswith(".npz"):
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"{path}: published weights must be a .npz (vit_jax/big_vision) or .safetensors (timm) file")
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def layout_of(arrays: dict[str, np.ndarray]) -> str:
    """``vit_jax``, ``big_vision`` or ``timm``; raises naming what was found otherwise."""
    if "params/embedding/kernel" in arrays:
        return "big_vision"
    if "embedding/kernel" in arrays or "opt/target/embedding/kernel" in arrays:
        return "vit_jax"
    if "patch_embed.proj.weight" in arrays:
        return "timm"
    raise ValueError(f"not a ViT checkpoint of vit_jax, big_vision or timm; first keys: {sorted(arrays)[:8]}")


def convert(arrays: dict[str, np.ndarray], heads: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Our state dict and the ``create_model`` keyword arguments that fit it."""
    layout = layout_of(arrays)
    if layout == "timm":
        return _from_timm(arrays, heads)
    return _from_flax(arrays, layout)


def _from_flax(arrays: dict[str, np.ndarray], layout: str) -> tuple[dict[str, torch.Tensor], dict]:
    prefix = "params/" if layout == "big_vision" else ("opt/target/" if "opt/target/embedding/kernel" in arrays else "")
    w = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if any(k.startswith("MAPHead") for k in w):
        raise ValueError("attention-pooling (MAP head) checkpoints are not supported: our model pools by token or gap")
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if layout == "big_vision" else (
        "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    depth = (w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if scanned
             else 1 + max(int(m.group(1)) for k in w if (m := _BLOCK.match(k))))

    def block(i: int, name: str) -> np.ndarray:
        return w[f"Transformer/encoderblock/{name}"][i] if scanned else w[f"Transformer/encoderblock_{i}/{name}"]

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    kernel = w["embedding/kernel"]  # (ph, pw, in, D)
    width, patch = kernel.shape[-1], kernel.shape[0]
    sd = {"patch_embed.proj.weight": t(kernel.transpose(3, 2, 0, 1)), "patch_embed.proj.bias": t(w["embedding/bias"])}
    pool = "token" if "cls" in w else "gap"
    pos = w["pos_embedding"] if layout == "big_vision" else w["Transformer/posembed_input/pos_embedding"]
    pos = pos.reshape(1, -1, width)
    if pool == "token":
        sd["cls_token"] = t(w["cls"].reshape(1, 1, width))
        if layout == "big_vision":  # big_vision adds no position embedding to the class token: a zero row is the same
            pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
    sd["pos_embed"] = t(pos)
    grid = int(round((pos.shape[1] - (pool == "token")) ** 0.5))
    q = block(0, f"{mha}/query/kernel")
    num_heads = q.shape[1]
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = t(block(i, "LayerNorm_0/scale")), t(block(i, "LayerNorm_0/bias"))
        sd[p + "attn.qkv.weight"] = t(np.concatenate(
            [block(i, f"{mha}/{n}/kernel").reshape(width, width).T for n in ("query", "key", "value")]))
        sd[p + "attn.qkv.bias"] = t(np.concatenate([block(i, f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]))
        sd[p + "attn.proj.weight"] = t(block(i, f"{mha}/out/kernel").reshape(width, width).T)
        sd[p + "attn.proj.bias"] = t(block(i, f"{mha}/out/bias"))
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = t(block(i, f"{ln2}/scale")), t(block(i, f"{ln2}/bias"))
        for r in (0, 1):
            sd[p + f"mlp.fc{r + 1}.weight"] = t(block(i, f"{mlp}/Dense_{r}/kernel").T)
            sd[p + f"mlp.fc{r + 1}.bias"] = t(block(i, f"{mlp}/Dense_{r}/bias"))
    sd["norm.weight"], sd["norm.bias"] = t(w["Transformer/encoder_norm/scale"]), t(w["Transformer/encoder_norm/bias"])
    representation = None
    if "pre_logits/kernel" in w:
        representation = w["pre_logits/kernel"].shape[-1]
        sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = t(w["pre_logits/kernel"].T), t(w["pre_logits/bias"])
    num_classes = 0
    if "head/kernel" in w and w["head/kernel"].shape[-1] > 0:
        num_classes = w["head/kernel"].shape[-1]
        sd["head.weight"], sd["head.bias"] = t(w["head/kernel"].T), t(w["head/bias"])
    spec = ViTSpec(width=width, depth=depth, heads=num_heads, mlp_dim=block(0, f"{mlp}/Dense_0/kernel").shape[-1],
                   patch_size=patch, img_size=grid * patch)
    return sd, _kwargs(spec, pool, representation, num_classes, layout)


def _from_timm(arrays: dict[str, np.ndarray], heads: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    unsupported = sorted(k for k in arrays if k.split(".")[0] in ("fc_norm", "norm_pre", "reg_token", "attn_pool")
                         or ".ls1." in k or ".ls2." in k or "q_norm" in k or "k_norm" in k)
    if unsupported and any(arrays[k].size for k in unsupported):
        raise ValueError(f"timm weights with parts our ViT does not have: {unsupported[:6]}")
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items() if k not in unsupported}
    if sd.get("head.weight") is not None and sd["head.weight"].numel() == 0:
        sd.pop("head.weight"), sd.pop("head.bias", None)
    kernel = sd["patch_embed.proj.weight"]  # (D, in, ph, pw)
    width, patch = kernel.shape[0], kernel.shape[-1]
    pool = "token" if "cls_token" in sd else "gap"
    tokens = sd["pos_embed"].shape[1]
    if pool == "token" and int(tokens**0.5) ** 2 == tokens:  # timm's no_embed_class: the class token gets no position
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, width), sd["pos_embed"]], dim=1)
    grid = int(round((sd["pos_embed"].shape[1] - (pool == "token")) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if heads is None:
        known = {s.heads for s in VARIANTS.values() if s.width == width}
        if len(known) != 1:
            raise ValueError(f"timm weights do not record the number of heads and width {width} is no known variant's: pass heads")
        heads = known.pop()
    spec = ViTSpec(width=width, depth=depth, heads=heads, mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                   patch_size=patch, img_size=grid * patch)
    representation = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return sd, _kwargs(spec, pool, representation, num_classes, "timm")


def _kwargs(spec: ViTSpec, pool: str, representation: int | None, num_classes: int, layout: str) -> dict:
    name = next((n for n, s in VARIANTS.items() if (s.width, s.depth, s.heads, s.mlp_dim, s.patch_size) ==
                 (spec.width, spec.depth, spec.heads, spec.mlp_dim, spec.patch_size)), "vit_b16")
    kwargs = {f.name: getattr(spec, f.name) for f in fields(ViTSpec)}
    return {"name": name, **kwargs, "pool": pool, "representation_size": representation, "num_classes": num_classes,
            "layout": layout}


def load_pretrained(path: str, img_size: int | None = None, interpolation: str = "bilinear", heads: int | None = None,
                    dropout: float = 0.0) -> VisionTransformer:
    """Our model holding the weights of ``path``, at ``img_size`` (position embeddings resized).

    The pre-training head and pre-logits come along when the file has them; transfer drops
    them with ``reset_head``.
    """
    state, kw = convert(read_arrays(path), heads)
    name, layout = kw.pop("name"), kw.pop("layout")
    trained = kw["img_size"]
    if img_size and img_size != trained:
        if img_size % kw["patch_size"]:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {kw['patch_size']} of {path}")
        kw["img_size"] = img_size
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], img_size // kw["patch_size"],
                                              1 if kw["pool"] == "token" else 0, interpolation)
    model = create_model(name, dropout=dropout, **kw)
    model.load_state_dict(state)
    log.info("loaded %s weights %s: width %d, depth %d, heads %d, patch %d, %d px (trained at %d), pool %s, %d classes",
             layout, path, kw["width"], kw["depth"], kw["heads"], kw["patch_size"], kw["img_size"], trained, kw["pool"],
             kw["num_classes"])
    return model
