"""Configs compose, override from the command line, and fail early naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, batch_split, load_config, to_flat_dict
from pipeline.train import deepspeed_config, lr_at, param_groups

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_experiment_config_loads_and_validates():
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name and cfg.train.global_batch_size > 0, path


def test_demo_composes_includes_and_overrides():
    cfg = load_config(CONFIGS / "experiment" / "demo.yaml", ["train.steps=7", "deepspeed.zero_stage=3", "output_dir=/tmp/x"])
    assert cfg.model.name == "vit_demo" and cfg.train.steps == 7 and cfg.deepspeed.zero_stage == 3
    assert cfg.data.train == "/tmp/x/shards/glyphs/train_index.json"  # interpolation resolved after overrides
    assert cfg.eval.fewshot[0].name == "digits"
    assert to_flat_dict(cfg)["optim.betas"] == [0.9, 0.999]


@pytest.mark.parametrize("override,key", [
    ("train.lossy=sigmoid", "lossy"),
    ("train.steps=many", "train.steps"),
    ("train.loss=hinge", "train.loss"),
    ("train.precision=fp8", "train.precision"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.name=vit_q16", "model.name"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param"),
    ("train.global_batch_size=100", "train.global_batch_size"),
    ("data.crop_min_area=0", "data.crop_min_area"),
    ("optim.schedule=step", "optim.schedule"),
])
def test_a_bad_value_fails_fast_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "experiment" / "demo.yaml", [override])


def test_batch_split_is_validated_against_the_world_size():
    cfg = load_config(CONFIGS / "experiment" / "demo.yaml")
    assert batch_split(cfg, 2) == 1 and batch_split(cfg, 1) == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_split(cfg, 3)


def test_schedule_warmup_end_and_last_step():
    cfg = load_config(CONFIGS / "experiment" / "demo.yaml", ["optim.lr=1e-3", "optim.warmup_steps=10", "optim.end_lr=1e-5"])
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 10, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-5)
    assert lr_at(cfg, 55, 100) == pytest.approx(1e-3 + (1e-5 - 1e-3) * 0.5)
    cfg.optim.schedule = "cosine"
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-5) and lr_at(cfg, 55, 100) == pytest.approx((1e-3 + 1e-5) / 2)


def test_weight_decay_applies_to_weight_matrices_only():
    from pipeline.model import create_model

    m = create_model("vit_tiny_test", num_classes=3)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "pos_embed", "norm.weight", "head.bias"}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_deepspeed_config_for_each_stage_and_precision():
    cfg = load_config(CONFIGS / "experiment" / "demo.yaml", ["deepspeed.zero_stage=3", "train.precision=fp16"])
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 1
    off = deepspeed_config(load_config(CONFIGS / "experiment" / "demo.yaml", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"]), 1)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and off["gradient_accumulation_steps"] == 2
