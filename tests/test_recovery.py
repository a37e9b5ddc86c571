"""Failure recovery of the Ray job (``python -m pipeline.run``), tiny and real: Ray, DeepSpeed, MLflow.

- a training worker SIGKILLed mid-run: the worker group restarts, resumes from the latest
  checkpoint, the same MLflow run gets every step exactly once;
- SIGTERM to the driver: checkpoint at the next step boundary, exit status 3 and how to resume;
  with the checkpoints on S3 (moto) and the local ones deleted, the rerun resumes from S3; then
  the driver is SIGKILLed and a rerun of the same command resumes the same MLflow run;
- an unsatisfiable config or an unreachable Ray address fails fast with a clear error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

TINY = [
    "demo.classes=10", "demo.per_class=16", "prep.0.shard_size=64", "train.global_batch_size=32",
    "data.micro_batch_size=16", "optim.warmup_steps=1", "train.log_every=1", "eval.enabled=false",
    "train.steps=12", "train.checkpoint_every=3",
]
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss")


def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


class Job:
    """``python -m pipeline.run`` in its own session; its output lines kept with their arrival time."""

    def __init__(self, out, *overrides, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", "configs/experiment/demo.yaml", f"output_dir={out}", *TINY, *overrides],
            cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def steps(self) -> list[tuple[float, int]]:
        return [(t, int(m.group(1))) for t, line in self.lines if (m := STEP_LINE.search(line))]

    def wait_for(self, pred, timeout: float, what: str):
        end = time.time() + timeout
        while time.time() < end:
            if (v := pred()):
                return v
            assert self.proc.poll() is None, f"job ended (rc {self.proc.returncode}) before {what}:\n{self.text()[-6000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {what} in {timeout}s:\n{self.text()[-6000:]}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running after {timeout}s:\n{self.text()[-6000:]}") from None
        self._reader.join(5)
        return rc

    def kill(self):
        """Everything this job started: its session, and any descendant that left it."""
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def _mlflow(out, run_dir=None) -> tuple[MlflowClient, str]:
    from pipeline.rundir import RunDir

    run_id = RunDir(run_dir or str(out)).mlflow_run_id
    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"), run_id


def _summary(run_dir) -> dict:
    from pipeline.rundir import RunDir

    return RunDir(str(run_dir)).summary()


def _assert_one_run_with_steps(out, last: int, run_dir=None):
    client, run_id = _mlflow(out, run_dir)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    for key in ("train/loss", "train/lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, last + 1)), (key, steps)
    return client.get_run(run_id)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_sigkilled_worker_is_restarted_and_resumes_without_duplicate_metrics(tmp_path, jobs):
    out = tmp_path / "run"
    job = Job(out, "ray.max_failures=2")
    jobs.append(job)
    job.wait_for(lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists() and
                 any(s >= 4 for _, s in job.steps()), 150, "step 3 checkpoint")
    workers = job.wait_for(lambda: [p for p in psutil.Process(job.proc.pid).children(recursive=True)
                                    if "ray::RayTrainWorker" in " ".join(_cmdline(p))], 10, "RayTrainWorker")
    killed_at_step = max(s for _, s in job.steps())
    t_kill = time.time()
    workers[-1].send_signal(signal.SIGKILL)

    assert job.wait(150) == 0, job.text()[-6000:]
    # The restarted group's "resumed from" line splits the output: steps done before the kill, then new ones.
    t_resumed, restart_ckpt = next((t, int(m.group(1))) for t, line in job.lines
                                   if (m := re.search(r"resumed from \S+/step_(\d+)", line)))
    done = max(s for t, s in job.steps() if t < t_resumed)
    t_first, first = next((t, s) for t, s in job.steps() if t > t_resumed)
    print(f"\nSIGKILL after step {done} (last logged before the restart; {killed_at_step} when the kill was sent); "
          f"resumed from checkpoint step {restart_ckpt}: {done - restart_ckpt} steps lost and redone (not logged again); "
          f"restarted group resumed {t_resumed - t_kill:.1f}s and logged its first new step ({first}) "
          f"{t_first - t_kill:.1f}s after the SIGKILL")
    assert first == done + 1
    assert done - restart_ckpt <= 3  # train.checkpoint_every
    assert _summary(out)["final_step"] == 12
    run = _assert_one_run_with_steps(out, 12)
    assert run.info.status == "FINISHED"


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture
def s3():
    import s3fs
    from conftest import moto_s3

    with moto_s3("ckpts") as (url, env):
        yield env, s3fs.S3FileSystem(key="testing", secret="testing",
                                     client_kwargs={"endpoint_url": url, "region_name": "us-east-1"})


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_sigterm_to_the_driver_checkpoints_and_reruns_resume_from_s3_and_after_a_driver_kill(tmp_path, jobs, s3):
    env, fs = s3
    os.environ.update(env)  # this process reads the run dir on S3 too (restored after the test)
    out = tmp_path / "run"
    run_dir = "s3://ckpts/ray/demo"  # <ray.storage_path>/<name>: the run's records
    args = (out, "ray.storage_path=s3://ckpts/ray")
    job = Job(*args, env=_env(**env))
    jobs.append(job)
    job.wait_for(lambda: any(s >= 4 for _, s in job.steps()), 150, "step 4")
    job.proc.send_signal(signal.SIGTERM)
    rc = job.wait(90)
    text = job.text()
    assert rc == 3, text[-6000:]
    assert "to resume, rerun the same command" in text
    stopped = _summary(run_dir)["final_step"]
    assert 4 <= stopped < 12
    tag = f"step_{stopped:08d}"
    assert (out / "checkpoints" / tag / "COMPLETE").exists()
    fs.invalidate_cache()
    assert fs.exists(f"ckpts/ray/demo/checkpoints/{tag}/COMPLETE")
    assert not fs.exists("ckpts/ray/demo/STOP")
    client, run_id = _mlflow(out, run_dir)
    assert client.get_run(run_id).info.status == "KILLED"

    # Another node (no local checkpoints): the rerun of the same command resumes from S3.
    import shutil

    shutil.rmtree(out / "checkpoints")
    again = Job(*args, env=_env(**env))
    jobs.append(again)
    again.wait_for(lambda: any(s >= stopped + 1 for _, s in again.steps()), 150, "a new step")
    assert f"checkpoint {tag} fetched from s3://ckpts/ray/demo/checkpoints" in again.text()
    assert f"resumed from {out / 'checkpoints'}/{tag}" in again.text()
    assert min(s for _, s in again.steps()) == stopped + 1

    # Now the driver dies (SIGKILL; its job's workers die with it): rerunning the same command
    # resumes the same MLflow run from the latest complete checkpoint.
    os.kill(again.proc.pid, signal.SIGKILL)
    again.proc.wait(10)
    time.sleep(2)
    again.kill()  # what is left of the local cluster (the machine it ran on is gone)
    third = Job(*args, env=_env(**env))
    jobs.append(third)
    assert third.wait(150) == 0, third.text()[-6000:]
    assert "resumed from" in third.text()
    assert _summary(run_dir)["final_step"] == 12
    run = _assert_one_run_with_steps(out, 12, run_dir)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    fs.invalidate_cache()
    assert fs.exists("ckpts/ray/demo/checkpoints/step_00000012/COMPLETE"), fs.find("ckpts/ray/demo/checkpoints")


@pytest.mark.timeout(60)
def test_an_unreachable_ray_address_fails_fast(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "configs/experiment/demo.yaml", f"output_dir={tmp_path / 'r'}",
                           "ray.address=127.0.0.1:1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in proc.stderr
    assert time.time() - t0 < 30


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_more_gpus_than_the_cluster_has_fails_before_any_worker_starts(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "configs/experiment/demo.yaml", f"output_dir={out}",
                           "ray.use_gpu=true", "ray.num_workers=2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ray.num_workers: 2 GPU workers asked, the cluster has 0 GPUs" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "corpus").exists()


def _outage_job(out, srv, jobs, *extra) -> Job:
    job = Job(out, "eval.enabled=true", "eval.fewshot.0.shots=[1,5]", "eval.fewshot.0.seeds=1", "eval.poll_seconds=0.5",
              "tracking.system_metrics=false", f"tracking.uri={srv.uri}", *extra)
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
def test_an_mlflow_server_killed_mid_run_and_back_before_the_end_gets_everything(tmp_path, jobs):
    from test_tracking import MlflowServer

    srv = MlflowServer(tmp_path / "mlflow").start()
    try:
        out = tmp_path / "run"
        job = _outage_job(out, srv, jobs)
        job.wait_for(lambda: any(s >= 2 for _, s in job.steps()), 200, "step 2")
        srv.stop()  # down for several checkpoints and their evaluations
        job.wait_for(lambda: (out / "evals" / "step_00000006" / "fewshot-digits.json").exists(), 200, "step 6 evaluated")
        srv.start()
        rc = job.wait(300)
        assert rc == 0, job.text()[-6000:]
        assert "NOT IN MLFLOW YET" not in job.text()
        _assert_all_in_mlflow(srv, out)
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_mlflow_server_still_down_at_the_end_exits_4_and_sync_delivers_everything_once(tmp_path, jobs):
    from test_tracking import MlflowServer

    srv = MlflowServer(tmp_path / "mlflow").start()
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
            proc = subprocess.run([sys.executable, *sync[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        _assert_all_in_mlflow(srv, out)
    finally:
        srv.stop()
