"""Faults a long run meets, on real parts: a corrupt newest checkpoint is set aside and the run
resumes from the newest one that verifies.

Training is the real loop (``pipeline.train.train``) on one in-process rank (DeepSpeed ZeRO-2 on
gloo, a 2-layer ViT, real shards, MLflow on sqlite); the object-store case runs against moto.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.checkpoint import CheckpointManager, CorruptCheckpoint
from pipeline.rundir import CORRUPT, CORRUPT_NOTE, RunDir, tag_for

MODEL_FILE = "mp_rank_00_model_states.pt"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def train_cfg(out: Path, shards: str, **extra):
    """6 steps of 8 images, a checkpoint every 2; MLflow in a store beside ``out`` (a copy of
    the run dir continues the same MLflow run)."""
    from pipeline.config import load_config

    base = {
        "model.name": "vit_tiny_test",
        "data.train": shards,
        "output_dir": str(out),
        "train.steps": 6,
        "train.global_batch_size": 8,
        "data.micro_batch_size": 8,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.loss": "softmax",
        "train.precision": "fp32",
        "deepspeed.zero_stage": 2,
        "data.num_workers": 0,
        "ray.num_workers": 1,
        "tracking.system_metrics": False,
        "tracking.uri": f"sqlite:///{out.parent.parent / 'mlflow.db'}",
    }
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def run_training(cfg) -> dict:
    from pipeline.engine import dist_setup
    from pipeline.train import train

    dist_setup(standalone=True)
    return train(cfg)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_shards) -> Path:
    """A run dir with tags 0, 2 and 4 of a 6-step run stopped at step 4."""
    out = tmp_path_factory.mktemp("faults") / "stopped" / "run"
    summary = run_training(train_cfg(out, tiny_shards, **{"train.stop_at_step": 4}))
    assert summary["step"] == 4
    return out


@pytest.mark.timeout(240)
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_that_verifies(
    stopped_run, tmp_path, tiny_shards
):
    from mlflow.tracking import MlflowClient

    out = stopped_run.parent.parent / "resumed" / "run"
    shutil.copytree(stopped_run, out)
    cfg = train_cfg(out, tiny_shards)
    run = RunDir(str(out))
    assert run.checkpoints.complete_tags() == [tag_for(0), tag_for(2), tag_for(4)]
    flip_byte(out / "checkpoints" / tag_for(4) / MODEL_FILE)

    t0 = time.perf_counter()
    summary = run_training(cfg)
    elapsed = time.perf_counter() - t0
    assert summary["step"] == 6 and not summary["preempted"]
    [event] = summary["corrupt_checkpoints"]
    aside = out / "checkpoints" / CORRUPT / tag_for(4)
    assert event["tag"] == tag_for(4) and event["moved_to"] == str(aside)
    assert str(out / "checkpoints" / tag_for(4) / MODEL_FILE) in event["problem"] and "sha256" in event["problem"]
    note = json.loads((aside / CORRUPT_NOTE).read_text())
    assert note["problem"] == event["problem"] and (aside / MODEL_FILE).is_file(), "set aside, not deleted"
    assert not (aside / "COMPLETE").exists(), "nothing takes a set-aside tag for complete"
    assert run.checkpoints.set_aside_notes() == {str(aside): note}

    # Redone from step 2: tag 4 saved afresh, every published tag verifies, none doubled.
    assert run.checkpoints.complete_tags() == [tag_for(s) for s in (0, 2, 4, 6)]
    for tag in run.checkpoints.complete_tags():
        checkpoint.check_files(out / "checkpoints" / tag)
    # Each step logged once in the one MLflow run; the set-aside is on it as a tag.
    client = MlflowClient(cfg.tracking.uri)
    run_id = summary["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps
    tags = client.get_run(run_id).data.tags
    assert MODEL_FILE in tags[f"checkpoint.corrupt.{tag_for(4)}"]
    print(f"corrupt newest tag -> trained to the end in {elapsed:.1f} s (2 steps redone)")


@pytest.mark.timeout(120)
def test_with_on_corrupt_checkpoint_refuse_the_resume_stops_naming_the_file_and_moves_nothing(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run / "checkpoints", out / "checkpoints")
    flip_byte(out / "checkpoints" / tag_for(4) / MODEL_FILE)
    manager = CheckpointManager(RunDir(str(out)), checkpoint.staging_dir(str(out)), on_corrupt="refuse")
    with pytest.raises(CorruptCheckpoint, match="on_corrupt_checkpoint=refuse") as err:
        manager.prepare()
    assert err.value.problem.startswith(str(out / "checkpoints" / tag_for(4) / MODEL_FILE))
    assert RunDir(str(out)).checkpoints.latest() == tag_for(4) and not (out / "checkpoints" / CORRUPT).exists()


@pytest.mark.timeout(120)
def test_on_an_object_store_a_corrupt_tag_is_fetched_once_more_then_set_aside(stopped_run, tmp_path, monkeypatch):
    from tests.support.services import moto_s3

    with moto_s3("runs") as (_, env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        run = RunDir("s3://runs/corrupt")
        for tag in (tag_for(2), tag_for(4)):
            run.checkpoints.publish(stopped_run / "checkpoints" / tag, tag, marker=False)
            run.checkpoints.publish(stopped_run / "checkpoints" / tag, tag, marker=True)
        bad = bytearray((stopped_run / "checkpoints" / tag_for(4) / MODEL_FILE).read_bytes())
        bad[len(bad) // 2] ^= 0x01
        run.checkpoints.fs.pipe_file(f"{run.checkpoints.root}/{tag_for(4)}/{MODEL_FILE}", bytes(bad))

        staging = checkpoint.staging_dir(str(tmp_path / "host"))
        manager = CheckpointManager(run, staging)
        assert manager.prepare() == (staging, tag_for(2))
        assert run.checkpoints.complete_tags() == [tag_for(2)]
        [(where, note)] = run.checkpoints.set_aside_notes().items()
        assert where == f"s3://runs/corrupt/checkpoints/{CORRUPT}/{tag_for(4)}" and MODEL_FILE in note["problem"]
        assert run.checkpoints.fs.exists(f"{run.checkpoints.root}/{CORRUPT}/{tag_for(4)}/{MODEL_FILE}")
        assert not (Path(staging) / tag_for(4)).exists(), "the host's bad copy is dropped"


@pytest.mark.timeout(120)
def test_the_evaluate_cli_reports_a_corrupt_tag_or_config_in_one_line(stopped_run, tmp_path, tiny_shards):
    from tests.support import ROOT

    out = tmp_path / "run"
    shutil.copytree(stopped_run / "checkpoints", out / "checkpoints")
    flip_byte(out / "checkpoints" / tag_for(4) / MODEL_FILE)
    config = out / "checkpoints" / tag_for(2) / "config.yaml"
    config.write_text(config.read_text().replace("train:", "tr@in: [", 1))  # no longer YAML, nor the manifest's
    evals = tmp_path / "eval.yaml"
    evals.write_text(
        f"eval:\n  fewshot:\n    - {{name: tiny, train: {tiny_shards}, test: {tiny_shards}, shots: [1], seeds: 1}}\n"
    )
    for tag, bad in ((tag_for(4), MODEL_FILE), (tag_for(2), "config.yaml")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.evaluate",
                "checkpoint",
                str(out),
                tag,
                str(evals),
                f"--tracking-uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "config error" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"corrupt checkpoint: {out / 'checkpoints' / tag / bad}: sha256 differs"), last


# ---------------------------------------------------------------- a tag holds exactly its save's files

STALE = ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_1.pt"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_stale_files_of_an_earlier_save_at_the_same_step_never_reach_the_published_tag(
    tmp_path, tiny_shards, where, monkeypatch
):
    """An earlier attempt at step 2 on 2 ranks (another precision too) left files in the scratch
    tag dir and half an upload; the 1-rank save at step 2 publishes only its own files."""
    from tests.support.engine import tiny_engine, train_step
    from tests.support.services import moto_s3

    with moto_s3("runs") as (_, env):
        if where == "s3":
            for k, v in env.items():
                monkeypatch.setenv(k, v)
        run = RunDir(
            f"s3://runs/{tmp_path.name}" if where == "s3" else str(tmp_path / "host" / "checkpoints").rsplit("/", 1)[0]
        )
        staging = checkpoint.staging_dir(str(tmp_path / "host"))
        for name in STALE:
            (Path(staging) / tag_for(2)).mkdir(parents=True, exist_ok=True)
            (Path(staging) / tag_for(2) / name).write_bytes(b"an earlier attempt")
            run.checkpoints.fs.pipe_file(f"{run.checkpoints.root}/{tag_for(2)}/{name}", b"an earlier upload")
        engine, stream, config_yaml, device = tiny_engine(tmp_path / "host", tiny_shards)
        manager = CheckpointManager(run, staging)
        manager.track(engine=engine, stream=stream)
        for step in (1, 2):
            train_step(engine, stream, device)
            manager.save(step, {"samples_seen": 8 * step, "world_size": 1, "num_classes": 4}, config_yaml)
        engine.destroy()
        published = run.checkpoints.files(tag_for(2))
        listed = set(json.loads(run.checkpoints.read_text(tag_for(2), "meta.json"))["files"])
        assert published == listed | {"meta.json"} and not set(STALE) & published, published
        assert not set(STALE) & {p.name for p in (Path(staging) / tag_for(2)).iterdir()}
        local = tmp_path / "fetched"
        run.checkpoints.fetch(tag_for(2), local)
        checkpoint.check_files(local / tag_for(2))


def test_a_tag_of_two_saves_files_is_refused_naming_what_does_not_fit():
    one = ["mp_rank_00_model_states.pt", "rank_0.pt", "rank_1.pt", "config.yaml"]
    bf16 = [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    fp32 = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert checkpoint.layout_problem(one + bf16, 2) is None and checkpoint.layout_problem(one + fp32, 2) is None
    assert "two precisions or two runs" in checkpoint.layout_problem(one + bf16 + fp32, 2)  # the tag
    assert "world size is 1" in checkpoint.layout_problem(one + fp32, 1)  # a save after a resize 2 -> 1
    assert "shards of ranks [0]," in checkpoint.layout_problem(["rank_0.pt", "rank_1.pt"] + fp32[:1], 2)
    assert "rank files of ranks [0, 1]" in checkpoint.layout_problem(["rank_0.pt", "rank_1.pt"], 1)


def test_every_shipped_experiment_keeps_its_scratch_dir_under_its_name():
    from pipeline.config import CONFIGS_DIR, load_config

    for path in sorted((Path(CONFIGS_DIR) / "experiment").glob("*.yaml")):
        cfg = load_config(str(path), ["name=other"])
        assert Path(cfg.output_dir).parts[-2:] == ("runs", "other"), (path.name, cfg.output_dir)


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int):
    """A tmpfs of ``size_kib`` at ``path`` (root only), unmounted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def grow(path: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(path)], check=True, timeout=30)


