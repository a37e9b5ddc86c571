"""launch/pretrain.sh: dry runs for every mode, fast failures, and real Ray job round trips.

The slow tests start Ray clusters of their own (own ports, own --temp-dir, a token in the
environment rather than in ~/.ray) and stop them, leaving any other Ray on the host alone.
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

import pytest

from tests.support import ROOT
from tests.support.jobs import PRETRAIN, processes_mentioning
from tests.support.services import free_port

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
# The tiniest real pre-training job: 400 glyphs, 2 steps of one worker, no evaluation.
TINY = [
    "train.steps=2",
    "train.checkpoint_every=2",
    "demo.per_class=4",
    "eval.enabled=false",
    "ray.num_workers=1",
    "data.micro_batch_size=16",
    "train.global_batch_size=16",
    "tracking.system_metrics=false",
    "tracking.pytorch_flavor=false",
]
TOKEN = secrets.token_hex(32)


@pytest.fixture
def ray_tmp():
    """A parent dir for pretrain.sh's Ray temp dir, short enough for Ray's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="ptl.", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def launch_env(ray_tmp: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_", "MLFLOW_"))}
    # A token in the environment: token auth without writing ~/.ray/auth_token.
    env.update(RAY_AUTH_TOKEN=TOKEN, RAY_AUTH_MODE="token", DS_ACCELERATOR="cpu")
    if ray_tmp is not None:
        env["PRETRAIN_RAY_TMPDIR"] = str(ray_tmp)
    env.update(extra)
    return env


def pretrain(*args: str, env: dict[str, str], timeout: float = 60, job=None) -> subprocess.CompletedProcess:
    """launch/pretrain.sh; through the ``job`` fixture when it starts a real job."""
    run = job.run if job is not None else subprocess.run
    return run([str(PRETRAIN), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(30)
def test_help_describes_every_mode():
    out = subprocess.run([str(PRETRAIN), "--help"], capture_output=True, text=True, check=True).stdout
    for word in (
        "--slurm",
        "--address",
        "--dry-run",
        "--num-cpus",
        "configs/experiment/demo.yaml",
        "SLURM_HOSTNAMES",
        "--requeue",
        "--signal-lead",
    ):
        assert word in out


@pytest.mark.timeout(60)
def test_dry_run_local_prints_start_submit_and_stop_and_starts_nothing(ray_tmp):
    r = pretrain("--dry-run", "train.steps=4", env=launch_env(ray_tmp))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = next(line for line in lines if " start --head " in line)
    assert "--node-ip-address 127.0.0.1" in start and "--dashboard-host 127.0.0.1" in start
    assert f"--temp-dir {ray_tmp}/pretrain-ray." in start
    submit = next(line for line in lines if " job submit " in line)
    assert "-m pipeline.run" in submit and str(ROOT / "configs/experiment/demo.yaml") in submit
    # The default output_dir (runs/demo) is made absolute under the repo: the job's files land there.
    assert submit.endswith(f"train.steps=4 output_dir={ROOT}/runs/demo")
    assert any(line.startswith("+ kill -TERM") for line in lines[lines.index(submit) :])
    assert list(ray_tmp.iterdir()) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts_from", ["SLURM_HOSTNAMES", "plain SLURM_JOB_NODELIST"])
def test_dry_run_slurm_puts_the_head_on_the_first_node_and_a_worker_per_gpu(hosts_from):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "16"}
    if hosts_from == "SLURM_HOSTNAMES":
        slurm.update(SLURM_JOB_NODELIST="gpu-[07-09]", SLURM_HOSTNAMES="gpu-07,gpu-08,gpu-09")
    else:  # scontrol, when installed, has no SLURM config here: the comma fallback expands it
        slurm.update(SLURM_JOB_NODELIST="gpu-07,gpu-08,gpu-09")
    r = pretrain(
        "--slurm", "--dry-run", "data.micro_batch_size=8", "train.global_batch_size=96", env=launch_env(**slurm)
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "head gpu-07, workers gpu-08 gpu-09, 3 node(s) x 16 CPUs x 4 GPUs" in out
    starts = [line for line in out.splitlines() if " start " in line and line.startswith("+ srun")]
    assert len(starts) == 3
    assert "-w gpu-07" in starts[0] and "--head" in starts[0]
    assert all("--num-gpus 4" in s and "--num-cpus 16" in s for s in starts)
    assert {s.split(" -w ")[1].split()[0] for s in starts[1:]} == {"gpu-08", "gpu-09"}
    assert all("--address '<ip of gpu-07>:6379'" in s for s in starts[1:])
    assert "wait-nodes 'http://<ip of gpu-07>:8265' 3" in out
    submit = next(line for line in out.splitlines() if " job submit " in line)
    assert "train.global_batch_size=96 ray.num_workers=12 ray.use_gpu=true" in submit


@pytest.mark.timeout(60)
def test_slurm_outside_an_allocation_submits_the_sbatch_script():
    r = pretrain("--slurm", "--dry-run", "--sbatch-args", "--nodes=3 --gpus-per-node=4", env=launch_env())
    assert r.returncode == 0, r.stderr
    sbatch = next(line for line in r.stdout.splitlines() if " sbatch " in line)
    assert "--nodes=3 --gpus-per-node=4" in sbatch
    assert str(ROOT / "launch/slurm/pretrain.sbatch") in sbatch
    assert "--requeue" not in sbatch and "PRETRAIN_REQUEUE=0" in sbatch


@pytest.mark.timeout(60)
def test_slurm_requeue_and_signal_lead_reach_sbatch():
    r = pretrain(
        "--slurm",
        "--dry-run",
        "--requeue",
        "--signal-lead",
        "45",
        "--sbatch-args",
        "--nodes=2 --time=1",
        env=launch_env(),
    )
    assert r.returncode == 0, r.stderr
    sbatch = next(line for line in r.stdout.splitlines() if " sbatch " in line)
    assert "PRETRAIN_REQUEUE=1" in sbatch
    assert "--signal=B:TERM@45 --requeue --open-mode=append --nodes=2 --time=1" in sbatch


@pytest.mark.timeout(60)
def test_bad_config_fails_fast_naming_the_key_and_starts_no_ray(ray_tmp):
    t0 = time.monotonic()
    r = pretrain("train.loss=bogus", env=launch_env(ray_tmp))
    assert r.returncode == 2
    assert "config error" in r.stderr and "train.loss" in r.stderr
    assert list(ray_tmp.iterdir()) == []
    assert not processes_mentioning(str(ray_tmp))
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
def test_a_missing_eval_index_fails_fast_naming_the_key_and_starts_no_ray(ray_tmp):
    t0 = time.monotonic()
    r = pretrain("eval.fewshot.0.train=/nonexistent/x.json", env=launch_env(ray_tmp))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "config error: eval.fewshot.0.train: /nonexistent/x.json does not exist" in r.stderr
    assert "config ok" not in r.stdout
    assert list(ray_tmp.iterdir()) == []
    assert not processes_mentioning(str(ray_tmp))
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
def test_unreachable_address_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    r = pretrain("--address", url, *TINY, env=launch_env())
    assert r.returncode != 0
    assert f"no Ray dashboard answers at {url}" in r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_train_dist_dry_run_prints_the_launcher_command(launcher, tiny_shards):
    r = subprocess.run(
        [
            str(ROOT / "launch/train_dist.sh"),
            "--dry-run",
            "--launcher",
            launcher,
            "--nproc",
            "2",
            f"data.train={tiny_shards}",
        ],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert r.returncode == 0, r.stderr
    expected = {
        "torchrun": "torchrun --standalone --nproc_per_node 2 -m pipeline.train",
        "deepspeed": "deepspeed --num_gpus 2 --master_port ",
    }[launcher]
    assert expected in r.stdout and "ray.num_workers=2" in r.stdout


@pytest.mark.timeout(30)
def test_mlflow_server_dry_run_prints_the_tracking_uri(tmp_path):
    r = subprocess.run(
        [str(ROOT / "launch/mlflow_server.sh"), "--dry-run", "--dir", str(tmp_path), "--port", "5123"],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert r.returncode == 0, r.stderr
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5123" in r.stdout
    assert (
        f"--backend-store-uri sqlite:///{tmp_path}/mlflow.db --artifacts-destination {tmp_path}/mlartifacts" in r.stdout
    )


@pytest.mark.timeout(60)
def test_launch_scripts_are_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not on PATH (apt-get install shellcheck)")
    scripts = sorted((ROOT / "launch").rglob("*.sh")) + sorted((ROOT / "launch").rglob("*.sbatch"))
    names = {p.relative_to(ROOT / "launch").as_posix() for p in scripts}
    assert {"pretrain.sh", "train_dist.sh", "mlflow_server.sh", "slurm/pretrain.sbatch"} <= names
    r = subprocess.run(["shellcheck", "-s", "bash", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster started here, as `ray start --head` would be on a real head."""
    tmp = Path(tempfile.mkdtemp(prefix="ptc.", dir="/tmp"))
    port, dash, client, agent = (free_port() for _ in range(4))
    # RAY_JOB_STOP_WAIT_TIME_S: what the README asks of a cluster's head, so that `ray job stop`
    # leaves the driver time for its stop checkpoint (Ray's default is SIGKILL after 3 s).
    env = launch_env(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_JOB_STOP_WAIT_TIME_S="300"
    )
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-port",
            str(dash),
            "--ray-client-server-port",
            str(client),
            "--dashboard-agent-listen-port",
            str(agent),
            "--num-cpus",
            "2",
            "--temp-dir",
            str(tmp),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch/cluster.py"),
                "wait-nodes",
                url,
                "1",
                "--timeout",
                "120",
                "--pid",
                str(head.pid),
            ],
            env=env,
            check=True,
            timeout=150,
        )
        yield url
    finally:
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_jobs_exit_code_is_the_launchers(ray_head, tmp_path, job):
    # Valid config, impossible on a 2-CPU cluster: pipeline.run exits 2 once connected.
    r = pretrain(
        "--address",
        ray_head,
        *TINY,
        "ray.cpus_per_worker=64",
        f"output_dir={tmp_path}/run",
        env=launch_env(),
        timeout=110,
        job=job,
    )
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ray.cpus_per_worker" in r.stdout


_STEP = re.compile(r"step (\d+)/\d+ loss")


def _wait_for_step(proc: subprocess.Popen, log: Path, n: int, timeout: float = 240) -> None:
    """Until the job's log shows training step ``n``; the job must live."""
    deadline = time.monotonic() + timeout
    while not any(int(s) >= n for s in _STEP.findall(log.read_text())) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)


def _last_step(log: Path) -> int:
    return max(int(s) for s in _STEP.findall(log.read_text()))


def _latest_complete_step(ckpt_dir: Path) -> int:
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").exists())
    return int(tags[-1].removeprefix("step_"))


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_rerun_after_the_submitting_client_died_follows_the_live_job_and_ray_job_stop_checkpoints_it_exits_3(
    ray_head, tmp_path, job
):
    """The client that submitted an --address job dies (its ssh session dropped): the rerun of the
    same command follows the live job instead of submitting another; ``ray job stop`` then
    checkpoints the step the job is at (not a periodic one) and the follower exits 3, the job's
    status, with how to resume."""
    log = tmp_path / "pretrain.log"
    run = [
        str(PRETRAIN),
        "--address",
        ray_head,
        *TINY,
        "train.log_every=1",
        # no periodic checkpoint but step 0's before the end: a checkpoint after the stop is its own
        "train.checkpoint_every=1000",
        f"output_dir={tmp_path}/run",
        "train.steps=1000",
    ]
    with log.open("w") as out:  # the first launch, its own session: the dropped ssh session kills all of it
        first = job.popen(run, env=launch_env(), stdout=out, stderr=subprocess.STDOUT)
    again = None
    try:
        _wait_for_step(first, log, 3)
        submission = re.search(r"--submission-id (pretrain-\S+)", log.read_text()).group(1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        again = job.popen(run, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        followed = ""
        while not _STEP.search(followed):  # the job's own log lines, streamed to the rerun
            line = again.stdout.readline()
            assert line, followed[-3000:]
            followed += line
        logged = max(int(s) for s in _STEP.findall(followed))
        subprocess.run(
            [RAY, "job", "stop", "--address", ray_head, submission],
            env=launch_env(),
            capture_output=True,
            timeout=200,
            check=True,
        )
        rest, _ = again.communicate(timeout=200)
    finally:
        for proc in (first, again):
            if proc is not None and proc.poll() is None:
                proc.kill()
    text = followed + rest
    assert f"is owned by job {submission} of this cluster" in text and "following it" in text, text[-3000:]
    assert "job submit" not in text  # no second job
    assert again.returncode == 3, text[-3000:]  # the followed job's status: stopped with a checkpoint
    assert "to resume, rerun the same command" in text
    stopped = _latest_complete_step(tmp_path / "run" / "checkpoints")
    print(
        f"\nray job stop after step {logged}: last periodic checkpoint step 0, stop checkpoint step {stopped}, "
        f"steps lost {max(0, logged - stopped)}"
    )
    assert stopped >= logged and stopped % 1000 != 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rerun_after_the_jobs_driver_was_killed_takes_the_run_over_at_once_and_finishes_logging_each_step_once(
    ray_head, tmp_path, job
):
    """The driver of a running --address job is SIGKILLed (Ray marks the job FAILED while its
    lease's heartbeat is still fresh): the rerun does not follow the dead job, it takes the run
    over, resumes from the last checkpoint, logs every step once and ends the job on the existing
    cluster with exit 0, its summary and its outputs."""
    import json

    from mlflow.tracking import MlflowClient

    from pipeline.rundir import RunDir

    log = tmp_path / "pretrain.log"
    out = tmp_path / "run"
    run = [
        str(PRETRAIN),
        "--address",
        ray_head,
        *TINY,
        "train.log_every=1",
        "train.checkpoint_every=5",
        f"output_dir={out}",
        "train.steps=40",
    ]
    with log.open("w") as sink:
        first = job.popen(run, env=launch_env(), stdout=sink, stderr=subprocess.STDOUT)
    again = None
    try:
        _wait_for_step(first, log, 7)
        submission = re.search(r"--submission-id (pretrain-\S+)", log.read_text()).group(1)
        driver = json.loads((out / "LEASE").read_text())["pid"]
        os.kill(driver, signal.SIGKILL)
        t_kill = time.monotonic()
        first.wait(120)  # `ray job submit` returns once Ray has the job's end
        # As a rerun on another host sees it (the two-host case): a fresh heartbeat, a pid of
        # another machine, so only Ray's job status says the owner is dead.
        lease = json.loads((out / "LEASE").read_text())
        (out / "LEASE").write_text(json.dumps({**lease, "pid_space": "the-head-host/1", "heartbeat": time.time()}))
        again = job.popen(run, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text = ""
        while "resumed from" not in text or not _STEP.search(text.rsplit("resumed from", 1)[1]):
            line = again.stdout.readline()
            assert line, text[-3000:]
            text += line
        t_step = time.monotonic()
        rest, _ = again.communicate(timeout=240)
    finally:
        for proc in (first, again):
            if proc is not None and proc.poll() is None:
                proc.kill()
    text += rest
    assert f"owned by job {submission} of this cluster, which has ended (FAILED): taking the run over" in text, text[
        -3000:
    ]
    assert "following it" not in text and f"its Ray job {submission} has ended" in text, text[-3000:]
    assert again.returncode == 0, text[-3000:]  # its own job's status: finished
    assert "pre-training summary" in text and f"outputs: {out}" in text
    assert (out / "summary.json").is_file()
    run_id = RunDir(str(out)).mlflow_run_id
    steps = [m.step for m in MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 41)), steps  # each step once, none missing
    print(f"\ndriver SIGKILLed after step 7: the rerun's first trained step {t_step - t_kill:.1f} s after the kill")
