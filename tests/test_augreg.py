"""AugReg's knobs (RandAugment, mixup, stochastic depth, EMA) and their presets, as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import OPS, _apply, mixup, mixup_lambda, randaugment, sample_rng
from pipeline.config import ConfigError, aug_presets, load_config
from pipeline.ema import EMA
from pipeline.model import create_model, drop_path_rates


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[4:20, 6:26] = rng.integers(0, 255, 3)
    img[24:28] = 215  # bright pixels for solarize
    return np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)


def test_randaugment_is_a_function_of_seed_key_and_pass_only():
    img = _image()
    a = randaugment(img, 2, 15, sample_rng(0, "000000042", 3))
    np.random.seed(123)  # the global RNGs play no part
    torch.manual_seed(123)
    b = randaugment(img, 2, 15, sample_rng(0, "000000042", 3))
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b)
    others = [
        randaugment(img, 2, 15, sample_rng(s, k, p))
        for s, k, p in [(0, f"{i:09d}", 3) for i in range(8)] + [(1, "000000042", 3), (0, "000000042", 4)]
    ]
    assert sum(not np.array_equal(a, o) for o in others) >= len(others) - 2, "keys, seeds and passes draw differently"


@pytest.mark.parametrize("op", OPS)
def test_every_randaugment_op_keeps_shape_and_changes_the_image(op):
    img = _image(1)
    outs = [np.asarray(_apply(op, Image.fromarray(img), 8, sample_rng(0, str(i), 0)).convert("RGB")) for i in range(4)]
    assert all(o.shape == img.shape for o in outs)
    assert any(not np.array_equal(o, img) for o in outs), op


def test_randaugment_with_zero_layers_is_the_identity():
    img = _image()
    assert np.array_equal(randaugment(img, 0, 30, sample_rng(0, "k", 0)), img)


def test_mixup_lambda_is_beta_distributed_folded_above_one_half_and_seeded_by_step():
    lams = [mixup_lambda(0.2, 0, step, 0) for step in range(2000)]
    assert all(0.5 <= x <= 1.0 for x in lams)
    assert lams[:5] == [mixup_lambda(0.2, 0, s, 0) for s in range(5)]
    assert mixup_lambda(0.2, 0, 7, 0) != mixup_lambda(0.2, 1, 7, 0) != mixup_lambda(0.2, 0, 7, 1)
    # max(p, 1-p) of Beta(a, a): E = 0.5 + E|p - 0.5|; for a = 0.2 most mass sits near 0 and 1
    assert 0.85 < np.mean(lams) < 0.95


def test_mixup_mixes_each_example_with_its_neighbour_and_targets_alike():
    x = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).view(3, 2, 2, 2)
    y = torch.eye(3)
    mx, my = mixup(x, y, 0.7)
    assert torch.allclose(mx[1], 0.7 * x[1] + 0.3 * x[0]) and torch.allclose(mx[0], 0.7 * x[0] + 0.3 * x[2])
    assert torch.allclose(my[1], torch.tensor([0.3, 0.7, 0.0]))
    assert torch.allclose(my.sum(-1), torch.ones(3)), "single-label rows stay distributions (softmax loss)"


def test_stochastic_depth_rates_rise_linearly_and_drop_only_in_training():
    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    torch.manual_seed(0)
    m = create_model("vit_tiny_test", num_classes=4, depth=4, drop_path=0.3)
    assert [getattr(b.drop_path, "rate", 0.0) for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain = create_model("vit_tiny_test", num_classes=4, depth=4)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(16, 3, 16, 16)
    m.train()
    plain.train()
    assert not torch.allclose(m.forward_features(x), m.forward_features(x)), "fresh draws per call"
    assert not torch.allclose(m.forward_features(x), plain.forward_features(x))
    m.eval()
    plain.eval()
    assert torch.equal(m.forward_features(x), plain.forward_features(x)), "identity in eval mode"


def test_stochastic_depth_under_activation_checkpointing_replays_the_same_draws():
    torch.manual_seed(0)
    a = create_model("vit_tiny_test", num_classes=4, drop_path=0.5, grad_checkpointing=True).train()
    b = create_model("vit_tiny_test", num_classes=4, drop_path=0.5).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    a.forward_features(x).square().sum().backward()
    torch.manual_seed(1)
    b.forward_features(x).square().sum().backward()
    checked = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if pa.grad is None:  # the head: not in forward_features
            assert pb.grad is None
            continue
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), f"recomputation drew other masks ({name})"
        checked += 1
    assert checked > 10


def test_ema_follows_the_update_formula_with_and_without_warmup():
    m = torch.nn.Linear(3, 2)
    w = [m.weight.detach().clone()]
    ema = EMA(m, 0.9)
    expect = w[0].clone()
    for step in range(1, 4):
        with torch.no_grad():
            m.weight.add_(float(step))
        ema.step(step)
        expect = 0.9 * expect + 0.1 * m.weight.detach()
    assert torch.allclose(ema.full_state_dict()["weight"], expect, atol=1e-6)
    assert ema.updates == 3
    warm = EMA(m, 0.9999, every=2, warmup=True)
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(90) == pytest.approx(0.91)
    warm.step(1)
    assert warm.updates == 0, "every 2nd step only"
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(3, 2), 0.9)
    other.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(other.full_state_dict().values(), ema.full_state_dict().values(), strict=True)
    )


def test_the_presets_are_big_vision_augreg_settings():
    presets = aug_presets()
    table = {k: (v["randaug_layers"], v["randaug_magnitude"], v["mixup_alpha"]) for k, v in presets.items()}
    # big_vision configs/vit_i1k.py RANDAUG_DEF / MIXUP_DEF (heavy = big_vision's "strong")
    assert table == {
        "none": (0, 0, 0.0),
        "light1": (2, 0, 0.0),
        "light2": (2, 10, 0.2),
        "medium1": (2, 15, 0.2),
        "medium2": (2, 15, 0.5),
        "heavy1": (2, 20, 0.5),
        "heavy2": (2, 20, 0.8),
    }


def test_an_experiment_selects_a_preset_by_including_it(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("include:\n  - aug/medium2.yaml\n  - aug/reg.yaml\ndata:\n  train: x\ntrain:\n  steps: 1\n")
    cfg = load_config(str(exp), [f"output_dir={tmp_path}"])
    assert (cfg.aug.preset, cfg.aug.randaug_magnitude, cfg.aug.mixup_alpha) == ("medium2", 15, 0.5)
    assert (cfg.model.dropout, cfg.model.drop_path) == (0.1, 0.1)


@pytest.mark.parametrize(
    "override,key",
    [
        ("aug.mixup_alpha=-0.1", "aug.mixup_alpha"),
        ("aug.randaug_magnitude=31", "aug.randaug_magnitude"),
        ("aug.preset=extreme", "aug.preset"),
        ("aug.randaug_layers=2", "aug.randaug_layers"),  # a preset's values are not silently changed
        ("model.drop_path=1.0", "model.drop_path"),
        ("train.ema.decay=1.0", "train.ema.decay"),
        ("train.ema.every=0", "train.ema.every"),
    ],
)
def test_bad_augreg_values_fail_at_load_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.train=x", "train.steps=1", f"output_dir={tmp_path}", override])


def test_custom_values_need_the_custom_preset(tmp_path):
    cfg = load_config(
        None,
        [
            "data.train=x",
            "train.steps=1",
            f"output_dir={tmp_path}",
            "aug.preset=custom",
            "aug.randaug_layers=3",
            "aug.randaug_magnitude=7",
        ],
    )
    assert cfg.aug.randaug_layers == 3


def test_the_training_stream_applies_randaugment_by_sample_key(tiny_shards):
    from pipeline.data import StreamSpec, TrainStream

    def first_batches(**aug):
        spec = StreamSpec(
            index_url=tiny_shards,
            rank=0,
            world_size=1,
            num_workers=0,
            batch_size=8,
            image_size=16,
            num_classes=4,
            seed=0,
            shuffle_block=16,
            crop_area=(0.8, 1.0),
            flip=False,
            **aug,
        )
        stream = TrainStream(spec)
        return [next(stream) for _ in range(3)]

    plain, aug, again = (
        first_batches(),
        first_batches(randaug_layers=2, randaug_magnitude=10),
        first_batches(randaug_layers=2, randaug_magnitude=10),
    )
    assert [b["keys"] for b in plain] == [b["keys"] for b in aug], "augmentation does not change which samples come"
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(aug, again, strict=True))
    changed = sum(
        not torch.equal(p["images"][i], a["images"][i]) for p, a in zip(plain, aug, strict=True) for i in range(8)
    )
    assert changed >= 12, f"only {changed} of 24 images were augmented"


def test_the_trainer_builds_its_model_with_the_configured_stochastic_depth(tmp_path):
    from pipeline.model import DropPath
    from pipeline.recipe import build_model

    cfg = load_config(
        None,
        ["data.train=x", "train.steps=1", f"output_dir={tmp_path}", "model.name=vit_tiny_test", "model.drop_path=0.1"],
    )
    rates = [m.rate for m in build_model(cfg, 4).modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.1])  # 2 blocks: 0 (identity) and 0.1


def test_a_stage0_bf16_engines_ema_averages_the_fp32_masters_not_the_bf16_weights():
    import deepspeed

    from pipeline.engine import dist_setup

    dist_setup(standalone=True)
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", num_classes=4)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={"train_batch_size": 4, "bf16": {"enabled": True}},
    )
    ema = EMA(engine.module, 0.5, optimizer=engine.optimizer)
    start = ema.full_state_dict()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3])
    engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
    engine.step()
    ema.step(1)
    w = engine.module.blocks[0].mlp.fc1.weight
    master = ema.masters[id(w)].float()
    assert w.dtype == torch.bfloat16 and not torch.equal(master, w.float()), "the master holds more than bf16"
    expect = 0.5 * start["blocks.0.mlp.fc1.weight"] + 0.5 * master
    assert torch.allclose(ema.full_state_dict()["blocks.0.mlp.fc1.weight"], expect, atol=1e-7)
    engine.destroy()
