"""Published weights load into our model: logits match a numpy forward pass written from the
vit_jax / big_vision parameter layout itself (models_vit.py, big_vision/models/vit.py)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf

from pipeline.evaluate.runner import Weights
from pipeline.weights import WeightsError, load_pretrained
from tests.support.weights import DEPTH, GRID, HEADS, PATCH, D, flax_params


def _ln(x, scale, bias):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _gelu(x, approximate=False):
    if approximate:  # flax nn.gelu's default
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def flax_forward(p, images_nhwc, big_vision=False, approximate_gelu=False):
    """The ViT forward pass read straight off the flax layout, in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    mha, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if big_vision
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )
    n, h, w, c = images_nhwc.shape
    patches = images_nhwc.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("nijabc,abcd->nijd", patches, p["embedding/kernel"]) + p["embedding/bias"]  # VALID conv, HWIO
    x = x.reshape(n, -1, D)
    token = "cls" in p
    if big_vision:
        x = x + p["pos_embedding"]
        if token:
            x = np.concatenate([np.tile(p["cls"], (n, 1, 1)), x], axis=1)
    else:
        if token:
            x = np.concatenate([np.tile(p["cls"], (n, 1, 1)), x], axis=1)
        x = x + p["Transformer/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        y = _ln(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("nld,dhk->nlhk", y, p[b + f"{mha}/{m}/kernel"]) + p[b + f"{mha}/{m}/bias"]
            for m in ("query", "key", "value")
        )
        logits = np.einsum("nqhk,nlhk->nhql", q / math.sqrt(D // HEADS), k)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("nhql,nlhk->nqhk", att, v)
        x = x + np.einsum("nqhk,hkd->nqd", o, p[b + f"{mha}/out/kernel"]) + p[b + f"{mha}/out/bias"]
        y = _ln(x, p[b + f"{ln2}/scale"], p[b + f"{ln2}/bias"])
        y = _gelu(y @ p[b + f"{mlp}/Dense_0/kernel"] + p[b + f"{mlp}/Dense_0/bias"], approximate_gelu)
        x = x + y @ p[b + f"{mlp}/Dense_1/kernel"] + p[b + f"{mlp}/Dense_1/bias"]
    x = _ln(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    x = x[:, 0] if token else x.mean(1)
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return x @ p["head/kernel"] + p["head/bias"]


def _logits(model, images_nhwc):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float()).double().numpy()


@pytest.fixture
def images():
    return np.random.default_rng(1).standard_normal((3, GRID * PATCH, GRID * PATCH, 3)).astype(np.float32)


@pytest.mark.parametrize("token", [True, False])
def test_vit_jax_npz_gives_the_logits_of_its_own_layout(tmp_path, images, token):
    p = flax_params(np.random.default_rng(0), token=token)
    path = tmp_path / "ViT-test.npz"
    np.savez(path, **p)
    model = load_pretrained(str(path))
    assert model.spec.heads == HEADS and model.spec.depth == DEPTH and model.pool == ("token" if token else "gap")
    want = flax_forward(p, images.astype(np.float64))
    assert np.allclose(_logits(model, images), want, atol=1e-4, rtol=1e-4)
    # The file stands alone: a training-state prefix is stripped the same way.
    np.savez(tmp_path / "state.npz", **{f"opt/target/{k}": v for k, v in p.items()})
    assert np.allclose(_logits(load_pretrained(str(tmp_path / "state.npz")), images), want, atol=1e-4, rtol=1e-4)


def test_flax_tanh_gelu_differs_from_ours_by_little(images):
    p = flax_params(np.random.default_rng(0))
    exact = flax_forward(p, images.astype(np.float64))
    tanh = flax_forward(p, images.astype(np.float64), approximate_gelu=True)
    assert 0 < np.abs(exact - tanh).max() < 1e-2 * np.abs(exact).max()


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz_gives_the_logits_of_its_own_layout(tmp_path, images, scanned):
    p = flax_params(np.random.default_rng(2), big_vision=True)
    saved = dict(p)
    if scanned:  # scan_layers: one stacked "encoderblock" with a leading depth axis
        saved = {k: v for k, v in p.items() if "encoderblock_" not in k}
        for name in {k.split("/", 2)[2] for k in p if "encoderblock_" in k}:
            saved[f"Transformer/encoderblock/{name}"] = np.stack(
                [p[f"Transformer/encoderblock_{i}/{name}"] for i in range(DEPTH)]
            )
    np.savez(tmp_path / "bv.npz", **{f"params/{k}": v for k, v in saved.items()})
    model = load_pretrained(str(tmp_path / "bv.npz"))
    assert np.allclose(
        _logits(model, images), flax_forward(p, images.astype(np.float64), big_vision=True), atol=1e-4, rtol=1e-4
    )


def timm_state(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same parameters under timm's names and torch layouts (as timm's _load_weights maps them)."""
    s = {
        "patch_embed.proj.weight": p["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": p["embedding/bias"],
        "cls_token": p["cls"],
        "pos_embed": p["Transformer/posembed_input/pos_embedding"],
        "norm.weight": p["Transformer/encoder_norm/scale"],
        "norm.bias": p["Transformer/encoder_norm/bias"],
        "pre_logits.fc.weight": p["pre_logits/kernel"].T,
        "pre_logits.fc.bias": p["pre_logits/bias"],
        "head.weight": p["head/kernel"].T,
        "head.bias": p["head/bias"],
    }
    for i in range(DEPTH):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        m = b + "MultiHeadDotProductAttention_1/"
        s[t + "norm1.weight"], s[t + "norm1.bias"] = p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"]
        s[t + "norm2.weight"], s[t + "norm2.bias"] = p[b + "LayerNorm_2/scale"], p[b + "LayerNorm_2/bias"]
        s[t + "attn.qkv.weight"] = np.concatenate(
            [p[m + f"{n}/kernel"].reshape(D, D).T for n in ("query", "key", "value")]
        )
        s[t + "attn.qkv.bias"] = np.concatenate([p[m + f"{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
        s[t + "attn.proj.weight"], s[t + "attn.proj.bias"] = p[m + "out/kernel"].reshape(D, D).T, p[m + "out/bias"]
        for r in (0, 1):
            s[t + f"mlp.fc{r + 1}.weight"] = p[b + f"MlpBlock_3/Dense_{r}/kernel"].T
            s[t + f"mlp.fc{r + 1}.bias"] = p[b + f"MlpBlock_3/Dense_{r}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in s.items()}


def test_timm_safetensors_gives_the_same_logits(tmp_path, images):
    from safetensors.numpy import save_file

    p = flax_params(np.random.default_rng(3))
    save_file(timm_state(p), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="heads"):  # width 48 is no registered variant's
        load_pretrained(str(tmp_path / "model.safetensors"))
    model = load_pretrained(str(tmp_path / "model.safetensors"), heads=HEADS)
    assert np.allclose(_logits(model, images), flax_forward(p, images.astype(np.float64)), atol=1e-4, rtol=1e-4)


def test_loading_at_a_higher_resolution_resizes_position_embeddings(tmp_path):
    p = flax_params(np.random.default_rng(4))
    np.savez(tmp_path / "w.npz", **p)
    model = load_pretrained(str(tmp_path / "w.npz"), img_size=2 * GRID * PATCH, interpolation="bilinear")
    assert model.pos_embed.shape == (1, 1 + (2 * GRID) ** 2, D)
    assert torch.equal(model.pos_embed[0, 0], torch.from_numpy(p["Transformer/posembed_input/pos_embedding"][0, 0]))
    model.reset_head(3)
    assert model(torch.zeros(1, 3, 2 * GRID * PATCH, 2 * GRID * PATCH)).shape == (1, 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_pretrained(str(tmp_path / "w.npz"), img_size=GRID * PATCH + 1)


def test_unknown_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        load_pretrained(str(tmp_path / "other.npz"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_pretrained(str(tmp_path / "w.bin"))


# --- Files that do not fit: every failure is a WeightsError naming the file and the key or shape.


def _saved_npz(tmp_path, p: dict[str, np.ndarray], name: str = "w.npz") -> str:
    np.savez(tmp_path / name, **p)
    return str(tmp_path / name)


def _source_model(heads: int = 16) -> torch.nn.Module:
    """A one-block, gap-pooled model of ViT-B's width with 16 heads (timm's vit_base_patch16_gap_224
    has 16, the paper's B 12)."""
    from pipeline.model import create_model

    torch.manual_seed(0)
    model = create_model("vit_b16", depth=1, heads=heads, img_size=32, pool="gap", num_classes=5)
    with torch.no_grad():
        model.head.weight.normal_(std=0.1)  # zero-init head: logits would not tell head counts apart
    return model.eval()


def _timm_file(tmp_path, state: dict[str, torch.Tensor], name: str = "model.safetensors") -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    return str(tmp_path / name)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_truncated_file_is_named_as_damaged(tmp_path, suffix):
    p = flax_params(np.random.default_rng(5))
    path = _saved_npz(tmp_path, p) if suffix == ".npz" else _timm_file(tmp_path, _source_model().state_dict())
    whole = (tmp_path / Path(path).name).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match=rf"cut{suffix}: damaged or truncated"):
        load_pretrained(str(tmp_path / f"cut{suffix}"))


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    p = flax_params(np.random.default_rng(6))
    key = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/kernel"
    p[key] = np.zeros((D, HEADS, D // HEADS + 1), np.float32)  # 147456 vs 768 x 768 in the report that asked for this
    path = _saved_npz(tmp_path, p)
    with pytest.raises(WeightsError, match=rf"w\.npz: {key} has shape \(48, 4, 13\), .* needs \(48, 4, 12\)"):
        load_pretrained(path)
    state = _source_model().state_dict()
    state["blocks.0.mlp.fc2.weight"] = state["blocks.0.mlp.fc2.weight"][:, :100]
    with pytest.raises(
        WeightsError,
        match=r"model\.safetensors: blocks\.0\.mlp\.fc2\.weight has shape \(768, 100\), "
        r".* needs \(768, 3072\)",
    ):
        load_pretrained(_timm_file(tmp_path, state), heads=16)


def test_a_missing_key_is_named(tmp_path):
    p = flax_params(np.random.default_rng(7))
    del p["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    with pytest.raises(WeightsError, match=r"w\.npz: Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel is missing"):
        load_pretrained(_saved_npz(tmp_path, p))
    state = _source_model().state_dict()
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.bias"):
        kept = {k: v for k, v in state.items() if k != key}
        with pytest.raises(WeightsError, match=rf"model\.safetensors: {re.escape(key)} is missing"):
            load_pretrained(_timm_file(tmp_path, kept), heads=16)


def test_junk_files_are_not_a_vit_checkpoint(tmp_path):
    np.savez(tmp_path / "objects.npz", labels=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(WeightsError, match=r"objects\.npz: not a ViT checkpoint: labels holds Python objects"):
        load_pretrained(str(tmp_path / "objects.npz"))
    junk = np.random.default_rng(8).bytes(4096)
    for name in ("junk.npz", "junk.safetensors"):
        (tmp_path / name).write_bytes(junk)
        with pytest.raises(WeightsError, match=rf"{re.escape(name)}: not a ViT checkpoint"):
            load_pretrained(str(tmp_path / name))
    np.savez(tmp_path / "strings.npz", **{"embedding/kernel": np.array(["a", "b"])})
    with pytest.raises(WeightsError, match=r"strings\.npz: not a ViT checkpoint: embedding/kernel holds <U1 values"):
        load_pretrained(str(tmp_path / "strings.npz"))


def test_flax_files_carry_their_head_count(tmp_path):
    p = flax_params(np.random.default_rng(9))
    path = _saved_npz(tmp_path, p)
    assert (
        load_pretrained(path).spec.heads
        == HEADS
        == p["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
    )
    with pytest.raises(
        WeightsError,
        match=r"w\.npz: heads=6 was asked, but block 0's .*query/kernel is shaped "
        r"\(width, heads, head_dim\) = \(48, 4, 12\)",
    ):
        load_pretrained(path, heads=6)


def test_a_timm_file_gets_the_paper_head_count_said_in_the_log_and_heads_overrides_it(tmp_path, caplog):
    source = _source_model(heads=16)
    path = _timm_file(tmp_path, source.state_dict())
    images = torch.from_numpy(np.random.default_rng(10).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        want = source(images)
    with caplog.at_level(logging.WARNING, logger="pipeline.weights"):
        assumed = load_pretrained(path)
    assert assumed.spec.heads == 12
    (line,) = [r.getMessage() for r in caplog.records if "heads" in r.getMessage()]
    assert path in line and "assuming 12" in line and "vit_b" in line and "width 768" in line and "heads=N" in line
    with torch.no_grad():
        assert not torch.allclose(assumed.eval()(images), want, atol=1e-3)  # 12 heads of 64 are not 16 of 48
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.weights"):
        model = load_pretrained(path, heads=16)
    assert model.spec.heads == 16 and not [r for r in caplog.records if "assuming" in r.getMessage()]
    with torch.no_grad():
        assert torch.equal(model.eval()(images), want)
    assert Weights(init=path, heads=16).model()[0].spec.heads == 16  # what `pretrained ... init_heads=16` loads
    with pytest.raises(WeightsError, match=r"model\.safetensors: heads=7 does not divide the width 768"):
        load_pretrained(path, heads=7)
