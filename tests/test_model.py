"""The ViT variants, their initialisation and the helpers that live next to the model."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model import (
    VARIANTS,
    count_params,
    create_model,
    flops_per_image,
    get_spec,
    resize_pos_embed,
)

# Paper Table 1 (B, L, H) and vit_jax/big_vision for Ti, S, g; 224 px, 1000-class head.
PAPER_PARAMS = {
    "vit_ti16": 5.7e6,
    "vit_s16": 22.1e6,
    "vit_b16": 86e6,
    "vit_l16": 307e6,
    "vit_h14": 632e6,
    "vit_g14": 1.0e9,
}


@pytest.mark.parametrize("name,expected", sorted(PAPER_PARAMS.items()))
def test_parameter_counts_match_the_paper_within_1_5_percent(name, expected):
    n = count_params(name, num_classes=1000)
    assert abs(n - expected) / expected < 0.015, f"{name}: {n / 1e6:.2f}M vs {expected / 1e6:.1f}M"


def test_table1_shapes_for_every_patch_size():
    for base, (layers, width, mlp, heads) in {
        "ti": (12, 192, 768, 3),
        "s": (12, 384, 1536, 6),
        "b": (12, 768, 3072, 12),
        "l": (24, 1024, 4096, 16),
        "h": (32, 1280, 5120, 16),
    }.items():
        for patch in (32, 16, 14):
            s = VARIANTS[f"vit_{base}{patch}"]
            assert (s.depth, s.width, s.mlp_dim, s.heads, s.patch_size) == (layers, width, mlp, heads, patch)


def test_counting_does_not_allocate_the_big_models():
    with torch.device("meta"):
        m = create_model("vit_h14")
    assert all(p.is_meta for p in m.parameters())


def test_state_dict_names_follow_timm():
    names = set(create_model("vit_tiny_test", num_classes=5).state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
        "head.weight",
    ):
        assert key in names


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = create_model("vit_s16", num_classes=100, head_bias_init=-10.0)
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(m.cls_token) == 0
    assert torch.count_nonzero(m.head.weight) == 0 and torch.all(m.head.bias == -10.0)
    fan_in = 3 * 16 * 16
    assert abs(m.patch_embed.proj.weight.std().item() - math.sqrt(1 / fan_in)) / math.sqrt(1 / fan_in) < 0.15
    assert m.blocks[0].norm1.eps == 1e-6
    fc1 = m.blocks[0].mlp.fc1.weight
    assert abs(fc1.std().item() - math.sqrt(2 / sum(fc1.shape))) < 0.002  # xavier uniform


def test_pooling_pre_logits_and_transfer_head():
    x = torch.randn(2, 3, 16, 16)
    gap = create_model("vit_tiny_test", num_classes=7, pool="gap", representation_size=24)
    assert gap.cls_token is None and gap.pos_embed.shape[1] == 16
    assert gap.forward_features(x).shape == (2, 24) and gap(x).shape == (2, 7)
    assert gap.forward_features(x).abs().max() <= 1  # tanh pre-logits
    gap.reset_head(3)
    assert gap.pre_logits is None and gap(x).shape == (2, 3) and torch.count_nonzero(gap.head.weight) == 0


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = create_model("vit_tiny_test", num_classes=3)
    b = create_model("vit_tiny_test", num_classes=3, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.head.weight.data.normal_()
    b.head.weight.data.copy_(a.head.weight.data)
    x = torch.randn(2, 3, 16, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    assert torch.allclose(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad, atol=1e-6)


def test_position_embedding_resize_keeps_class_token_and_is_identity_at_same_size():
    pe = torch.randn(1, 1 + 14 * 14, 32)
    assert resize_pos_embed(pe, 14) is pe
    big = resize_pos_embed(pe, 24)
    assert big.shape == (1, 1 + 24 * 24, 32) and torch.equal(big[:, 0], pe[:, 0])
    smooth = torch.linspace(0, 1, 14).repeat(14, 1).reshape(1, 196, 1).expand(1, 196, 32)
    out = resize_pos_embed(torch.cat([torch.zeros(1, 1, 32), smooth], 1), 24)[0, 1:, 0].reshape(24, 24)
    assert (out[:, 1:] - out[:, :-1]).min() > -1e-3  # a ramp stays a ramp


def test_flops_of_vit_l16_match_the_known_figure():
    # timm lists 61.6 GMACs forward at 224 px, i.e. ~123 GFLOPs; training counts 3x forward.
    assert 120e9 < flops_per_image(get_spec("vit_l16"), training=False) < 126e9
    assert flops_per_image(get_spec("vit_l16")) == 3 * flops_per_image(get_spec("vit_l16"), training=False)


def test_bad_model_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_xxl16")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("vit_b16", img_size=100)


def test_q_k_and_v_are_each_xavier_uniform_square_matrices():
    # vit_jax: three (D, D) kernels; a fused (3D, D) Xavier bound would be sqrt(2)x smaller.
    torch.manual_seed(0)
    d = 384
    qkv = create_model("vit_s16", num_classes=0).blocks[0].attn.qkv
    bound, std = math.sqrt(6 / (d + d)), math.sqrt(2 / (d + d))
    for part in qkv.weight.detach().chunk(3, dim=0):
        assert part.shape == (d, d)
        assert part.abs().max().item() <= bound
        assert part.abs().max().item() > 0.99 * bound  # not the fused bound sqrt(6 / 4D)
        assert abs(part.std().item() - std) / std < 0.02
    assert torch.count_nonzero(qkv.bias) == 0


def test_bilinear_position_embedding_resize_is_vit_jax_scipy_zoom():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8, dtype=torch.float64)
    grid = pe[0, 1:].reshape(14, 14, 8).numpy()
    want = scipy_ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1).reshape(1, 24 * 24, 8)
    got = resize_pos_embed(pe, 24, interpolation="bilinear")
    assert torch.equal(got[:, 0], pe[:, 0])
    assert torch.allclose(got[:, 1:], torch.from_numpy(want), atol=1e-5)
    bicubic = resize_pos_embed(pe, 24, interpolation="bicubic")
    assert not torch.allclose(bicubic[:, 1:], torch.from_numpy(want), atol=1e-2)
    with pytest.raises(ValueError, match="interpolation"):
        resize_pos_embed(pe, 24, interpolation="nearest")
