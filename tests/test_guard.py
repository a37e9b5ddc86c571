"""The divergence guard (pipeline.guard) on its own, then on real DeepSpeed CPU ranks.

Faults come from ``train.guard.fault`` (a test-only setting: rank 0's loss of chosen batches of
its data stream made NaN), so a rollback's data skip moves past them as past bad data:

- one non-finite step: its update is skipped, training goes on, no checkpoint while it is recent;
- a sustained one (ZeRO-3, bf16): rolled back to the checkpoint before it, the batches since
  then skipped (the same keys an untouched stream delivers next); a run killed right after the
  decision resumes, skips the same batches and ends bit-identical to the uninterrupted one;
- one that never ends: after ``max_rollbacks`` the run stops with ``Exit.DIVERGED`` through
  ``launch/train_dist.sh`` (torchrun); through ``launch/pretrain.sh`` (Ray; nothing after the
  fault published or evaluated) in tests/test_recovery.py, with the other whole jobs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import guard
from pipeline.config import ConfigError, GuardConfig, load_config
from pipeline.stop import Exit
from tests.support import DEMO, ROOT
from tests.support.data import write_shards
from tests.support.jobs import complete_steps
from tests.support.phases import guard_run_overrides, ranks_env
from tests.support.services import free_port


def _cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(GuardConfig), kw)


def _step(g: guard.Guard, step: int, loss: float, ds_skipped: bool = False) -> guard.Verdict:
    return g.settle(g.judge(step, torch.tensor(loss), 1), ds_skipped)


def test_spikes_are_judged_against_the_running_median_after_warmup_only():
    g = guard.Guard(_cfg(spike_factor=2.0, spike_window=10), warmup_steps=5)
    assert _step(g, 1, 100.0).reason is None  # in warm-up: no spike judged, but the loss is history
    for s in range(2, 12):
        assert _step(g, s, 1.0 + 0.1 * (s % 2)).reason is None
    v = _step(g, 12, 2.3)
    assert v.reason == guard.SPIKE and v.ratio == pytest.approx(2.3 / 1.05)
    assert _step(g, 13, 2.0).reason is None  # 2.0 / median 1.05 < 2
    assert _step(g, 14, float("inf")).reason == guard.NONFINITE
    assert _step(g, 15, 1.0, ds_skipped=True).reason == guard.GRAD  # DeepSpeed found a non-finite gradient norm
    assert g.skipped == 3 and g.metrics()["guard/max_loss_ratio"] == pytest.approx(2.3 / 1.05)


def test_fp16_overflow_skips_are_the_loss_scaler_not_unhealthy_steps():
    g = guard.Guard(_cfg(), warmup_steps=0, fp16=True)
    assert _step(g, 1, 1.0, ds_skipped=True).reason is None and g.skipped == 0


def test_trouble_needs_max_bad_steps_within_the_window_and_blocks_checkpoints_meanwhile():
    g = guard.Guard(_cfg(max_bad=3, bad_window=5), warmup_steps=0)
    nan = float("nan")
    assert g.trouble(_step(g, 1, nan)) is None
    assert not g.may_checkpoint(5) and g.may_checkpoint(6)
    _step(g, 2, 1.0)
    assert g.trouble(_step(g, 4, nan)) is None
    assert g.trouble(_step(g, 7, nan)) is None  # step 1 has left the window (7 - 5)
    t = g.trouble(_step(g, 8, nan))
    assert t == guard.Trouble(4, 8, [4, 7, 8])
    assert guard.target([0, 3, 4, 6], t) == 3 and guard.target([4, 8], t) is None
    sudden = guard.Guard(_cfg(rollback_on_nonfinite=True), warmup_steps=0)
    assert sudden.trouble(_step(sudden, 1, nan)) == guard.Trouble(1, 1, [1])


def test_state_round_trips_and_a_resume_replays_only_the_rollbacks_its_checkpoint_missed():
    g = guard.Guard(_cfg(spike_window=4), warmup_steps=0)
    for s, loss in enumerate([1.0, 2.0, float("nan"), 3.0, 4.0, 5.0], 1):
        _step(g, s, loss)
    other = guard.Guard(_cfg(spike_window=4), warmup_steps=0)
    other.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert other.state_dict() == g.state_dict() and list(other.history) == [2.0, 3.0, 4.0, 5.0]
    events = [{"to_step": 4, "batches": 10}, {"to_step": 8, "batches": 30}, {"to_step": 8, "batches": 40}]
    assert guard.pending_skip(events, seen=1, step=8) == events[2]
    assert guard.pending_skip(events, seen=3, step=8) is None  # saved after all three
    assert guard.pending_skip(events, seen=0, step=12) is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.guard.spike_factor=1", "train.guard.spike_factor"),
        ("train.guard.max_bad=30", "train.guard.max_bad"),
        ("train.guard.fault.kind=nan", "train.guard.fault.start"),
        ("train.precision=fp32", "train.guard.enabled"),  # with deepspeed.zero_stage=0 below
    ],
)
def test_bad_guard_settings_fail_before_anything_starts_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(str(DEMO), [override, "deepspeed.zero_stage=0"] if "fp32" in override else [override])


# ---------------------------------------------------------------- on real DeepSpeed ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("guard_shards"), num_classes=4, per_shard=[40, 40, 40])


def _torchrun(
    ranks, out: Path, shards: str, *extra: str, expect: int = 0, nproc: int = 2
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "pipeline.train",
        str(DEMO),
        *guard_run_overrides(out, shards, *extra),
    ]
    proc = ranks.run(cmd, env=ranks_env(), cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _summary(proc) -> dict:
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"step"')))


def _keys(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"sample_keys_rank{rank}.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import load_fp32_weights

    return load_fp32_weights(str(out / "checkpoints"), f"step_{step:08d}")


@pytest.mark.timeout(260)
def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, shards, ranks):
    out = tmp_path / "run"
    proc = _torchrun(
        ranks, out, shards, "train.guard.fault.kind=nan", "train.guard.fault.start=13", "train.guard.fault.end=14"
    )
    s = _summary(proc)
    assert s["step"] == 12 and math.isfinite(s["loss"])
    assert s["guard"] == {"skipped_steps": 1, "rollbacks": [], "diverged": None}
    assert "step 7 unhealthy (non-finite loss" in proc.stderr
    # step 8's checkpoint falls within bad_window (20) of step 7; the healthy last step is saved
    assert complete_steps(out) == [0, 4, 12]
    weights = _weights(out, 12)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.timeout(600)
def test_a_rollback_skips_the_data_since_its_checkpoint_and_replays_exactly_after_a_kill(tmp_path, shards, ranks):
    fault = [
        "deepspeed.zero_stage=3",
        "train.guard.fault.kind=nan",
        "train.guard.fault.start=13",
        "train.guard.fault.end=18",
    ]
    whole = tmp_path / "whole"
    s = _summary(_torchrun(ranks, whole, shards, *fault))
    (event,) = s["guard"]["rollbacks"]
    # batches 13-17 of rank 0 are steps 7-9 (2 a step): three unhealthy steps, back to step 4,
    # the 5 steps since skipped (80 samples); the stream goes on at batch 19
    assert event == {
        "at_step": 9,
        "first_bad": 7,
        "bad_steps": [7, 8, 9],
        "reasons": "non-finite loss",
        "to_step": 4,
        "batches": 18,
        "data_steps": 9,
        "samples_skipped": 80,
    }
    assert s["step"] == 12 and s["guard"]["diverged"] is None and math.isfinite(s["loss"])
    assert complete_steps(whole) == [0, 4, 8, 12]
    for rank in (0, 1):
        lines = _keys(whole, rank)
        assert [r["step"] for r in lines] == [s for s in range(9) for _ in (0, 1)] + [
            s for s in range(4, 12) for _ in (0, 1)
        ]
        assert [r["keys"] for r in lines[18:]] == [r["keys"] for r in _untouched_stream(shards, rank, 18, 34)]

    killed = tmp_path / "killed"
    proc = _torchrun(ranks, killed, shards, *fault, "train.guard.fault.exit_after_rollback=true", expect=1)
    rollbacks = guard.read_record(_rundir(killed))["rollbacks"]
    assert rollbacks == [event] and complete_steps(killed) == [0, 4], proc.stderr[-3000:]
    again = _torchrun(ranks, killed, shards, *fault)
    assert "replaying a rollback this checkpoint did not see: steps 7-9" in again.stderr
    assert _summary(again)["loss"] == s["loss"]
    # (the killed attempt's key log died in its buffer; the resumed one logs the steps it trained)
    assert [(r["step"], r["keys"]) for r in _keys(killed)[-16:]] == [(r["step"], r["keys"]) for r in _keys(whole)[18:]]
    a, b = _weights(whole, 12), _weights(killed, 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(600)
def test_a_rollback_replayed_after_a_resize_skips_the_same_samples(tmp_path, shards, ranks):
    # canonical order: a global step's samples depend on (seed, step) only, so the keys of a
    # rerun on 1 rank must equal those of the uninterrupted 2-rank run, step by step
    fault = [
        "data.order=canonical",
        "train.guard.fault.kind=nan",
        "train.guard.fault.start=13",
        "train.guard.fault.end=18",
    ]
    whole = tmp_path / "whole"
    s = _summary(_torchrun(ranks, whole, shards, *fault))
    (event,) = s["guard"]["rollbacks"]
    assert (event["to_step"], event["at_step"], event["batches"], event["data_steps"]) == (4, 9, 18, 9)
    killed = tmp_path / "killed"
    _torchrun(ranks, killed, shards, *fault, "train.guard.fault.exit_after_rollback=true", expect=1)
    assert guard.read_record(_rundir(killed))["rollbacks"] == [event] and complete_steps(killed) == [0, 4]
    again = _torchrun(ranks, killed, shards, *fault, nproc=1)
    assert "resumes on 1 ranks, its checkpoint was saved by 2" in again.stderr
    assert "replaying a rollback this checkpoint did not see: steps 7-9" in again.stderr
    s1 = _summary(again)
    assert s1["step"] == 12 and s1["guard"]["rollbacks"] == [event] and s1["guard"]["diverged"] is None
    assert math.isclose(s1["loss"], s["loss"], rel_tol=1e-3), (
        s1["loss"],
        s["loss"],
    )  # bf16 sums in another order: 2e-4 measured

    def by_step(lines: list[dict]) -> dict[int, list[str]]:
        steps: dict[int, list[str]] = {}
        for r in lines:
            steps.setdefault(r["step"], []).extend(r["keys"])
        return {k: sorted(v) for k, v in steps.items()}

    # after the rollback: steps 4-11 (from 0) on 2 ranks, 2 micro-batches each; on 1 rank, 4 each
    expected = by_step(_keys(whole, 0)[18:] + _keys(whole, 1)[18:])
    resumed = by_step(_keys(killed, 0)[-32:])
    assert sorted(expected) == sorted(resumed) == list(range(4, 12))
    assert all(len(expected[k]) == 16 for k in expected) and resumed == expected


def _rundir(out: Path):
    from pipeline.rundir import RunDir

    return RunDir(str(out))


def _untouched_stream(shards: str, rank: int, start: int, end: int) -> list[dict]:
    """Batches ``start`` to ``end - 1`` (from 0) of a rank's stream as training reads it, never trained on."""
    from pipeline.data import StreamSpec, TrainStream

    spec = StreamSpec(
        index_url=shards,
        rank=rank,
        world_size=2,
        num_workers=1,
        batch_size=4,
        image_size=32,
        num_classes=4,
        seed=0,
        shuffle_block=2048,
        crop_area=(0.8, 1.0),
        flip=False,
    )
    stream = TrainStream(spec)
    batches = [next(stream) for _ in range(end)]
    return batches[start:]


@pytest.mark.timeout(260)
def test_train_dist_exits_with_the_divergence_status_that_torchrun_hides(tmp_path, shards, ranks):
    out = tmp_path / "run"
    cmd = [
        str(ROOT / "launch" / "train_dist.sh"),
        "--nproc",
        "2",
        str(DEMO),
        *guard_run_overrides(
            out,
            shards,
            "deepspeed.zero_stage=3",
            "train.guard.fault.kind=nan",
            "train.guard.fault.start=13",
            "train.guard.fault.end=1000",
            "train.guard.max_rollbacks=0",
        ),
    ]
    proc = ranks.run(cmd, env=ranks_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == Exit.DIVERGED, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "diverged: unhealthy steps [7, 8, 9] (non-finite loss), after 0 rollbacks" in proc.stderr
    assert complete_steps(out) == [0, 4]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(_summary(proc)["run_id"])
    assert run.info.status == "FAILED", "rank 0 owns the run under train_dist.sh and ends it with the outcome"
