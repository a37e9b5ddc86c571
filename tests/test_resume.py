"""Resuming is exact: mid-epoch by sample keys, and on another world size via universal checkpoints.

Real DeepSpeed on CPU ranks (gloo, DS_ACCELERATOR=cpu) through torchrun. To pay torchrun's
and DeepSpeed's start-up once for many runs, ``tests/workers/train_phases.py`` runs several
trainings ("phases") in one process group; a resume is always a new torchrun invocation,
as it would be after a real stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.data import write_shards
from tests.support.phases import checkpoint_to_universal, keys_by_step, overrides, run_phases

WORKER = ROOT / "tests" / "workers" / "train_phases.py"
TAG4, TAG8 = "step_00000004", "step_00000008"
# Every AugReg knob on, under ZeRO-3 with activation checkpointing, a checkpoint every step.
AUGREG = {
    "deepspeed.zero_stage": 3,
    "model.grad_checkpointing": True,
    "model.drop_path": 0.2,
    "aug.preset": "light2",
    "aug.randaug_layers": 2,
    "aug.randaug_magnitude": 10,
    "aug.mixup_alpha": 0.2,
    "train.ema.decay": 0.7,
    "train.checkpoint_every": 1,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("resume_shards"), num_classes=4, per_shard=[40, 40, 40])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards, ranks) -> dict:
    """A: 8 steps straight. B: stopped at step 4, then rerun. Z2/Z3: 2 ranks stopped at step 4,
    converted to universal checkpoints and resumed on 1 rank. One MLflow store for all."""
    root = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ov = lambda name, **kw: overrides(root / name, shards, uri, **kw)  # noqa: E731
    first = run_phases(
        ranks,
        2,
        [
            {"name": "A", "overrides": ov("A")},
            {"name": "B", "overrides": ov("B", **{"train.stop_at_step": 4})},
            *(
                {"name": f"Z{z}", "overrides": ov(f"Z{z}", **{"train.stop_at_step": 4, "deepspeed.zero_stage": z})}
                for z in (2, 3)
            ),
            {"name": "AUG", "overrides": ov("AUG", **AUGREG)},
            {"name": "AUGB", "overrides": ov("AUGB", **AUGREG, **{"train.stop_at_step": 4})},
        ],
        root,
    )
    second = run_phases(
        ranks,
        2,
        [
            {"name": "B", "overrides": ov("B", **{"train.stop_at_step": 4})},
            {"name": "AUGB", "overrides": ov("AUGB", **AUGREG, **{"train.stop_at_step": 4})},
        ],
        root / "rerun",
    )
    with ThreadPoolExecutor(2) as pool:
        converted = pool.map(
            lambda z: checkpoint_to_universal(str(root / f"Z{z}" / "checkpoints"), TAG4, str(root / f"Z{z}_universal")),
            (2, 3),
        )
        universal = dict(zip((2, 3), converted, strict=True))
    one_rank = run_phases(
        ranks,
        1,
        [
            {
                "name": f"U{z}",
                "overrides": ov(f"U{z}", **{"deepspeed.zero_stage": z, "train.resume_from": universal[z]}),
                "check_load": {"ckpt_dir": str(root / f"Z{z}" / "checkpoints"), "tag": TAG4},
            }
            for z in (2, 3)
        ],
        root / "one_rank",
    )
    return {"root": root, "first": first, "second": second, "one_rank": one_rank, "universal": universal}


@pytest.mark.timeout(600)
def test_a_stopped_and_rerun_training_sees_the_same_samples_at_every_step(runs):
    a, b = keys_by_step(runs["root"] / "A"), keys_by_step(runs["root"] / "B")
    assert sorted(a) == sorted(b) == [0, 1]
    for rank in (0, 1):
        assert sorted(a[rank]) == list(range(8))
        # two micro-batches a step (16 = 4 x 2 ranks x 2): a repeated or skipped batch shows here
        assert all(len(b[rank][s]) == 2 for s in range(8)), {s: len(v) for s, v in b[rank].items()}
        for step in range(8):
            assert b[rank][step] == a[rank][step], f"rank {rank} step {step}"
    # 120 samples, 128 drawn: the run crossed a pass boundary, and stopped inside the first pass
    assert runs["first"]["A"]["summary"]["samples_seen"] == 128 and runs["first"]["B"]["summary"]["samples_seen"] == 64


@pytest.mark.timeout(600)
def test_a_stopped_and_rerun_training_continues_one_mlflow_run_with_the_same_loss_curve(runs):
    a, b_first, b_rest = runs["first"]["A"], runs["first"]["B"], runs["second"]["B"]
    assert b_first["summary"]["step"] == 4 and b_rest["summary"]["step"] == 8
    assert b_rest["summary"]["run_id"] == b_first["summary"]["run_id"], "the run id travels in the checkpoint meta"
    steps_a = [s for s, _ in a["loss_history"]]
    steps_b = [s for s, _ in b_rest["loss_history"]]
    assert steps_a == steps_b == list(range(1, 9)), "one point per step: nothing duplicated or rewound"
    # Same samples, restored RNG (dropout) and optimizer state: the curves agree far inside bf16
    # tolerance (here they are bit-identical; an off-by-one dropout RNG draw alone moves a loss ~1e-3).
    for (step, la), (_, lb) in zip(a["loss_history"], b_rest["loss_history"], strict=True):
        assert lb == pytest.approx(la, rel=1e-4, abs=1e-5), f"step {step}"


@pytest.mark.timeout(600)
def test_with_randaugment_mixup_drop_path_and_ema_a_stopped_and_rerun_training_is_bit_identical(runs):
    import torch

    from pipeline import checkpoint

    a, b = keys_by_step(runs["root"] / "AUG"), keys_by_step(runs["root"] / "AUGB")
    for rank in (0, 1):
        assert [b[rank][s] for s in range(8)] == [a[rank][s] for s in range(8)], f"rank {rank}"
    assert runs["second"]["AUGB"]["summary"]["step"] == 8 and runs["first"]["AUGB"]["summary"]["step"] == 4
    assert runs["second"]["AUGB"]["loss_history"] == runs["first"]["AUG"]["loss_history"], (
        "same augmented batches, same losses"
    )
    dirs = [str(runs["root"] / name / "checkpoints") for name in ("AUG", "AUGB")]
    for variant in ("raw", "ema"):
        w_a, w_b = (checkpoint.load_fp32_weights(d, TAG8, variant) for d in dirs)
        assert sorted(w_a) == sorted(w_b)
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a), f"{variant} weights differ after the resume"
    assert not torch.equal(
        checkpoint.load_fp32_weights(dirs[0], TAG8, "ema")["head.weight"],
        checkpoint.load_fp32_weights(dirs[0], TAG8)["head.weight"],
    )


@pytest.mark.timeout(600)
def test_the_checkpointed_ema_is_the_update_formula_over_the_fp32_weights_and_zero3_ranks_hold_half(runs):
    import torch

    from pipeline import checkpoint

    d, decay = str(runs["root"] / "AUG" / "checkpoints"), AUGREG["train.ema.decay"]
    ema = checkpoint.load_fp32_weights(d, "step_00000000")
    assert all(torch.equal(ema[k], v) for k, v in checkpoint.load_fp32_weights(d, "step_00000000", "ema").items())
    for step in range(1, 9):
        raw = checkpoint.load_fp32_weights(d, f"step_{step:08d}")
        ema = {k: decay * ema[k] + (1 - decay) * raw[k] for k in raw}
        saved = checkpoint.load_fp32_weights(d, f"step_{step:08d}", "ema")
        assert max((saved[k] - ema[k]).abs().max().item() for k in ema) < 1e-6, f"step {step}"
    pieces = [torch.load(Path(d) / TAG8 / f"rank_{r}.pt", weights_only=False)["ema"]["pieces"] for r in (0, 1)]
    held = [sum(t.numel() for t, _ in p.values()) for p in pieces]
    total = sum(v.numel() for v in ema.values())
    assert all(total / 2 <= h < total / 2 + 2 * len(ema) for h in held), (held, total)


@pytest.mark.timeout(600)
def test_the_evaluator_reports_a_checkpoints_ema_weights_as_their_own_variant(runs, shards):
    from omegaconf import OmegaConf

    from pipeline.evaluate.runner import evaluate_checkpoint, evaluated
    from pipeline.rundir import RunDir

    eval_cfg = OmegaConf.create(
        {
            "fewshot": [
                {
                    "name": "tiny",
                    "train": shards,
                    "test": shards,
                    "shots": [1, 5],
                    "seeds": 2,
                    "l2": 1024.0,
                    "batch_size": 64,
                    "crop_ratio": 1.0,
                }
            ],
            "finetune": [],
        }
    )
    run = RunDir(str(runs["root"] / "AUG"))
    assert TAG8 not in evaluated(run, eval_cfg)
    res = evaluate_checkpoint(eval_cfg, str(runs["root"] / "AUG" / "checkpoints"), TAG8, run)
    assert set(res["fewshot"]) == {"tiny"} and set(res["ema"]["fewshot"]) == {"tiny"}
    recs = run.eval_records()[TAG8]
    assert set(recs) == {"fewshot-tiny", "fewshot-tiny-ema"}
    assert recs["fewshot-tiny"]["variant"] == "raw" and recs["fewshot-tiny-ema"]["variant"] == "ema"
    assert set(recs["fewshot-tiny-ema"]["parent_metrics"]) == {"fewshot/ema/tiny/1shot", "fewshot/ema/tiny/5shot"}
    assert set(recs["fewshot-tiny"]["parent_metrics"]) == {"fewshot/tiny/1shot", "fewshot/tiny/5shot"}
    assert TAG8 in evaluated(run, eval_cfg)
    run.fs.rm(run._path("evals", TAG8, "fewshot-tiny-ema.json"))
    assert TAG8 not in evaluated(run, eval_cfg), "a checkpoint with an EMA is done only once its EMA is evaluated"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_universal_checkpoint_resumes_on_another_world_size_with_identical_weights(runs, stage):
    two = runs["first"][f"Z{stage}"]
    one = runs["one_rank"][f"U{stage}"]
    assert two["world"] == 2 and two["zero_stage"] == stage and two["summary"]["step"] == 4
    assert one["world"] == 1 and one["zero_stage"] == stage
    load = one["load"]
    assert load["names_match"]
    assert load["fp32_max_diff"] == 0.0, "fp32 master weights after loading = the 2-rank checkpoint's consolidated fp32"
    assert load["module_max_diff"] == 0.0, "bf16 module weights = those fp32 weights rounded"
    assert load["global_steps"] == 4 and load["meta_step"] == 4
    assert load["lr"] == pytest.approx(3e-3 + (1e-5 - 3e-3) * (4 - 2) / (8 - 2)), "the lr schedule resumes at step 4"
    assert one["summary"]["step"] == 8 and one["summary"]["samples_seen"] == 128
    assert Path(runs["universal"][stage]).parent.joinpath("latest_universal").read_text().strip() == TAG4
    assert (runs["root"] / f"U{stage}" / "checkpoints" / TAG8 / "COMPLETE").is_file()
    # same tracking store: the 1-rank run continues the 2-rank run's MLflow run, steps 5-8
    assert one["summary"]["run_id"] == two["summary"]["run_id"]
    assert [s for s, _ in one["loss_history"]] == list(range(1, 9))


@pytest.mark.timeout(600)
def test_on_another_world_size_the_data_stream_starts_the_next_pass(runs, shards):
    """Readers are dealt afresh for the new world size, so positions cannot carry over: the
    stream starts the pass after the furthest one begun (documented in checkpoint.load)."""
    from pipeline.data import StreamSpec, TrainStream

    spec = StreamSpec(
        index_url=shards,
        rank=0,
        world_size=1,
        num_workers=2,
        batch_size=4,
        image_size=16,
        num_classes=4,
        seed=0,
        shuffle_block=24,
        crop_area=(0.8, 1.0),
        flip=True,
    )
    stream = TrainStream(
        spec, {"batches": 0, "positions": {"0": [1, 0], "1": [1, 0]}, "world_size": 1, "num_workers": 2}
    )
    expected = [next(stream)["keys"] for _ in range(16)]  # steps 4-7, four micro-batches each on one rank
    for stage in (2, 3):
        got = keys_by_step(runs["root"] / f"U{stage}")[0]
        assert sorted(got) == [4, 5, 6, 7]
        assert [k for s in range(4, 8) for k in got[s]] == expected


@pytest.mark.timeout(60)
def test_a_rerun_resumes_from_its_own_checkpoint_before_train_resume_from(tmp_path):
    from pipeline.checkpoint import resume_source, staging_dir
    from pipeline.config import load_config
    from pipeline.rundir import RunDir

    universal = tmp_path / "universal" / "step_00000004"
    (universal / "zero").mkdir(parents=True)
    (universal / "COMPLETE").write_text("")
    cfg = load_config(
        None, ["data.train=unused", "train.steps=8", f"output_dir={tmp_path / 'run'}", f"train.resume_from={universal}"]
    )

    def source():
        return resume_source(staging_dir(cfg.output_dir), RunDir(cfg.run_dir), cfg.train.resume_from)

    assert source() == (str(universal.parent), "step_00000004")
    own = tmp_path / "run" / "checkpoints" / "step_00000006"
    own.mkdir(parents=True)
    assert source() == (str(universal.parent), "step_00000004"), "an incomplete checkpoint is not a source"
    (own / "COMPLETE").write_text("")
    assert source() == (str(own.parent), "step_00000006"), "progress since the universal start is kept"


@pytest.mark.timeout(60)
def test_a_checkpoint_from_another_tracking_store_starts_a_new_mlflow_run(tmp_path):
    from pipeline.config import load_config
    from pipeline.tracking import run_to_resume, tracking_uri

    cfg = load_config(None, ["data.train=unused", "train.steps=8", f"output_dir={tmp_path / 'run'}"])
    here = tracking_uri(cfg)
    assert run_to_resume(None, here, {"mlflow_run_id": "abc", "mlflow_uri": here}) == "abc"
    assert run_to_resume(None, here, {"mlflow_run_id": "abc"}) == "abc", "checkpoints from before the uri was kept"
    assert run_to_resume(None, here, {"mlflow_run_id": "abc", "mlflow_uri": "sqlite:////elsewhere/mlflow.db"}) is None
    assert run_to_resume(None, here, {}) is None
    assert (
        run_to_resume(
            "set-by-the-driver", here, {"mlflow_run_id": "abc", "mlflow_uri": "sqlite:////elsewhere/mlflow.db"}
        )
        == "set-by-the-driver"
    )


def test_the_zero_to_fp32_script_in_a_checkpoint_dir_runs_in_our_venv(runs, tmp_path):
    """DeepSpeed writes ``zero_to_fp32.py`` into every checkpoint dir; it must work as shipped."""
    ckpt_dir = runs["root"] / "Z2" / "checkpoints"
    script = ckpt_dir / "zero_to_fp32.py"
    assert script.is_file()
    out = tmp_path / "fp32"
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt_dir), str(out), "--tag", TAG4, "--safe_serialization"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(load_file(f))
    assert "head.weight" in weights and all(v.dtype.is_floating_point for v in weights.values())
