"""Compiled training and evaluation (``train.compile``, ``eval.compile``; pipeline/compile.py).

The distributed guarantees run as phases of one torchrun process group of 2 CPU ranks (and one
more for the resumed run), the inductor compile of the tiny blocks paid once per process: a
compiled ZeRO-2 run stopped and resumed against the same run uninterrupted (bf16, activation
checkpointing, drop path, dropout, EMA), compiled fp32 ZeRO-1 against eager, and compiled
ZeRO-3 with a step the divergence guard skips, whose checkpoint loads into an eager model and
through the timm-format reader, and a compiled ZeRO-3 run resized from 2 ranks to 1 through a
universal checkpoint (a third torchrun, of one rank).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.support.data import write_shards
from tests.support.phases import checkpoint_to_universal, overrides, run_phases

TAG4 = "step_00000004"
COMPILED = {"train.compile.enabled": True}
# Every knob whose state a resume must restore, under a compiled ZeRO-2 run.
Z2 = {
    **COMPILED,
    "deepspeed.zero_stage": 2,
    "model.grad_checkpointing": True,
    "model.drop_path": 0.2,
    "train.ema.decay": 0.7,
    "train.checkpoint_every": 2,
}
FP32 = {"deepspeed.zero_stage": 1, "train.precision": "fp32", "model.dropout": 0.0}
# Rank 0's third micro-batch (step 2) gets a NaN loss: the guard skips that step.
Z3 = {
    **COMPILED,
    "deepspeed.zero_stage": 3,
    "model.grad_checkpointing": True,
    "train.guard.fault.kind": "nan",
    "train.guard.fault.start": 3,
    "train.guard.fault.end": 4,
}
# Stopped on 2 ranks, resumed on 1 from a universal checkpoint (activation checkpointing off).
Z3_RESIZE = {**COMPILED, "deepspeed.zero_stage": 3, "train.checkpoint_every": 2, "train.stop_at_step": 2}
TAG2 = "step_00000002"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ranks) -> dict:
    root = tmp_path_factory.mktemp("compile")
    shards = write_shards(root / "shards", num_classes=4, per_shard=[40, 40, 40])
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def ov(name: str, **kw) -> list[str]:
        return overrides(root / name, shards, uri, **{"train.steps": 4, **kw})

    # ZeRO-3 runs last in a process (it replaces torch.nn.functional.linear process-wide).
    first = run_phases(
        ranks,
        2,
        [
            {"name": "z2", "overrides": ov("z2", **Z2)},
            {"name": "z2_stopped", "overrides": ov("z2_stopped", **Z2, **{"train.stop_at_step": 2})},
            {"name": "fp32_eager", "overrides": ov("fp32_eager", **FP32)},
            {"name": "fp32_compiled", "overrides": ov("fp32_compiled", **FP32, **COMPILED)},
            {"name": "z3", "overrides": ov("z3", **Z3)},
            {"name": "z3_resize", "overrides": ov("z3_resize", **Z3_RESIZE)},
        ],
        root,
        timeout=900,
    )
    resumed = run_phases(
        ranks,
        2,
        [{"name": "z2_stopped", "overrides": ov("z2_stopped", **Z2, **{"train.stop_at_step": 2})}],
        root / "resumed",
        timeout=600,
    )
    universal = checkpoint_to_universal(str(root / "z3_resize" / "checkpoints"), TAG2, str(root / "z3_universal"))
    one_rank = run_phases(
        ranks,
        1,
        [
            {
                "name": "z3_one",
                "overrides": ov("z3_one", **{**Z3_RESIZE, "train.stop_at_step": 0, "train.resume_from": universal}),
                "check_load": {"ckpt_dir": str(root / "z3_resize" / "checkpoints"), "tag": TAG2},
            }
        ],
        root / "one_rank",
        timeout=600,
    )
    return {"root": root, "first": first, "resumed": resumed, "one_rank": one_rank, "shards": shards}


@pytest.mark.timeout(1500)
def test_a_compiled_run_stopped_and_resumed_ends_bit_identical_to_an_uninterrupted_compiled_run(runs):
    from pipeline import checkpoint

    full, first, rest = runs["first"]["z2"], runs["first"]["z2_stopped"], runs["resumed"]["z2_stopped"]
    assert first["summary"]["step"] == 2 and rest["summary"]["step"] == 4 and full["summary"]["step"] == 4
    assert rest["loss_history"] == full["loss_history"], "same compiled steps, same losses"
    dirs = [str(runs["root"] / name / "checkpoints") for name in ("z2", "z2_stopped")]
    for variant in ("raw", "ema"):
        a, b = (checkpoint.load_fp32_weights(d, TAG4, variant) for d in dirs)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{variant} weights differ after the resume"


@pytest.mark.timeout(1500)
def test_compiled_fp32_training_follows_eager_training(runs):
    from pipeline import checkpoint

    eager, compiled = runs["first"]["fp32_eager"], runs["first"]["fp32_compiled"]
    assert [s for s, _ in compiled["loss_history"]] == [1, 2, 3, 4]
    for (step, want), (_, got) in zip(eager["loss_history"], compiled["loss_history"], strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), f"step {step}"
    a, b = (
        checkpoint.load_fp32_weights(str(runs["root"] / n / "checkpoints"), TAG4)
        for n in ("fp32_eager", "fp32_compiled")
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert "compile" not in eager["summary"] and compiled["summary"]["compile"]["seconds"] > 0


@pytest.mark.timeout(1500)
def test_compiled_zero3_trains_through_a_skipped_step_without_graph_breaks_or_a_storm(runs):
    z3 = runs["first"]["z3"]
    assert z3["zero_stage"] == 3 and z3["bf16"] and z3["summary"]["step"] == 4
    assert z3["summary"]["guard"]["skipped_steps"] == 1, "the NaN step was skipped, not applied"
    assert z3["ds_configs"][0]["zero_optimization"]["memory_efficient_linear"] is False
    losses = [v for _, v in z3["loss_history"]]
    assert len(losses) == 4 and all(v == v for i, v in enumerate(losses) if i != 1)
    assert losses[1] != losses[1], "step 2's window has no applied step to average (pipeline.train logs NaN)"
    c = z3["summary"]["compile"]
    assert c["graph_breaks"] == 0, "ZeRO-3's hooks stay outside the compiled blocks"
    assert not c["storm"] and c["recompiles"] <= 4, c["reasons"]


@pytest.mark.timeout(1500)
def test_a_compiled_zero3_run_resizes_from_2_ranks_to_1_through_a_universal_checkpoint(runs):
    two, one = runs["first"]["z3_resize"], runs["one_rank"]["z3_one"]
    assert two["world"] == 2 and two["summary"]["step"] == 2
    assert one["world"] == 1 and one["zero_stage"] == 3 and one["summary"]["step"] == 4
    load = one["load"]  # a fresh compiled engine loading the universal checkpoint
    assert load["names_match"] and load["fp32_max_diff"] == 0.0 and load["module_max_diff"] == 0.0
    assert load["global_steps"] == 2
    assert [s for s, _ in one["loss_history"]] == [1, 2, 3, 4] and one["summary"]["compile"]["graph_breaks"] == 0


@pytest.mark.timeout(1500)
def test_compiled_checkpoints_load_into_an_eager_model_and_through_the_timm_reader(runs, tmp_path):
    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.model import create_model
    from pipeline.weights import load_pretrained

    for name in ("z2", "z3"):
        ckpt = str(runs["root"] / name / "checkpoints")
        weights = checkpoint.load_fp32_weights(ckpt, TAG4)
        assert not [k for k in weights if "_orig_mod" in k or "forward" in k]
        create_model("vit_tiny_test", num_classes=4).load_state_dict(weights, strict=True)
        out = checkpoint.export_safetensors(ckpt, TAG4, str(tmp_path / f"{name}.safetensors"))
        assert sorted(load_file(out)) == sorted(weights)
        model = load_pretrained(out, heads=2)  # timm's names and layouts
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.timeout(1500)
def test_the_compile_cost_is_a_metric_and_a_log_line(runs):
    from mlflow.tracking import MlflowClient

    run_id = runs["first"]["z2"]["summary"]["run_id"]
    client = MlflowClient(f"sqlite:///{runs['root'] / 'mlflow.db'}")
    first = client.get_metric_history(run_id, "compile/first_step_seconds")
    seconds = client.get_metric_history(run_id, "compile/seconds")
    assert [m.step for m in first] == [1] and first[0].value > 0
    assert seconds and 0 < seconds[0].value <= first[0].value
    assert client.get_metric_history(run_id, "compile/recompiles")
    log = (runs["root"] / "log_z2.txt").read_text()
    assert "train.compile: 2 blocks compiled (mode default)" in log


@pytest.mark.timeout(1500)
def test_evaluation_extracts_the_same_features_with_compiled_blocks(runs):
    from omegaconf import OmegaConf

    from pipeline.compile import is_compiled
    from pipeline.config import CompileConfig
    from pipeline.data import iter_eval_batches
    from pipeline.evaluate.fewshot import extract_features
    from pipeline.evaluate.runner import Weights

    ckpt = str(runs["root"] / "fp32_compiled" / "checkpoints")
    eager = Weights(ckpt, TAG4)
    compiled = Weights(ckpt, TAG4, compile=OmegaConf.structured(CompileConfig(enabled=True)))
    assert is_compiled(compiled.model()[0]) and not is_compiled(eager.model()[0])
    # 120 images in batches of 32: the last batch is shorter (one recompile, then a symbolic batch size)
    a, ya = extract_features(eager.model()[0], iter_eval_batches(runs["shards"], 16, 32, 1.0))
    b, yb = extract_features(compiled.model()[0], iter_eval_batches(runs["shards"], 16, 32, 1.0))
    assert a.shape == b.shape == (120, 32) and (ya == yb).all()
    assert abs(a - b).max() < 1e-4
    # the cost is visible in evaluation too: what each evaluation's metrics get (run_evaluators)
    cost = compiled.compile_metrics()
    compiled.release()  # its compile watch stops counting this process's compilations
    assert cost["compile/seconds"] > 0 and cost["compile/recompiles"] >= 1 and eager.compile_metrics() == {}


def test_regional_compilation_keeps_the_names_and_shares_one_graph_across_blocks():
    from torch._dynamo.utils import counters

    from pipeline.compile import compile_blocks
    from pipeline.model import create_model

    torch.manual_seed(0)
    eager = create_model("vit_tiny_test", num_classes=4, depth=6, drop_path=0.2).train()
    compiled = create_model("vit_tiny_test", num_classes=4, depth=6, drop_path=0.2).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 6
    assert list(compiled.state_dict()) == list(eager.state_dict())
    graphs = counters["stats"]["unique_graphs"]
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)
    compiled(x).square().sum().backward()
    # one graph for the rate-0 block (no drop path), one for the first rate, one with the rate symbolic
    assert counters["stats"]["unique_graphs"] - graphs <= 3, "compile work does not grow with depth"
    eager.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(eager(x), compiled(x), atol=1e-5)


def test_a_recompilation_storm_is_a_warning_naming_the_cause(caplog):
    from pipeline.compile import CompileWatch, compile_blocks
    from pipeline.model import create_model

    model = create_model("vit_tiny_test", num_classes=4).eval()
    compile_blocks(model, backend="aot_eager", dynamic=False)  # static shapes: every batch size compiles anew
    watch = CompileWatch(max_recompiles=2)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.compile"), torch.no_grad():
            for batch in (8, 7, 6, 5, 4):
                model(torch.randn(batch, 3, 16, 16))
    finally:
        watch.close()
    assert watch.recompiles >= 3 and watch.warned
    storm = [r.getMessage() for r in caplog.records if "recompilation storm" in r.getMessage()]
    assert len(storm) == 1 and "a batch of another size" in storm[0] and "max_recompiles=2" in storm[0]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["train.compile.mode=reduce-overhead"], "train.compile.mode"),
        (["eval.compile.backend=tvm"], "eval.compile.backend"),
        (
            ["train.compile.enabled=true", "train.compile.mode=max-autotune", "deepspeed.zero_stage=3"],
            "train.compile.mode",
        ),
    ],
)
def test_the_config_check_refuses_compile_settings_that_cannot_work(override, key, tmp_path):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=unused", "train.steps=1", f"output_dir={tmp_path}", *override])
    assert str(e.value).startswith(key)
    if "deepspeed.zero_stage=3" in override:
        assert "deepspeed.zero_stage=3" in str(e.value) and "max-autotune-no-cudagraphs" in str(e.value)


def test_the_plan_takes_a_measured_compiled_mfu_when_training_compiles_and_says_which(tmp_path):
    from pipeline.config import load_config
    from pipeline.plan import make_plan

    cal = {
        "gpu_mfu": {"H100": {"mfu": 0.30, "source": "eager run"}},
        "gpu_mfu_compiled": {"H100": {"mfu": 0.42, "source": "compiled run"}},
    }
    base = [
        "data.train=unused",
        "train.steps=100",
        f"output_dir={tmp_path}",
        "plan.device=H100",
        "plan.num_samples=1000",
        "plan.num_classes=10",
        "model.name=vit_b16",
        "data.micro_batch_size=32",
        "train.global_batch_size=256",
    ]
    target = {
        flag: make_plan(load_config(None, [*base, f"train.compile.enabled={flag}"]), cal=cal)["target"]
        for flag in (False, True)
    }
    assert (target[False]["mfu"], target[False]["mfu_source"]) == (0.30, "eager: eager run")
    assert target[True]["mfu"] == 0.42 and target[True]["mfu_source"].startswith(
        "compiled (train.compile): compiled run"
    )
    only_eager = make_plan(load_config(None, [*base, "train.compile.enabled=true"]), cal={"gpu_mfu": cal["gpu_mfu"]})
    assert only_eager["target"]["mfu"] == 0.30 and "no compiled MFU for H100" in only_eager["target"]["mfu_source"]
