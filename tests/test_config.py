"""Configs compose, override from the command line, and fail early naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    Schedule,
    batch_split,
    check_paths,
    load_config,
    to_flat_dict,
)
from pipeline.recipe import deepspeed_config, lr_at, param_groups

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_experiment_config_loads_and_validates():
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name and cfg.train.global_batch_size > 0, path


def test_demo_composes_includes_and_overrides():
    cfg = load_config(
        CONFIGS / "experiment" / "demo.yaml", ["train.steps=7", "deepspeed.zero_stage=3", "output_dir=/tmp/x"]
    )
    assert cfg.model.name == "vit_demo" and cfg.train.steps == 7 and cfg.deepspeed.zero_stage == 3
    assert cfg.data.train == "/tmp/x/shards/glyphs/train_index.json"  # interpolation resolved after overrides
    assert cfg.eval.fewshot[0].name == "digits"
    assert to_flat_dict(cfg)["optim.betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    "override,key",
    [
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
        ("model.pool=max", "model.pool"),
        ("ray.backend=mpi", "ray.backend"),
        ("ray.poll_interval_s=0", "ray.poll_interval_s"),
        ("prep.0.image.resample=cubic", "prep.0.image.resample"),
    ],
)
def test_a_bad_value_fails_fast_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "experiment" / "demo.yaml", [override])


def test_one_loader_and_one_error_for_training_data_prep_and_evaluation(tmp_path):
    """pipeline, data_prep and evaluate compose through data_prep.compose: the same error class,
    the same message form (the key first), choices refused at merge time by their Enum."""
    import data_prep.config
    from pipeline.evaluate.__main__ import resolve

    assert data_prep.config.ConfigError is ConfigError
    cases = [
        (lambda: load_config(CONFIGS / "experiment" / "demo.yaml", ["train.precision=fp8"]), "train.precision"),
        (lambda: data_prep.config.load_config(None, ["source=/in", "output=/out", "source_kind=zip"]), "source_kind"),
        (
            lambda: data_prep.config.load_config(None, ["source=/in", "output=/out", "image.resize_mode=square"]),
            "image.resize_mode",
        ),
        (
            lambda: resolve(str(tmp_path), None, str(CONFIGS / "eval" / "fewshot_digits.yaml"), ["model.pool=max"]),
            "model.pool",
        ),
    ]
    for make, key in cases:
        with pytest.raises(ConfigError) as e:
            make()
        assert str(e.value).startswith(f"{key}: Invalid value"), str(e.value)
        assert "expected one of [" in str(e.value)


def test_batch_split_is_validated_against_the_world_size():
    cfg = load_config(CONFIGS / "experiment" / "demo.yaml")
    assert batch_split(cfg, 2) == 1 and batch_split(cfg, 1) == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_split(cfg, 3)


def test_an_elastic_range_is_refused_unless_every_world_size_in_it_keeps_the_global_batch():
    demo = CONFIGS / "experiment" / "demo.yaml"  # global 128, micro 64: world sizes 1 and 2
    ok = load_config(demo, ["ray.min_workers=1", "ray.num_workers=2", "ray.max_failures=-1"])
    assert [batch_split(ok, w) for w in (1, 2)] == [2, 1]
    wide = ["data.micro_batch_size=8", "ray.num_workers=8", "ray.max_failures=3"]  # 128 / 8 = 16 = world x accumulation
    with pytest.raises(ConfigError) as e:
        load_config(demo, [*wide, "ray.min_workers=3"])
    assert str(e.value) == (
        "ray.min_workers: world sizes 3, 5, 6, 7 of 3..8 cannot keep train.global_batch_size=128 "
        "(data.micro_batch_size 8 "
        "x accumulation x world size); the sizes up to 8 that can: 1, 2, 4, 8 (narrow the range, or change the batch "
        "sizes)"
    )
    for bad, key in (
        (["ray.min_workers=0"], "ray.min_workers"),
        (["ray.min_workers=3"], "ray.min_workers"),  # of 1..2
        (["ray.min_workers=1", "ray.max_failures=0"], "ray.max_failures"),
    ):  # a restart is a failure
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            load_config(demo, ["ray.max_failures=3", *bad])


def test_the_canonical_order_refuses_streams_that_a_world_size_of_the_range_cannot_share():
    from pipeline.config import data_streams

    demo = CONFIGS / "experiment" / "demo.yaml"  # global 128, micro 64
    elastic = ["ray.min_workers=1", "ray.num_workers=2", "ray.max_failures=-1", "data.order=canonical"]
    cfg = load_config(demo, elastic)
    assert [data_streams(cfg, w) for w in (1, 2)] == [16, 16]  # 8 samples of each of 16 streams a step, any size
    assert data_streams(load_config(demo), 2) == 0  # the reader order stays the default
    wide = ["data.micro_batch_size=8", "ray.num_workers=8", "ray.max_failures=3", "data.order=canonical"]
    assert data_streams(load_config(demo, wide), 8) == 128  # micro 8: one sample of each stream
    with pytest.raises(ConfigError) as e:
        load_config(demo, [*wide, "data.streams=4"])
    assert str(e.value) == (
        "data.streams: 4 streams cannot be shared by 8 ranks (a rank reads every 8-th stream); "
        "use a multiple of every world size the run may have"
    )
    with pytest.raises(ConfigError, match=r"^data.streams: 48 streams do not divide train.global_batch_size=128"):
        load_config(demo, [*elastic, "data.streams=48"])
    with pytest.raises(ConfigError, match=r"^data.order: "):
        load_config(demo, ["data.order=global"])


def test_schedule_warmup_end_and_last_step():
    cfg = load_config(
        CONFIGS / "experiment" / "demo.yaml", ["optim.lr=1e-3", "optim.warmup_steps=10", "optim.end_lr=1e-5"]
    )
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 10, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-5)
    assert lr_at(cfg, 55, 100) == pytest.approx(1e-3 + (1e-5 - 1e-3) * 0.5)
    cfg.optim.schedule = Schedule.cosine
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
    off = deepspeed_config(
        load_config(
            CONFIGS / "experiment" / "demo.yaml",
            ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"],
        ),
        1,
    )
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and off["gradient_accumulation_steps"] == 2


def demo(tmp_path: Path, *overrides: str):
    return load_config(CONFIGS / "experiment" / "demo.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])


def test_paths_the_run_makes_itself_pass_the_path_check(tmp_path):
    check_paths(demo(tmp_path))  # demo corpora drawn, then sharded by the prep jobs: nothing exists yet
    check_paths(demo(tmp_path, "eval.enabled=false", "eval.fewshot.0.train=/nonexistent/x.json"))


@pytest.mark.parametrize(
    "override,key,why",
    [
        ("data.train=/nonexistent/train_index.json", "data.train", "does not exist"),
        ("eval.fewshot.0.train=/nonexistent/x.json", "eval.fewshot.0.train", "does not exist"),
        (
            "eval.fewshot.0.test={out}/shards/digits/val_index.json",
            "eval.fewshot.0.test",
            "is not an index that prep.1 writes (its splits: train, test)",
        ),
        (
            "eval.finetune=[{{name: d, train: {out}/shards/digits/train_index.json, test: /nonexistent/t.json}}]",
            "eval.finetune.0.test",
            "does not exist",
        ),
        ("train.resume_from=/nonexistent/step_00000100", "train.resume_from", "does not exist"),
        ("demo.enabled=false", "prep.0.source", "does not exist"),
    ],
)
def test_a_path_that_will_not_exist_fails_the_check_naming_its_key(tmp_path, override, key, why):
    cfg = demo(tmp_path, override.format(out=tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{key}: ") and first.endswith(why)


def test_an_existing_index_passes_and_s3_urls_are_asked_of_fsspec(tmp_path, tiny_shards, monkeypatch):
    import fsspec
    import s3fs

    from tests.support.services import moto_s3

    with moto_s3() as (endpoint, _):
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(k, "testing")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        s3 = s3fs.S3FileSystem(endpoint_url=endpoint)
        s3.mkdir("pathcheck")  # moto backends are process-wide: a bucket no other test uses
        s3.pipe_file("pathcheck/digits/train_index.json", b"{}")
        check_paths(
            demo(tmp_path, f"data.train={tiny_shards}", "eval.fewshot.0.train=s3://pathcheck/digits/train_index.json")
        )
        with pytest.raises(
            ConfigError, match=r"^eval\.fewshot\.0\.test: s3://pathcheck/digits/test_index.json does not exist$"
        ):
            check_paths(demo(tmp_path, "eval.fewshot.0.test=s3://pathcheck/digits/test_index.json"))


def test_pipeline_run_exits_2_naming_the_missing_path_before_starting_ray(tmp_path, capsys):
    import ray

    from pipeline.run import main

    assert (
        main(
            [
                str(CONFIGS / "experiment" / "demo.yaml"),
                f"output_dir={tmp_path / 'run'}",
                "eval.fewshot.0.train=/nonexistent/x.json",
            ]
        )
        == 2
    )
    assert "config error: eval.fewshot.0.train: /nonexistent/x.json does not exist" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_quiet_keeps_the_job_to_warnings_in_the_driver_and_every_worker(tmp_path):
    import logging
    import os

    from pipeline.run import log_level, main

    assert log_level() == logging.INFO
    assert (
        main(
            [
                "--quiet",
                str(CONFIGS / "experiment" / "demo.yaml"),
                f"output_dir={tmp_path / 'run'}",
                "eval.fewshot.0.train=/nonexistent/x.json",
            ]
        )
        == 2
    )
    assert os.environ["PIPELINE_QUIET"] == "1" and os.environ["TQDM_DISABLE"] == "1"  # forwarded to Ray's workers
    assert log_level() == logging.WARNING
