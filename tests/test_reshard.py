"""A rerun at another world size resumes by itself: the checkpoint manager converts a
checkpoint saved at another world size to DeepSpeed's universal format, and the engine
loads it with every piece of state intact.

Real DeepSpeed on CPU ranks (gloo) through torchrun, as in ``test_resume``: for each ZeRO
stage, 2 ranks train to step 4 and stop; the same command on 1 rank resumes there and stops
at step 6; the same command on 2 ranks again resumes there and finishes at step 8. The
worker dumps the whole fp32 master weights, both Adam moments and the EMA right after each
checkpoint is saved and right after each is loaded (``tests/workers/train_phases.py``).
The runs read in the canonical order (``data.order=canonical``), so each step's samples are
those of a one-rank run's step, across both resizes.
"""

from __future__ import annotations

import pytest

from tests.support.data import write_shards
from tests.support.phases import overrides, run_phases

STAGES = (1, 2, 3)  # ZeRO-3 last in each process: its engine patches torch's linear for the rest of it
TAG4, TAG6 = "step_00000004", "step_00000006"


@pytest.fixture(scope="module")
def resized(tmp_path_factory, ranks) -> dict:
    root = tmp_path_factory.mktemp("reshard")
    shards = write_shards(root / "shards", num_classes=4, per_shard=[40, 40, 40])
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def phase(stage: int, dumps: dict, **extra) -> dict:
        """The same command for every world size (``extra``: where it stops), with its state dumps."""
        ov = overrides(
            root / f"Z{stage}",
            shards,
            uri,
            **{
                "deepspeed.zero_stage": stage,
                "train.ema.decay": 0.7,
                "train.checkpoint_every": 2,
                "data.order": "canonical",
                **extra,
            },
        )
        return {"name": f"Z{stage}", "overrides": ov, **{k: str(root / f"Z{stage}_{v}.pt") for k, v in dumps.items()}}

    two = run_phases(
        ranks, 2, [phase(z, {"save_saved": "saved4"}, **{"train.stop_at_step": 4}) for z in STAGES], root / "two", 600
    )
    one = run_phases(
        ranks,
        1,
        [phase(z, {"save_resumed": "resumed4", "save_saved": "saved6"}, **{"train.stop_at_step": 6}) for z in STAGES],
        root / "one",
        600,
    )
    back = run_phases(ranks, 2, [phase(z, {"save_resumed": "resumed6"}) for z in STAGES], root / "back", 600)
    return {"root": root, "two": two, "one": one, "back": back, "config": lambda stage: phase(stage, {})["overrides"]}


def _assert_same_state(root, before: str, after: str) -> None:
    """Two dumps hold bit-identical fp32 weights, Adam moments (exp_avg, exp_avg_sq) and EMA."""
    import torch

    b, a = (torch.load(root / f"{name}.pt", weights_only=True) for name in (before, after))
    assert sorted(b) == sorted(a) == ["ema", "exp_avg", "exp_avg_sq", "fp32", "step"]
    assert int(a["step"]["global_steps"]) == int(b["step"]["global_steps"])
    for part in ("fp32", "exp_avg", "exp_avg_sq", "ema"):
        assert sorted(b[part]) == sorted(a[part]), part
        for name, tensor in b[part].items():
            assert torch.equal(a[part][name], tensor), f"{part}[{name}] differs after the resize ({before} -> {after})"
    assert any(t.abs().sum() > 0 for t in a["exp_avg_sq"].values()), "the moments are real, not zeros on both sides"


def _conversion_line(log: str, tag: str, saved: int, now: int) -> str:
    lines = [
        line
        for line in log.splitlines()
        if f"checkpoint {tag} saved at world size {saved}, resuming at {now}: converted to universal in" in line
    ]
    assert len(lines) >= 1, f"no conversion line for {tag} ({saved} -> {now} ranks)"
    return lines[0]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", STAGES)
def test_a_rerun_on_fewer_ranks_converts_by_itself_and_resumes_with_identical_weights_moments_and_ema(resized, stage):
    from pipeline import checkpoint
    from pipeline.rundir import RunDir

    root, name = resized["root"], f"Z{stage}"
    two, one = resized["two"][name], resized["one"][name]
    assert two["world"] == 2 and one["world"] == 1 and one["zero_stage"] == stage
    assert two["summary"]["step"] == 4 and one["summary"]["step"] == 6
    _assert_same_state(root, f"{name}_saved4", f"{name}_resumed4")
    _conversion_line((root / "one" / "log_Z1.txt").read_text(), TAG4, 2, 1)
    assert one["summary"]["run_id"] == two["summary"]["run_id"], "the same MLflow run goes on"
    # the conversion lives beside the run's tags, never listed, published or pruned as one of them
    assert RunDir(str(root / name)).checkpoints.complete_tags() == [
        "step_00000000",
        "step_00000002",
        TAG4,
        TAG6,
        "step_00000008",
    ]
    assert checkpoint.is_universal(root / name / "checkpoints" / checkpoint.UNIVERSAL / TAG6)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", STAGES)
