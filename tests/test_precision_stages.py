"""ZeRO stages, offload and precisions on real DeepSpeed (2 CPU ranks), and ZeRO-3 export.

Each run stops at step 2 and is resumed by a new torchrun invocation to step 4; the same
run without the stop is the reference. One MLflow store serves every run.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.data import write_shards
from tests.support.phases import overrides, run_phases

TAG4 = "step_00000004"
# fp16 settings unlike DeepSpeed's defaults, so the test sees ours arrive, not its own.
FP16 = {
    "train.precision": "fp16",
    "deepspeed.fp16_initial_scale_power": 12,
    "deepspeed.fp16_loss_scale_window": 200,
    "deepspeed.fp16_hysteresis": 3,
    "deepspeed.fp16_min_loss_scale": 2.0,
}
FP16_REFUSAL = "ValueError: Type fp16 is not supported on your device."
STAGES = {
    "zero1": {"deepspeed.zero_stage": 1},
    "zero3_offload": {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_param": True},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ranks) -> dict:
    root = tmp_path_factory.mktemp("stages")
    shards = write_shards(root / "shards", num_classes=4, per_shard=[40, 40, 40])
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def ov(name: str, **kw) -> list[str]:
        return overrides(root / name, shards, uri, **{"train.steps": 4, "train.checkpoint_every": 2, **kw})

    # ZeRO-3 replaces torch.nn.functional.linear process-wide (DeepSpeed's memory-efficient
    # linear), which shifts later stage-1/2 runs' numerics: stage-3 runs go last in a process.
    first = run_phases(
        ranks,
        2,
        [
            {"name": "fp16", "overrides": ov("fp16", **FP16), "expect_error": FP16_REFUSAL.split(": ", 1)[1]},
            *(
                phase
                for n, s in STAGES.items()
                for phase in (
                    {"name": f"{n}_ref", "overrides": ov(f"{n}_ref", **s), "save_fp32": str(root / f"{n}_ref_fp32.pt")},
                    {"name": n, "overrides": ov(n, **s, **{"train.stop_at_step": 2})},
                )
            ),
        ],
        root,
    )
    resumed = run_phases(
        ranks,
        2,
        [{"name": n, "overrides": ov(n, **s, **{"train.stop_at_step": 2})} for n, s in STAGES.items()],
        root / "resumed",
    )
    return {"root": root, "first": first, "resumed": resumed}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(STAGES))
def test_each_zero_setup_trains_in_bf16_and_resumes_exactly(runs, name):
    from pipeline import checkpoint

    ref, stopped, resumed = runs["first"][f"{name}_ref"], runs["first"][name], runs["resumed"][name]
    assert stopped["summary"]["step"] == 2 and resumed["summary"]["step"] == 4 and ref["summary"]["step"] == 4
    assert resumed["zero_stage"] == STAGES[name]["deepspeed.zero_stage"] and resumed["world"] == 2
    assert resumed["bf16"] and not resumed["fp16"] and resumed["param_dtype"] == "torch.bfloat16"
    losses = [v for _, v in ref["loss_history"]]
    assert [s for s, _ in resumed["loss_history"]] == [1, 2, 3, 4] and losses[-1] < losses[0]
    for (step, want), (_, got) in zip(ref["loss_history"], resumed["loss_history"], strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), f"step {step}"
    root = runs["root"]
    a = checkpoint.load_fp32_weights(str(root / f"{name}_ref" / "checkpoints"), TAG4)
    b = checkpoint.load_fp32_weights(str(root / name / "checkpoints"), TAG4)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, "resumed weights = uninterrupted weights"


@pytest.mark.timeout(600)
def test_zero3_offload_puts_optimizer_and_parameters_on_the_cpu_with_deepspeeds_cpu_adam(runs):
    run = runs["resumed"]["zero3_offload"]
    zero = run["ds_configs"][0]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert run["offload_optimizer"] == "cpu" and run["offload_param"] == "cpu"
    assert run["optimizer"] == "DeepSpeedCPUAdam"
    assert runs["resumed"]["zero1"]["optimizer"] == "AdamW" and runs["resumed"]["zero1"]["offload_optimizer"] is None


@pytest.mark.timeout(600)
def test_fp16_dynamic_loss_scaling_reaches_deepspeed_and_trains_or_is_refused_on_cpu(runs):
    """DeepSpeed's CPU accelerator refuses fp16 on these machines (DESIGN.md section 5), in the
    engine's sanity check, after parsing the config: the test sees the parsed loss-scale
    settings either way, and the numerics of fp16 are left to a GPU."""
    run = runs["first"]["fp16"]
    sent = run["ds_configs"][0]
    assert sent["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 200,
        "hysteresis": 3,
        "min_loss_scale": 2.0,
    }
    assert sent["bf16"] == {"enabled": False}
    parsed = run["engine_precision"][0]
    assert parsed["fp16"] and not parsed["bf16"] and parsed["dynamic_loss_scale"] and parsed["loss_scale"] == 0
    assert parsed["dynamic_loss_scale_args"] == {
        "init_scale": 2**12,
        "scale_window": 200,
        "delayed_shift": 3,
        "consecutive_hysteresis": False,
        "min_scale": 2,
    }
    if "error" in run:
        assert run["error"] == FP16_REFUSAL
    else:  # an accelerator that supports fp16 trains it
        assert run["fp16"] and run["param_dtype"] == "torch.float16" and run["summary"]["step"] == 4


@pytest.mark.timeout(600)
def test_zero3_export_writes_fp32_weights_that_load_into_a_fresh_model_strictly(runs, tmp_path):
    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.model import create_model

    root = runs["root"]
    out = checkpoint.export_safetensors(
        str(root / "zero3_offload_ref" / "checkpoints"), TAG4, str(tmp_path / "model.safetensors")
    )
    weights = load_file(out)
    assert all(v.dtype == torch.float32 for v in weights.values())
    model = create_model("vit_tiny_test", num_classes=4)
    model.load_state_dict(weights, strict=True)
    trained = torch.load(root / "zero3_offload_ref_fp32.pt")  # the engine's own fp32 master weights at step 4
    assert sorted(trained) == sorted(weights)
    assert max((trained[k] - weights[k]).abs().max().item() for k in weights) == 0.0
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith("head.")), (
        "trained head, not the zero init"
    )
