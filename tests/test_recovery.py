"""Failure recovery of the Ray job (``python -m pipeline.run``), tiny and real: Ray, DeepSpeed, MLflow.

- a training worker SIGKILLed mid-run: the worker group restarts, resumes from the latest
  checkpoint, the same MLflow run gets every step exactly once;
- SIGTERM to ``launch/pretrain.sh`` (its own local cluster): checkpoint at the step it is at,
  exit status 3 and how to resume, the cluster stopped; with the checkpoints on S3 (moto) and
  the local ones deleted, the rerun resumes from S3; then the driver is SIGKILLed and a rerun
  through ``launch/pretrain.sh`` resumes the same MLflow run;
- an unsatisfiable config or an unreachable Ray address fails fast with a clear error.
"""

from __future__ import annotations

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

from tests.support import ROOT
from tests.support.jobs import (
    PRETRAIN,
    Job,
    assert_one_run_with_steps,
    job_env,
    mlflow_of,
    processes_mentioning,
    summary_of,
)


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_sigkilled_worker_is_restarted_and_resumes_without_duplicate_metrics(tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(out, "ray.max_failures=2")
    jobs.append(job)
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

    assert job.wait(150) == 0, job.text()[-6000:]
    # The restarted group's "resumed from" line splits the output: steps done before the kill, then new ones.
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
    assert summary_of(out)["final_step"] == 12
    run = assert_one_run_with_steps(out, 12)
    assert run.info.status == "FINISHED"


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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_mlflow_server_killed_mid_run_and_back_before_the_end_gets_everything(tmp_path, jobs, mlflow_servers):

    srv = mlflow_servers(tmp_path / "mlflow")
    try:
        out = tmp_path / "run"
        job = _outage_job(out, srv, jobs)
        job.wait_for(lambda: any(s >= 2 for _, s in job.steps()), 200, "step 2")
        srv.stop()  # down for several checkpoints and their evaluations
        job.wait_for(
            lambda: (out / "evals" / "step_00000006" / "fewshot-digits.json").exists(), 200, "step 6 evaluated"
        )
        srv.start()
        rc = job.wait(300)
        assert rc == 0, job.text()[-6000:]
        assert "NOT IN MLFLOW YET" not in job.text()
        _assert_all_in_mlflow(srv, out)
    finally:
        srv.stop()


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