def test_a_rerun_back_on_more_ranks_resumes_with_identical_state_and_finishes_one_mlflow_run(resized, stage):
    root, name = resized["root"], f"Z{stage}"
    one, back = resized["one"][name], resized["back"][name]
    assert back["world"] == 2 and back["summary"]["step"] == 8 and back["summary"]["samples_seen"] == 128
    _assert_same_state(root, f"{name}_saved6", f"{name}_resumed6")
    _conversion_line((root / "back" / "log_Z1.txt").read_text(), TAG6, 1, 2)
    assert back["summary"]["run_id"] == one["summary"]["run_id"]
    assert [s for s, _ in back["loss_history"]] == list(range(1, 9)), "one loss point per step across both resizes"


def _tag(ckpt_dir, tag: str, world_size: int | None, universal: bool = False):
    import json

    tag_dir = ckpt_dir / tag
    (tag_dir / "zero" if universal else tag_dir).mkdir(parents=True)
    (tag_dir / "meta.json").write_text(
        json.dumps({"step": 4, "files": {}, **({"world_size": world_size} if world_size else {})})
    )
    (tag_dir / "COMPLETE").write_text("")
    return tag_dir


@pytest.mark.timeout(60)
def test_a_complete_conversion_is_reused_and_a_checkpoint_of_this_world_size_is_loaded_as_it_is(tmp_path, caplog):
    from pipeline import checkpoint
    from pipeline.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    staging = checkpoint.staging_dir(str(tmp_path / "run"))
    _tag(tmp_path / "run" / "checkpoints", TAG4, world_size=2)
    converted = _tag(tmp_path / "run" / "checkpoints" / checkpoint.UNIVERSAL, TAG4, world_size=2, universal=True)
    with caplog.at_level("INFO", logger="pipeline.checkpoint"):
        assert checkpoint.CheckpointManager(run, staging).prepare() == (str(converted.parent), TAG4)
    assert "its universal conversion" in caplog.text and "is reused" in caplog.text
    assert run.checkpoints.complete_tags() == [TAG4], "the conversion is not one of the run's tags"

    _tag(tmp_path / "run" / "checkpoints", TAG6, world_size=1)
    assert checkpoint.CheckpointManager(run, staging).prepare() == (staging, TAG6), "saved at this world size (1)"
    _tag(tmp_path / "run" / "checkpoints", "step_00000008", world_size=None)
    assert checkpoint.CheckpointManager(run, staging).prepare() == (staging, "step_00000008"), "no world size recorded"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", STAGES)
def test_in_the_canonical_order_every_step_across_both_resizes_takes_the_samples_of_a_one_rank_run(resized, stage):
    from collections import Counter

    from pipeline.config import data_streams, load_config
    from pipeline.data import StreamSpec, train_stream
    from tests.support.phases import keys_by_step

    root, name = resized["root"], f"Z{stage}"
    cfg = load_config(None, resized["config"](stage))
    assert cfg.data.order == "canonical" and data_streams(cfg, 1) == 16
    logged: dict[int, Counter] = {}
    for steps in keys_by_step(root / name).values():  # ranks 0 and 1: 2 ranks, then 1, then 2 again
        for step, micro_batches in steps.items():
            logged.setdefault(step, Counter()).update(k for keys in micro_batches for k in keys)
    assert sorted(logged) == list(range(8)) and all(sum(c.values()) == 16 for c in logged.values())
    spec = StreamSpec(
        index_url=cfg.data.train,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=4,
        image_size=16,
        num_classes=4,
        seed=cfg.train.seed,
        shuffle_block=cfg.data.shuffle_block,
        crop_area=(0.8, 1.0),
        flip=True,
        streams=16,
        global_batch=16,
    )
    one_rank = train_stream(spec)
    for step in range(8):
        expected = Counter(k for _ in range(4) for k in next(one_rank)["keys"])
        assert logged[step] == expected, f"step {step} took other samples than a 1-rank run's step {step}"


@pytest.mark.timeout(900)
def test_in_the_canonical_order_a_run_resized_2_to_1_ranks_follows_the_loss_curve_of_a_fixed_2_rank_run(
    tmp_path, ranks
):
    """Without dropout (whose masks are per rank), the only difference left is the order of
    the gradient sums: the curves agree to fp32 rounding, before the resize to the bit."""
    shards = write_shards(tmp_path / "shards", num_classes=4, per_shard=[40, 40, 40])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def phase(name: str, **extra) -> dict:
        return {
            "name": name,
            "overrides": overrides(
                tmp_path / name,
                shards,
                uri,
                **{
                    "deepspeed.zero_stage": 2,
                    "model.dropout": 0.0,
                    "data.order": "canonical",
                    "train.checkpoint_every": 4,
                    "train.precision": "fp32",
                    **extra,
                },
            ),
        }

    two = run_phases(ranks, 2, [phase("fixed"), phase("resized", **{"train.stop_at_step": 4})], tmp_path / "two", 600)
    one = run_phases(ranks, 1, [phase("resized")], tmp_path / "one", 600)
    fixed, resized = dict(two["fixed"]["loss_history"]), dict(one["resized"]["loss_history"])
    assert sorted(fixed) == sorted(resized) == list(range(1, 9)), "every step logged once"
    assert all(resized[s] == fixed[s] for s in range(1, 5)), "the same run until the resize"
    worst = max(abs(resized[s] - fixed[s]) / abs(fixed[s]) for s in range(5, 9))
    print(f"\nloss after the 2 -> 1 resize vs fixed 2 ranks: largest relative difference {worst:.2e}")
    assert worst < 1e-5, {s: (fixed[s], resized[s]) for s in range(5, 9)}