@pytest.mark.timeout(120)
def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_it_starts_naming_path_free_and_needed(
    tmp_path, tiny_shards
):
    """4 tags of ~233 KB (the plan's size), kept 1 (+1 while saving): 466 KB on a 256 KiB disk."""
    from data_prep.disk import NoRoom
    from tests.support import ROOT

    with small_disk(tmp_path / "disk", 256) as disk:
        cfg = train_cfg(
            disk / "run",
            tiny_shards,
            **{"train.keep_checkpoints": 1, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
        with pytest.raises(
            NoRoom,
            match=rf"no room on disk: {disk / 'run' / 'checkpoints'} has [\d,]+ bytes free, "
            r"2 checkpoint\(s\) of [\d,]+ bytes \(the plan's size\) need about [\d,]+",
        ):
            run_training(cfg)
        assert not (disk / "run" / "checkpoints").exists() or not list((disk / "run" / "checkpoints").glob("step_*"))
        overrides = [
            f"{k}={v}"
            for k, v in {
                "model.name": "vit_tiny_test",
                "data.train": tiny_shards,
                "train.steps": 6,
                "train.global_batch_size": 8,
                "data.micro_batch_size": 8,
                "train.checkpoint_every": 2,
                "train.keep_checkpoints": 1,
                "train.precision": "fp32",
                "eval.enabled": False,
                "ray.num_workers": 1,
                "output_dir": str(disk / "driver"),
                "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            }.items()
        ]
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.run", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"config error: no room on disk: {disk / 'driver' / 'checkpoints'} has"), last


@pytest.mark.timeout(240)
def test_a_save_that_meets_a_full_disk_fails_in_one_line_leaves_no_partial_tag_and_the_rerun_finishes(
    tmp_path, tiny_shards
):
    """The plan's 2 x 233 KB fit a 600 KiB disk; the real tags (~350 KB each, and DeepSpeed's
    scripts) do not: the save at step 2 meets ENOSPC while tag 0 is kept."""
    from data_prep.disk import DiskFull

    with small_disk(tmp_path / "disk", 600) as disk:
        cfg = train_cfg(
            disk / "run",
            tiny_shards,
            **{"train.keep_checkpoints": 1, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
        run = RunDir(str(disk / "run"))
        with pytest.raises(DiskFull) as err:
            run_training(cfg)
        t_fault = time.perf_counter()
        message = str(err.value)
        assert "\n" not in message and re.match(
            rf"disk full: writing {disk / 'run' / 'checkpoints'}/step_\d+ failed "
            r"\(No space left on device\): [\d,]+ bytes free there, it needs about "
            r"[\d,]+; its partial files were removed; the newest complete checkpoint "
            r"is step_\d+$",
            message,
        ), message
        failed = re.search(r"step_\d+", message).group(0)
        kept = run.checkpoints.complete_tags()
        assert kept and failed not in kept and not (disk / "run" / "checkpoints" / failed).exists(), "no partial tag"
        for tag in kept:
            checkpoint.check_files(disk / "run" / "checkpoints" / tag)

        grow(disk, 4096)
        summary = run_training(cfg)
        assert summary["step"] == 6 and run.checkpoints.complete_tags() == [tag_for(6)]
        checkpoint.check_files(disk / "run" / "checkpoints" / tag_for(6))
        print(f"full disk at {failed}: rerun trained to the end {time.perf_counter() - t_fault:.1f} s later")


@pytest.mark.timeout(60)
def test_drawing_the_demo_corpus_on_a_full_disk_fails_in_one_line_and_leaves_no_partial_corpus(tmp_path):
    from data_prep.demo import make_glyph_corpus
    from data_prep.disk import DiskFull

    with small_disk(tmp_path / "disk", 128) as disk:
        with pytest.raises(DiskFull) as err:
            make_glyph_corpus(str(disk / "glyphs"), num_classes=10, per_class=60, size=32)
        assert re.fullmatch(
            rf"disk full: writing {disk / 'glyphs'} failed \(No space left on device\): [\d,]+ bytes free "
            r"there, it needs about [\d,]+; the partial corpus was removed; .*rerun",
            str(err.value),
        ), err.value
        assert not (disk / "glyphs").exists(), "a partial corpus would pass for a drawn one on the rerun"


# ---------------------------------------------------------------- a dead owner


def test_a_lease_whose_ray_job_ended_or_whose_slurm_job_was_requeued_is_taken_over_at_once(tmp_path, monkeypatch):
    """The owners here are this live process (fresh heartbeats, a live pid): only what the
    launcher knows of their jobs frees them. The Ray case end to end: tests/test_launch.py."""
    from pipeline.lease import Lease, LeaseHeld, took_over

    url = str(tmp_path / "LEASE")
    Lease(url, 10, 60, job_id="pretrain-demo-1").acquire()
    with pytest.raises(LeaseHeld):
        Lease(url, 10, 60).acquire(dead=lambda owner: owner.job_id == "pretrain-other")
    previous = Lease(url, 10, 60).acquire(dead=lambda owner: owner.job_id == "pretrain-demo-1")
    assert previous.job_id == "pretrain-demo-1"

    (tmp_path / "LEASE").unlink()
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    Lease(url, 10, 60, job_id="slurm:123").acquire()
    with pytest.raises(LeaseHeld):  # the same run of the job: a live owner
        Lease(url, 10, 60, job_id="slurm:123").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the earlier run of the job has ended
    previous = Lease(url, 10, 60, job_id="slurm:123.1").acquire()
    assert previous.job_id == "slurm:123" and "its batch job has ended" in took_over(url, previous)


@pytest.mark.timeout(120)
def test_a_second_live_run_over_the_same_scratch_dir_is_refused_before_it_writes(tmp_path, tiny_shards):
    """Runs bf16 and fp32 of the issue: different run dirs (a storage path), one output_dir."""
    from data_prep.disk import NoRoom
    from pipeline.lease import Lease
    from pipeline.rundir import SERVES, claim_scratch

    scratch, storage = tmp_path / "scratch", tmp_path / "storage"
    first = RunDir(str(storage / "bf16"))
    assert claim_scratch(str(scratch), first) is None
    lease = Lease(first.lease_url, 10, 60, job_id="pretrain-bf16")  # the first run, live
    lease.acquire()
    lease.start()
    try:
        cfg = train_cfg(
            scratch,
            tiny_shards,
            **{"ray.storage_path": str(storage), "name": "fp32", "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
        with pytest.raises(
            NoRoom,
            match=rf"output_dir {scratch} stages the checkpoints of run {storage / 'bf16'}, owned "
            r"by Ray job pretrain-bf16 .*: two live runs must not share a scratch dir",
        ):
            run_training(cfg)
        assert not (scratch / "checkpoints").exists() and (scratch / SERVES).read_text().strip() == first.url
    finally:
        lease.release()
    assert claim_scratch(str(scratch), RunDir(str(storage / "fp32"))) is None, "once the first run ended"


@pytest.mark.timeout(120)
def test_a_crash_in_a_run_no_driver_owns_ends_its_mlflow_run_failed(tmp_path, tiny_shards):
    """Under torchrun or the deepspeed launcher (``owns_run``) training rank 0 ends the MLflow run
    however training ends: here the report of a checkpoint raises (a crash), and the run is
    FAILED, not left RUNNING. (KILLED after a stop and FINISHED: tests/test_stop.py; FAILED after a
    divergence: tests/test_guard.py.)"""
    from mlflow.tracking import MlflowClient

    from pipeline.engine import dist_setup
    from pipeline.train import train

    out = tmp_path / "crash" / "run"
    cfg = train_cfg(out, str(tiny_shards))

    def report(metrics: dict) -> None:
        if metrics["step"] == 2:
            raise RuntimeError("the report of step 2 failed")

    dist_setup(standalone=True)
    with pytest.raises(RuntimeError, match="the report of step 2 failed"):
        train(cfg, on_checkpoint=report, owns_run=True)
    # without a driver the run's MLflow id lives in its checkpoints (a rerun continues that run)
    run_id = json.loads((Path(cfg.run_dir) / "checkpoints" / tag_for(2) / "meta.json").read_text())["mlflow_run_id"]
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert sorted(m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, "train/loss")) == [1, 2]
