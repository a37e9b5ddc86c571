"""Failure recovery of the Ray job (``python -m pipeline.run``), tiny and real: Ray, DeepSpeed, MLflow.

- a training worker SIGKILLed mid-run and the MLflow server down from then on for several
  checkpoints: the worker group restarts and resumes from the latest checkpoint, and once the
  server is back the same MLflow run gets every step and evaluation exactly once; a server
  still down at the end: exit 4, and ``pipeline.evaluate sync`` delivers everything once;
- SIGTERM to ``launch/pretrain.sh`` (its own local cluster): checkpoint at the step it is at,
  exit status 3 and how to resume, the cluster stopped; with the checkpoints on S3 (moto) and
  the local ones deleted, the rerun resumes from S3; then the driver is SIGKILLed and a rerun
  through ``launch/pretrain.sh`` resumes the same MLflow run;
- an unsatisfiable config or an unreachable Ray address fails fast with a clear error;
- a launch takes over an expired lease, then the run of a driver stopped (SIGSTOP) past its
  lease's expiry; the old driver, continued, writes nothing (``pipeline.lease``);
- a divergence that outlasts the rollbacks stops ``launch/pretrain.sh`` with its own exit
  status (``pipeline.guard``; the guard's other tests are in tests/test_guard.py).

The whole jobs of the lease and the guard are here, away from those modules' lighter tests, so
that the jobs, which take turns, are one group of the test scheduler (tests/support/tiers.py)
and the lighter tests run beside them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.stop import Exit
from tests.support import DEMO, ROOT
from tests.support.data import write_shards
from tests.support.jobs import (
    PRETRAIN,
    Job,
    assert_one_run_with_steps,
    complete_steps,
    fabricated_lease,
    job_env,
    mlflow_of,
    processes_mentioning,
    summary_of,
)
from tests.support.phases import guard_run_overrides, ranks_env


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture
def s3():
    import s3fs

    from tests.support.services import moto_s3

    with moto_s3("ckpts") as (url, env):
        yield (
            env,
            s3fs.S3FileSystem(
                key="testing", secret="testing", client_kwargs={"endpoint_url": url, "region_name": "us-east-1"}
            ),
        )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_to_pretrain_sh_checkpoints_stops_its_cluster_and_reruns_resume_from_s3_and_after_a_driver_kill(
    tmp_path, jobs, s3
):
    env, fs = s3
    os.environ.update(env)  # this process reads the run dir on S3 too (restored after the test)
    out = tmp_path / "run"
    run_dir = "s3://ckpts/ray/demo"  # <ray.storage_path>/<name>: the run's records
    # No periodic checkpoint but step 0's before the end: a stop checkpoint is the stop's own.
    args = (out, "ray.storage_path=s3://ckpts/ray", "train.steps=30", "train.checkpoint_every=50")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ptr.", dir="/tmp"))  # short, for Ray's socket paths
    # launch/pretrain.sh starts a local cluster of its own (its temp dir under ray_tmp), with a
    # token in the environment rather than in ~/.ray
    local = job_env(
        **env, RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_AUTH_MODE="token", PRETRAIN_RAY_TMPDIR=str(ray_tmp)
    )
    try:
        _sigterm_resume_and_driver_kill(out, run_dir, args, fs, jobs, ray_tmp, env, local)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _sigterm_resume_and_driver_kill(out, run_dir, args, fs, jobs, ray_tmp, env, local) -> None:
    # SIGTERM to launch/pretrain.sh (a local cluster): the job checkpoints the step it is at, and
    # the launcher exits 3 and stops the cluster it started.
    job = Job(*args, env=local, launcher=PRETRAIN)
    jobs.append(job)
    job.wait_for(lambda: any(s >= 4 for _, s in job.steps()), 150, "step 4")
    [temp_dir] = ray_tmp.iterdir()
    assert processes_mentioning(str(temp_dir))
    logged = max(s for _, s in job.steps())
    job.proc.send_signal(signal.SIGTERM)
    rc = job.wait(120)
    text = job.text()
    assert rc == 3, text[-6000:]
    assert "to resume, rerun the same command" in text
    stopped = summary_of(run_dir)["final_step"]
    print(
        f"\nSIGTERM to launch/pretrain.sh after step {logged}: last periodic checkpoint step 0, stop checkpoint "
        f"step {stopped}, steps lost {max(0, logged - stopped)}"
    )
    assert logged <= stopped < 30  # the step it was at, not the last periodic one (0)
    tag = f"step_{stopped:08d}"
    assert (out / "checkpoints" / tag / "COMPLETE").exists()
    fs.invalidate_cache()
    assert fs.exists(f"ckpts/ray/demo/checkpoints/{tag}/COMPLETE")
    assert not fs.exists("ckpts/ray/demo/STOP")
    client, run_id = mlflow_of(out, run_dir)
    assert client.get_run(run_id).info.status == "KILLED"
    assert list(ray_tmp.iterdir()) == []
    leftovers = [str(temp_dir), f"output_dir={out}"]  # Ray's processes, the job's driver
    deadline = time.monotonic() + 20
    while any(map(processes_mentioning, leftovers)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(map(processes_mentioning, leftovers))

    # Another node (no local checkpoints): the rerun of the same job resumes from S3.
    shutil.rmtree(out / "checkpoints")
    again = Job(*args, env=job_env(**env))
    jobs.append(again)
    again.wait_for(lambda: any(s >= stopped + 1 for _, s in again.steps()), 150, "a new step")
    assert f"checkpoint {tag} fetched from s3://ckpts/ray/demo/checkpoints" in again.text()
    assert f"resumed from {out / 'checkpoints'}/{tag}" in again.text()
    assert min(s for _, s in again.steps()) == stopped + 1

    # Now the driver dies (SIGKILL; its job's workers die with it): rerunning the same command
    # through launch/pretrain.sh resumes the same MLflow run from the latest complete checkpoint.
    os.kill(again.proc.pid, signal.SIGKILL)
    again.proc.wait(10)
    time.sleep(2)
    again.kill()  # what is left of the local cluster (the machine it ran on is gone)
    third = Job(*args, env=local, launcher=PRETRAIN)
    jobs.append(third)
    assert third.wait(180) == 0, third.text()[-6000:]
    assert f"resumed from {out / 'checkpoints'}/{tag}" in third.text()
    assert summary_of(run_dir)["final_step"] == 30
    run = assert_one_run_with_steps(out, 30, run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    fs.invalidate_cache()
    assert fs.exists("ckpts/ray/demo/checkpoints/step_00000030/COMPLETE"), fs.find("ckpts/ray/demo/checkpoints")


@pytest.mark.timeout(60)
def test_an_unreachable_ray_address_fails_fast(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "configs/experiment/demo.yaml",
            f"output_dir={tmp_path / 'r'}",
            "ray.address=127.0.0.1:1",
        ],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in proc.stderr
    assert time.time() - t0 < 30


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_more_gpus_than_the_cluster_has_fails_before_any_worker_starts(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "configs/experiment/demo.yaml",
            f"output_dir={out}",
            "ray.use_gpu=true",
            "ray.num_workers=2",
        ],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ray.num_workers: 2 GPU workers asked, the cluster has 0 GPUs" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "corpus").exists()


def _outage_job(out, srv, jobs, *extra) -> Job:
    job = Job(
        out,
        "eval.enabled=true",
        "eval.fewshot.0.shots=[1,5]",
        "eval.fewshot.0.seeds=1",
        "eval.poll_seconds=0.5",
        "tracking.system_metrics=false",
        f"tracking.uri={srv.uri}",
        *extra,
    )
    jobs.append(job)
    return job


def _assert_all_in_mlflow(srv, out):
    from pipeline.rundir import RunDir

    client = MlflowClient(srv.uri)
    run_id = RunDir(str(out)).mlflow_run_id
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert sorted(int(c.data.tags["eval.checkpoint_step"]) for c in children) == [0, 3, 6, 9, 12]
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")) == [0, 3, 6, 9, 12]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 13))
    return run_id


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_sigkilled_and_the_mlflow_server_down_mid_run_restart_resume_and_mlflow_gets_everything_once(
    tmp_path, jobs, mlflow_servers
):
    """Two faults in one run: a training worker SIGKILLed after the step 3 checkpoint (the group
    restarts and resumes from the latest checkpoint, no step logged twice), then the MLflow server
    down for the restart and several checkpoints and their evaluations, and back before the end."""
    srv = mlflow_servers(tmp_path / "mlflow")
    try:
        out = tmp_path / "run"
        job = _outage_job(out, srv, jobs, "ray.max_failures=2")
        t_kill, killed_at_step = _sigkill_a_worker_after_step_3(job, out)
        srv.stop()  # down for the restart, the steps after it and several checkpoints' evaluations
        job.wait_for(
            lambda: (out / "evals" / "step_00000006" / "fewshot-digits.json").exists(), 200, "step 6 evaluated"
        )
        srv.start()
        rc = job.wait(300)
        assert rc == 0, job.text()[-6000:]
        assert "NOT IN MLFLOW YET" not in job.text()
        _assert_resumed_without_repeats(job, t_kill, killed_at_step)
        assert summary_of(out)["final_step"] == 12
        run_id = _assert_all_in_mlflow(srv, out)
        client = MlflowClient(srv.uri)
        runs = client.search_runs([client.get_run(run_id).info.experiment_id])
        assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [run_id]  # one parent
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/lr")) == list(range(1, 13))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        srv.stop()


def _sigkill_a_worker_after_step_3(job: Job, out: Path) -> tuple[float, int]:
    """SIGKILL one training worker once the step 3 checkpoint is complete and step 4 logged:
    (when, the last step logged then)."""
    job.wait_for(
        lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists() and any(s >= 4 for _, s in job.steps()),
        150,
        "step 3 checkpoint",
    )
    workers = job.wait_for(
        lambda: [
            p
            for p in psutil.Process(job.proc.pid).children(recursive=True)
            if "ray::RayTrainWorker" in " ".join(_cmdline(p))
        ],
        10,
        "RayTrainWorker",
    )
    killed_at_step = max(s for _, s in job.steps())
    t_kill = time.time()
    workers[-1].send_signal(signal.SIGKILL)
    return t_kill, killed_at_step


def _assert_resumed_without_repeats(job: Job, t_kill: float, killed_at_step: int) -> None:
    """The restarted group's "resumed from" line splits the output: the steps done before the
    kill, then new ones; at most a checkpoint interval (3) is lost and redone, and not logged again."""
    t_resumed, restart_ckpt = next(
        (t, int(m.group(1))) for t, line in job.lines if (m := re.search(r"resumed from \S+/step_(\d+)", line))
    )
    done = max(s for t, s in job.steps() if t < t_resumed)
    t_first, first = next((t, s) for t, s in job.steps() if t > t_resumed)
    print(
        f"\nSIGKILL after step {done} (last logged before the restart; {killed_at_step} when the kill was sent); "
        f"resumed from checkpoint step {restart_ckpt}: {done - restart_ckpt} steps lost and redone (not logged again); "
        f"restarted group resumed {t_resumed - t_kill:.1f}s and logged its first new step ({first}) "
        f"{t_first - t_kill:.1f}s after the SIGKILL"
    )
    assert first == done + 1
    assert done - restart_ckpt <= 3  # train.checkpoint_every


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_mlflow_server_still_down_at_the_end_exits_4_and_sync_delivers_everything_once(
    tmp_path, jobs, mlflow_servers
):

    srv = mlflow_servers(tmp_path / "mlflow")
    try:
        out = tmp_path / "run"
        job = _outage_job(out, srv, jobs, "tracking.flush_timeout_s=2")
        job.wait_for(lambda: any(s >= 2 for _, s in job.steps()), 200, "step 2")
        srv.stop()
        rc = job.wait(300)
        text = job.text()
        assert rc == 4, text[-6000:]
        assert "NOT IN MLFLOW YET" in text and "Nothing is lost" in text
        sync = re.findall(r"python -m pipeline\.evaluate sync .*", text)[-1].split()  # the job's last word
        srv.start()
        for _ in range(2):  # the second finds nothing left and duplicates nothing
            proc = subprocess.run(
                [sys.executable, *sync[1:]], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=180
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        _assert_all_in_mlflow(srv, out)
    finally:
        srv.stop()


# ---------------------------------------------------------------- a driver stopped past its lease's expiry


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_an_expired_lease_then_an_owner_stopped_past_its_expiry_are_taken_over_and_on_sigcont_it_writes_nothing(
    tmp_path, jobs
):
    started = jobs
    out = tmp_path / "run"
    gone = fabricated_lease(str(out / "LEASE"), expiry_s=1)  # a driver that died without releasing
    time.sleep(1.2)
    args = (out, "lease.heartbeat_s=1", "lease.expiry_s=4", "train.steps=60")
    first = Job(*args)
    started.append(first)
    first.wait_for(lambda: any(s >= 3 for _, s in first.steps()), 200, "step 3")
    assert f"took over {out} from Ray job raysubmit_other of cluster 10.0.0.9:6379" in first.text()
    assert not gone.renew()
    os.kill(first.proc.pid, signal.SIGSTOP)  # the driver, the lease's holder: its workers go on
    t_stop = time.time()
    time.sleep(4.5)  # past lease.expiry_s

    second = Job(*args)
    started.append(second)
    t_took = second.wait_for(
        lambda: next((t for t, line in second.lines if "took over" in line), None), 120, "takeover"
    )
    t_step = second.wait_for(lambda: next((t for t, _ in second.steps()), None), 200, "a step of the new owner")
    assert re.search(rf"took over {out} from a process on host \S+ \(pid {first.proc.pid}\)", second.text())
    assert second.wait(300) == 0, second.text()[-6000:]
    summary = (out / "summary.json").read_text()
    client, run_id = mlflow_of(out)
    assert client.get_run(run_id).info.status == "FINISHED"

    # The old owner comes back: it finds the lease another's.
    os.kill(first.proc.pid, signal.SIGCONT)
    rc = first.wait(120)
    text = first.text()
    print(
        f"\nowner stopped at {t_stop:.0f}; the next launch, started {4.5:.1f}s later, took over after "
        f"{t_took - t_stop:.1f}s and logged its first step after {t_step - t_stop:.1f}s"
    )
    assert rc == Exit.LOST, text[-6000:]
    # Its ranks stopped on the lease (they trained on while the driver was frozen), then its driver.
    assert "lease names another owner" in text and "with no checkpoint or metric" in text
    assert "lease lost" in text and "stopped without writing" in text
    assert (out / "summary.json").read_text() == summary  # the new owner's, untouched
    assert summary_of(out)["final_step"] == 60
    # Every step once: the old ranks stopped without logging.
    run = assert_one_run_with_steps(out, 60)
    assert run.info.status == "FINISHED"
    assert not (out / "LEASE").exists()  # released by the new owner, not recreated by the old


# ---------------------------------------------------------------- a divergence the rollbacks cannot outlast


@pytest.fixture(scope="module")
def guard_shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("guard_shards"), num_classes=4, per_shard=[40, 40, 40])


@pytest.mark.timeout(330)
def test_a_divergence_that_outlasts_the_rollbacks_stops_with_its_own_exit_status(tmp_path, guard_shards, job):
    out = tmp_path / "run"
    never_ends = [
        "train.guard.fault.kind=nan",
        "train.guard.fault.start=13",
        "train.guard.fault.end=1000",
        "train.guard.max_rollbacks=1",
        "eval.enabled=true",
        "eval.fewshot.0.shots=[1]",
        "eval.fewshot.0.seeds=1",
        "eval.poll_seconds=0.5",
        "demo.enabled=true",
        "demo.classes=4",
        "demo.per_class=8",
        "ray.num_workers=2",
        "prep.0.shard_size=64",
        f"ray.storage_path={tmp_path / 'runs'}",
        "name=diverges",
    ]
    # the demo's digits evaluation, with the tiny shards above as the training set
    overrides = [o for o in guard_run_overrides(out, guard_shards, *never_ends) if o != "prep=[]"]
    env = {**ranks_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = job.run(
        [PRETRAIN, str(DEMO), *overrides],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == Exit.DIVERGED, text[-6000:]
    run_dir = tmp_path / "runs" / "diverges"
    assert (
        "diverged: unhealthy steps [5, 6, 7] (non-finite loss), after 1 rollbacks (train.guard.max_rollbacks)" in text
    )
    assert f"resumes from {run_dir}/checkpoints/step_00000004" in text
    assert "guard rollback      : steps 7-9 (non-finite loss) rolled back to step 4, 80 samples skipped" in text
    assert complete_steps(run_dir) == [0, 4]  # nothing after the fault was published...
    evaluated = sorted(p.parent.name for p in (run_dir / "evals").glob("*/*.json"))
    assert evaluated and set(evaluated) <= {"step_00000000", "step_00000004"}  # ...or evaluated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["guard"]["diverged"]["resume_from"] == "step_00000004" and len(summary["guard"]["rollbacks"]) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["guard.rollback.1"].startswith("steps 7-9 (non-finite loss) rolled back to step 4")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "guard/rollback_to_step")] == [4.0]
