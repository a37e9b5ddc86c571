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
read from the shapes: the number of heads from the attention kernels of vit_jax/big_vision.
timm files do not carry it: the paper's variant of that width gives it (logged as an
assumption) unless ``heads`` is given. Every array is checked against the shape that spec
implies; a file that does not fit is a :class:`WeightsError` naming the file and the key.
Note that vit_jax's ``nn.gelu`` is flax's tanh approximation while our model (as timm) uses
the exact GELU; timm loads these weights the same way.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import fields

import fsspec
import numpy as np
import torch

from pipeline.model import VARIANTS, VisionTransformer, ViTSpec, create_model, resize_pos_embed

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsError(ValueError):
    """Published weights that cannot be loaded; the message names the file and the key or shape at fault."""


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` or ``.safetensors`` file (any fsspec URL), as float32 numpy."""
    if not path.endswith((".npz", ".safetensors")):
        raise WeightsError(f"{path}: published weights must be a .npz (vit_jax/big_vision) or .safetensors (timm) file")
    with fsspec.open(path, "rb") as f:
        data = f.read()
    arrays = _read_safetensors(path, data) if path.endswith(".safetensors") else _read_npz(path, data)
    out = {}
    for key, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise WeightsError(f"{path}: not a ViT checkpoint: {key} holds {a.dtype} values, not numbers")
        out[key] = np.asarray(a, dtype=np.float32)
    return out


def _read_npz(path: str, data: bytes) -> dict[str, np.ndarray]:
    looks_right = data[:4] == _ZIP_MAGIC  # a zip archive that breaks off is damaged; anything else is no .npz
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - zipfile, pickle refusal, EOF: all mean an unreadable file
        raise WeightsError(_unreadable(path, looks_right, "a .npz archive", e)) from None
    if not hasattr(z, "files"):
        raise WeightsError(f"{path}: not a ViT checkpoint: a single array (.npy), not a .npz archive of named arrays")
    arrays = {}
    with z:
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise WeightsError(_unreadable(path, looks_right, "a .npz archive", e, key)) from None
                raise WeightsError(
                    f"{path}: not a ViT checkpoint: {key} holds Python objects (pickled data is "
                    "never loaded: it can run code)"
                ) from None
            except Exception as e:  # noqa: BLE001 - a member cut short: zlib, CRC, EOF
                raise WeightsError(_unreadable(path, looks_right, "a .npz archive", e, key)) from None
    return arrays


def _read_safetensors(path: str, data: bytes) -> dict[str, np.ndarray]:
    from safetensors.torch import load

    # The format: an 8-byte little-endian header size, then a JSON header, then the tensors' bytes.
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    looks_right = 0 < size <= 100_000_000 and data[8:9] == b"{"
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - SafetensorError of any kind
        raise WeightsError(_unreadable(path, looks_right, "a safetensors file", e)) from None
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in tensors.items()}


def _unreadable(path: str, looks_right: bool, kind: str, e: BaseException, key: str | None = None) -> str:
    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if looks_right:
        where = f" at {key}" if key else ""
        return f"{path}: damaged or truncated: it starts as {kind} but cannot be read{where} ({why}); fetch it again"
    return f"{path}: not a ViT checkpoint: not {kind} ({why})"


def layout_of(arrays: dict[str, np.ndarray], path: str = "weights") -> str:
    """``vit_jax``, ``big_vision`` or ``timm``; raises naming what was found otherwise."""
    if "params/embedding/kernel" in arrays:
        return "big_vision"
    if "embedding/kernel" in arrays or "opt/target/embedding/kernel" in arrays:
        return "vit_jax"
    if "patch_embed.proj.weight" in arrays:
        return "timm"
    raise WeightsError(
        f"{path}: not a ViT checkpoint of vit_jax, big_vision or timm (no embedding/kernel, "
        f"params/embedding/kernel or patch_embed.proj.weight); first keys: {sorted(arrays)[:8]}"
    )


class _Arrays:
    """A file's arrays under one prefix; :meth:`get` fails naming the file and the key (as the
    file spells it) when one is missing or not of the expected shape (``None``: any size)."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str, prefix: str = ""):
        self.arrays, self.path, self.prefix = arrays, path, prefix
        self.what = "a ViT"  # the spec learnt so far, for messages

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def keys(self) -> list[str]:
        return [k[len(self.prefix) :] for k in self.arrays if k.startswith(self.prefix)]

    def get(self, key: str, shape: tuple, index: int | None = None) -> np.ndarray:
        name = self.prefix + key
        if name not in self.arrays:
            raise WeightsError(f"{self.path}: {name} is missing ({self.what} needs it)")
        a = self.arrays[name]
        if index is not None:  # one block of a stacked (scan_layers) array
            if a.ndim == 0 or a.shape[0] <= index:
                raise WeightsError(f"{self.path}: {name} has shape {a.shape}, too few stacked blocks for block {index}")
            a, name = a[index], f"{name}[{index}]"
        if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape, strict=True)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise WeightsError(f"{self.path}: {name} has shape {a.shape}, {self.what} needs {want}")
        return a


def convert(
    arrays: dict[str, np.ndarray], heads: int | None = None, path: str = "weights"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Our state dict and the ``create_model`` keyword arguments that fit it (``path`` names
    the file in errors)."""
    layout = layout_of(arrays, path)
    if layout == "timm":
        return _from_timm(_Arrays(arrays, path), heads)
    prefix = "params/" if layout == "big_vision" else ("opt/target/" if "opt/target/embedding/kernel" in arrays else "")
    return _from_flax(_Arrays(arrays, path, prefix), layout, heads)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _grid(w: _Arrays, key: str, tokens: int, prefix_tokens: int) -> int:
    grid = int(round((tokens - prefix_tokens) ** 0.5))
    if grid * grid != tokens - prefix_tokens:
        raise WeightsError(
            f"{w.path}: {w.prefix}{key} has {tokens} tokens: {tokens - prefix_tokens} patches are no square grid"
        )
    return grid


def _from_flax(w: _Arrays, layout: str, heads: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    if any(k.startswith("MAPHead") for k in w.keys()):
        raise WeightsError(
            f"{w.path}: attention-pooling (MAP head) checkpoints are not supported: our model pools by token or gap"
        )
    mha, mlp, ln2 = names = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if layout == "big_vision"
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )
    depth, block = _flax_blocks(w)
    kernel = w.get("embedding/kernel", (None, None, 3, None))  # (ph, pw, in, D)
    width, patch = kernel.shape[-1], kernel.shape[0]
    w.what = f"a {layout} ViT of width {width} (embedding/kernel)"
    q = f"{mha}/query/kernel"
    num_heads, head_dim = block(0, q, (width, None, None)).shape[1:]  # (D, heads, head_dim): the file says
    if num_heads * head_dim != width or (heads is not None and heads != num_heads):
        asked = f"heads={heads} was asked, but " if heads is not None else ""
        raise WeightsError(
            f"{w.path}: {asked}block 0's {q} is shaped (width, heads, head_dim) = {(width, num_heads, head_dim)}"
            + ("" if num_heads * head_dim == width else f": {num_heads} x {head_dim} is not the width {width}")
        )
    mlp_dim = block(0, f"{mlp}/Dense_0/kernel", (width, None)).shape[1]
    w.what = f"a {layout} ViT of width {width}, {num_heads} heads, MLP {mlp_dim}"
    sd, pool, grid = _flax_embedding(w, layout, kernel)
    spec = ViTSpec(width=width, depth=depth, heads=num_heads, mlp_dim=mlp_dim, patch_size=patch, img_size=grid * patch)
    for i in range(depth):
        sd.update(_flax_block(block, i, names, spec))
    head, representation, num_classes = _flax_head(w, width)
    sd.update(head)
    return sd, _kwargs(spec, pool, representation, num_classes, layout)


def _flax_blocks(w: _Arrays) -> tuple[int, Callable[[int, str, tuple], np.ndarray]]:
    """(depth, ``block(i, name, shape)``: block ``i``'s array ``name``) of the encoder, whether
    its blocks are stacked on a leading depth axis (scan_layers) or one key each."""
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:
        depth = w.get("Transformer/encoderblock/LayerNorm_0/scale", (None, None)).shape[0]
    else:
        blocks = {int(m.group(1)) for k in w.keys() if (m := _BLOCK.match(k))}
        if not blocks:
            raise WeightsError(f"{w.path}: no encoder blocks ({w.prefix}Transformer/encoderblock_<i>/...)")
        depth = 1 + max(blocks)

    def block(i: int, name: str, shape: tuple) -> np.ndarray:
        if scanned:
            return w.get(f"Transformer/encoderblock/{name}", shape, index=i)
        return w.get(f"Transformer/encoderblock_{i}/{name}", shape)

    return depth, block


def _flax_embedding(w: _Arrays, layout: str, kernel: np.ndarray) -> tuple[dict[str, torch.Tensor], str, int]:
    """(the patch embedding, class token and position embedding in our names, pooling, grid
    side) of the file whose ``embedding/kernel`` is ``kernel``."""
    D = kernel.shape[-1]
    sd = {
        "patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _t(w.get("embedding/bias", (D,))),
    }
    pool = "token" if "cls" in w else "gap"
    pos_key = "pos_embedding" if layout == "big_vision" else "Transformer/posembed_input/pos_embedding"
    pos = w.get(pos_key, (1, None, D))
    grid = _grid(w, pos_key, pos.shape[1], int(pool == "token" and layout != "big_vision"))
    if pool == "token":
        sd["cls_token"] = _t(w.get("cls", (1, 1, D)))
        if layout == "big_vision":  # big_vision adds no position embedding to the class token: a zero row is the same
            pos = np.concatenate([np.zeros((1, 1, D), np.float32), pos], axis=1)
    sd["pos_embed"] = _t(pos)
    return sd, pool, grid


def _flax_block(
    block: Callable[[int, str, tuple], np.ndarray], i: int, names: tuple[str, str, str], spec: ViTSpec
) -> dict[str, torch.Tensor]:
    """Encoder block ``i`` in our names; ``names``: its attention, MLP and second LayerNorm."""
    mha, mlp, ln2 = names
    D, H, M = spec.width, spec.heads, spec.mlp_dim
    hd = D // H
    p, sd = f"blocks.{i}.", {}
    sd[p + "norm1.weight"], sd[p + "norm1.bias"] = (
        _t(block(i, "LayerNorm_0/scale", (D,))),
        _t(block(i, "LayerNorm_0/bias", (D,))),
    )
    qkv = ("query", "key", "value")
    sd[p + "attn.qkv.weight"] = _t(
        np.concatenate([block(i, f"{mha}/{n}/kernel", (D, H, hd)).reshape(D, D).T for n in qkv])
    )
    sd[p + "attn.qkv.bias"] = _t(np.concatenate([block(i, f"{mha}/{n}/bias", (H, hd)).reshape(-1) for n in qkv]))
    sd[p + "attn.proj.weight"] = _t(block(i, f"{mha}/out/kernel", (H, hd, D)).reshape(D, D).T)
    sd[p + "attn.proj.bias"] = _t(block(i, f"{mha}/out/bias", (D,)))
    sd[p + "norm2.weight"], sd[p + "norm2.bias"] = (
        _t(block(i, f"{ln2}/scale", (D,))),
        _t(block(i, f"{ln2}/bias", (D,))),
    )
    for r, (n_in, n_out) in enumerate(((D, M), (M, D))):
        sd[p + f"mlp.fc{r + 1}.weight"] = _t(block(i, f"{mlp}/Dense_{r}/kernel", (n_in, n_out)).T)
        sd[p + f"mlp.fc{r + 1}.bias"] = _t(block(i, f"{mlp}/Dense_{r}/bias", (n_out,)))
    return sd


def _flax_head(w: _Arrays, width: int) -> tuple[dict[str, torch.Tensor], int | None, int]:
    """(the final LayerNorm, pre-logits and head in our names, the pre-logits size or None, the
    classes or 0) of a model of ``width``."""
    D = width
    sd = {
        "norm.weight": _t(w.get("Transformer/encoder_norm/scale", (D,))),
        "norm.bias": _t(w.get("Transformer/encoder_norm/bias", (D,))),
    }
    representation = None
    if "pre_logits/kernel" in w:
        representation = w.get("pre_logits/kernel", (D, None)).shape[-1]
        sd["pre_logits.fc.weight"] = _t(w.get("pre_logits/kernel", (D, representation)).T)
        sd["pre_logits.fc.bias"] = _t(w.get("pre_logits/bias", (representation,)))
    num_classes = 0
    if "head/kernel" in w and w.get("head/kernel", (representation or D, None)).shape[-1] > 0:
        num_classes = w.get("head/kernel", (representation or D, None)).shape[-1]
        sd["head.weight"], sd["head.bias"] = (
            _t(w.get("head/kernel", (representation or D, num_classes)).T),
            _t(w.get("head/bias", (num_classes,))),
        )
    return sd, representation, num_classes


def _from_timm(w: _Arrays, heads: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    arrays = w.arrays
    unsupported = sorted(
        k
        for k in arrays
        if k.split(".")[0] in ("fc_norm", "norm_pre", "reg_token", "attn_pool")
        or ".ls1." in k
        or ".ls2." in k
        or "q_norm" in k
        or "k_norm" in k
    )
    if unsupported and any(arrays[k].size for k in unsupported):
        raise WeightsError(f"{w.path}: timm weights with parts our ViT does not have: {unsupported[:6]}")
    kernel = w.get("patch_embed.proj.weight", (None, 3, None, None))  # (D, in, ph, pw)
    width, patch = kernel.shape[0], kernel.shape[-1]
    w.what = f"a timm ViT of width {width} (patch_embed.proj.weight)"
    mlp_dim = w.get("blocks.0.mlp.fc1.weight", (None, width)).shape[0]
    sd = {k: _t(v) for k, v in arrays.items() if k not in unsupported}
    if sd.get("head.weight") is not None and sd["head.weight"].numel() == 0:
        sd.pop("head.weight"), sd.pop("head.bias", None)
    pool = "token" if "cls_token" in sd else "gap"
    tokens = w.get("pos_embed", (1, None, width)).shape[1]
    if pool == "token" and int(tokens**0.5) ** 2 == tokens:  # timm's no_embed_class: the class token gets no position
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, width), sd["pos_embed"]], dim=1)
    grid = _grid(w, "pos_embed", sd["pos_embed"].shape[1], int(pool == "token"))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = _timm_heads(w.path, width, heads)
    spec = ViTSpec(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch, img_size=grid * patch)
    representation = w.get("pre_logits.fc.weight", (None, width)).shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = w.get("head.weight", (None, representation or width)).shape[0] if "head.weight" in sd else 0
    return sd, _kwargs(spec, pool, representation, num_classes, "timm")


def _timm_heads(path: str, width: int, heads: int | None) -> int:
    """The head count of a timm file (which does not record it): ``heads``, else the paper variant's of that width."""
    if heads is not None:
        if heads <= 0 or width % heads:
            raise WeightsError(f"{path}: heads={heads} does not divide the width {width} of patch_embed.proj.weight")
        return heads
    known = sorted({(s.heads, n) for n, s in VARIANTS.items() if s.width == width})
    if len({h for h, _ in known}) != 1:
        raise WeightsError(
            f"{path}: timm weights do not record the number of heads and width {width} is no known "
            "variant's: pass heads (load_pretrained(..., heads=N); init_heads=N on the command line)"
        )
    heads, name = known[0]
    log.warning(
        "%s: timm weights do not record the number of heads; assuming %d, those of %s (the paper's variant "
        "of width %d). A timm model with another count (e.g. vit_base_patch16_gap_224 has 16) needs heads=N "
        "(init_heads=N on the command line), else its outputs are wrong",
        path,
        heads,
        re.sub(r"\d+$", "", name),
        width,
    )
    return heads


def _kwargs(spec: ViTSpec, pool: str, representation: int | None, num_classes: int, layout: str) -> dict:
    name = next(
        (
            n
            for n, s in VARIANTS.items()
            if (s.width, s.depth, s.heads, s.mlp_dim, s.patch_size)
            == (spec.width, spec.depth, spec.heads, spec.mlp_dim, spec.patch_size)
        ),
        "vit_b16",
    )
    kwargs = {f.name: getattr(spec, f.name) for f in fields(ViTSpec)}
    return {
        "name": name,
        **kwargs,
        "pool": pool,
        "representation_size": representation,
        "num_classes": num_classes,
        "layout": layout,
    }


def _check_fits(path: str, state: dict[str, torch.Tensor], model: VisionTransformer, what: str) -> None:
    """Every tensor the model has, of its shape, and nothing else; else an error naming the file and key."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    if missing:
        raise WeightsError(
            f"{path}: {missing[0]} is missing ({what} needs it"
            + (f"; {len(missing)} keys missing)" if len(missing) > 1 else ")")
        )
    extra = [k for k in state if k not in want]
    if extra:
        raise WeightsError(
            f"{path}: {extra[0]} is no part of {what}" + (f" ({len(extra)} such keys)" if len(extra) > 1 else "")
        )
    for k, v in state.items():
        if v.shape != want[k].shape:
            raise WeightsError(f"{path}: {k} has shape {tuple(v.shape)}, {what} needs {tuple(want[k].shape)}")


def load_pretrained(
    path: str,
    img_size: int | None = None,
    interpolation: str = "bilinear",
    heads: int | None = None,
    dropout: float = 0.0,
) -> VisionTransformer:
    """Our model holding the weights of ``path``, at ``img_size`` (position embeddings resized).

    ``heads`` is the number of attention heads where the file does not record it (timm's);
    vit_jax/big_vision files carry it, and a different ``heads`` is an error. The
    pre-training head and pre-logits come along when the file has them; transfer drops them
    with ``reset_head``. Raises :class:`WeightsError` naming the file and the key at fault.
    """
    state, kw = convert(read_arrays(path), heads, path)
    name, layout = kw.pop("name"), kw.pop("layout")
    trained = kw["img_size"]
    if img_size and img_size != trained:
        if img_size % kw["patch_size"]:
            raise WeightsError(
                f"image size {img_size} is not a multiple of the patch size {kw['patch_size']} of {path}"
            )
        kw["img_size"] = img_size
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"], img_size // kw["patch_size"], 1 if kw["pool"] == "token" else 0, interpolation
        )
    model = create_model(name, dropout=dropout, **kw)
    _check_fits(
        path,
        state,
        model,
        f"a {layout} ViT of width {kw['width']}, depth {kw['depth']}, MLP {kw['mlp_dim']}, {kw['num_classes']} classes",
    )
    model.load_state_dict(state)
    log.info(
        "loaded %s weights %s: width %d, depth %d, heads %d, patch %d, %d px (trained at %d), pool %s, %d classes",
        layout,
        path,
        kw["width"],
        kw["depth"],
        kw["heads"],
        kw["patch_size"],
        kw["img_size"],
        trained,
        kw["pool"],
        kw["num_classes"],
    )
    return model
