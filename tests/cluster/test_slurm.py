"""launch/pretrain.sh --slurm and launch/train_dist.sh on a real 2-node SLURM cluster.

The cluster (``tests/support/slurm.py``: slurmctld, two slurmd, munge) runs on two network-
namespace hosts with private disks; the repository is shared, as the sbatch script assumes.
Each node's scratch (``output_dir``) and Ray temp dir are on its private disk; the run dir
and the MLflow store (sqlite) are in a directory both nodes see. This machine is the login
node: it runs pretrain.sh --slurm, sbatch, srun and scancel.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.jobs import PRETRAIN, complete_steps
from tests.support.slurm import Slurm, cannot_run_slurm, slurm_cluster

pytestmark = [pytest.mark.slow]

TINY = [
    "demo.classes=10",
    "demo.per_class=16",
    "prep.0.shard_size=64",
    "train.global_batch_size=32",
    "data.micro_batch_size=16",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "tracking.system_metrics=false",
    "data.num_workers=0",
    "ray.num_workers=2",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = cannot_run_slurm()
    if reason:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(logs) as cluster:
        # TORCH_EXTENSIONS_DIR: DeepSpeed's CPU ops built once for this venv (the default cache is
        # shared with other venvs on the machine, which rebuild it for theirs and hold its lock).
        cluster.env.update(
            RAY_AUTH_MODE="disabled",
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            RAY_DEDUP_LOGS="0",
            PRETRAIN_RAY_TMPDIR=cluster.hosts[0].disk,
            TORCH_EXTENSIONS_DIR=str(ROOT / ".venv" / "torch_extensions"),
        )
        for k in [k for k in cluster.env if k.startswith("MLFLOW_") or k == "RAY_ADDRESS"]:
            del cluster.env[k]
        yield cluster


def _submit(slurm: Slurm, shared: Path, *args: str) -> tuple[str, Path]:
    """pretrain.sh --slurm from the login node; returns the job id and its log."""
    env = {**slurm.env, "MLFLOW_TRACKING_URI": f"sqlite:///{shared}/mlflow.db"}
    r = subprocess_run(
        [PRETRAIN, "--slurm", *args, f"output_dir={slurm.hosts[0].disk}/run", f"ray.storage_path={shared}/runs"], env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    return job, ROOT / "runs" / "slurm" / f"vit-pretrain-{job}.out"


def subprocess_run(cmd: list[str], env: dict, timeout: float = 60):
    import subprocess

    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_log(log: Path, pattern: str, slurm: Slurm, job: str, timeout: float) -> re.Match:
    end = time.time() + timeout
    while time.time() < end:
        text = log.read_text() if log.exists() else ""
        if m := re.search(pattern, text):
            return m
        if slurm.job(job)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            # the line may have been written just before the state changed (a requeue's echo)
            text = log.read_text() if log.exists() else ""
            assert (m := re.search(pattern, text)), text[-4000:]
            return m
        time.sleep(0.5)
    raise TimeoutError(f"no {pattern!r} in {log}: {log.read_text()[-4000:] if log.exists() else ''}")


def _mlflow_steps(shared: Path, run_dir: Path) -> tuple[list[int], object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{shared}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss")), client.get_run(run_id)


@pytest.mark.timeout(600)
def test_pretrain_slurm_runs_the_demo_on_both_nodes_stops_on_scancel_term_and_requeue_finishes_it(slurm, tmp_path):
    """One job, two launches: the demo across both nodes (evaluated on each checkpoint), stopped by
    ``scancel --signal=TERM`` at the next step with a checkpoint, requeued, resumed and finished."""
    t0 = time.time()
    job, log = _submit(
        slurm,
        tmp_path,
        "--requeue",
        "--sbatch-args",
        "--nodes=2 --time=20",
        *TINY,
        "train.steps=40",
        "train.checkpoint_every=25",
        "eval.fewshot.0.shots=[1,5]",
        "eval.fewshot.0.seeds=1",
        "eval.poll_seconds=0.5",
        "eval.num_cpus=1",
    )
    steps_seen = r"step (\d+)/40 loss"
    _wait_log(log, r"step [3-9]/40 loss", slurm, job, 300)
    logged = max(int(s) for s in re.findall(steps_seen, log.read_text()))
    slurm.run("scancel", "--signal=TERM", job)
    requeued = _wait_log(log, r"requeueing job \d+: .*\(exit status (\d+)\)", slurm, job, 200)
    assert requeued.group(1) == "3", log.read_text()[-6000:]
    run_dir = tmp_path / "runs" / "demo"
    stopped = complete_steps(run_dir)[-1]
    first = log.read_text()
    assert "to resume, rerun the same command" in first
    # SLURM holds a requeued job for 2 minutes (BeginTime); let it start in 3 s, not now: slurmd
    # refuses a launch whose credential is from the same second as the requeue revoked the old
    # one ("Job credential revoked"; seen in CI as a FAILED rerun that never started).
    slurm.wait_state(job, {"PENDING"}, 60)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    wall = time.time() - t0
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (
        text[-6000:] + "\n" + slurm.diagnose(job)
    )
    print(
        f"\nscancel --signal=TERM after step {logged}: last periodic checkpoint step 0, stop checkpoint step "
        f"{stopped}, steps lost {max(0, logged - stopped)}; requeued, resumed and finished; {wall:.0f}s from sbatch "
        "to COMPLETED; " + " | ".join(x.strip() for x in text.splitlines() if x.startswith("few-shot"))
    )
    assert stopped >= logged and stopped % 25 != 0
    assert (
        f"step_{stopped:08d} at step {stopped}" in text[len(first) :]
    )  # "resumed from <scratch>/step_... at step ..."
    # Both launches: a Ray cluster of both nodes, a training worker on each.
    for launch in (first, text[len(first) :]):
        assert "ray cluster ready: 2 node(s)" in launch
        ips = set(re.findall(r"training worker rank \d on node \w+ \(([\d.]+)\)", launch))
        assert ips == {h.addr for h in slurm.hosts}, f"the two training workers ran on {ips}"
    steps, run = _mlflow_steps(tmp_path, run_dir)
    assert steps == list(range(1, 41)) and run.info.status == "FINISHED"
    assert {"fewshot/digits/1shot", "fewshot/digits/5shot"} <= set(run.data.metrics)
    assert slurm.run("squeue", "-h", "-j", job, check=False).stdout.strip() == ""


def _train_dist(slurm: Slurm, shards: str, shared: Path, *args: str, job_name: str = "train-dist") -> list[str]:
    return [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=5",
        f"--job-name={job_name}",
        str(ROOT / "launch" / "train_dist.sh"),
        "--nproc",
        "1",
        "configs/experiment/demo.yaml",
        f"data.train={shards}",
        "model.num_classes=4",
        "train.global_batch_size=16",
        "data.micro_batch_size=8",
        "data.num_workers=0",
        "tracking.system_metrics=false",
        "eval.enabled=false",
        "demo.enabled=false",
        "prep=[]",
        "train.log_every=1",
        f"output_dir={slurm.hosts[0].disk}/dist",
        f"ray.storage_path={shared}/runs",
        f"tracking.uri=sqlite:///{shared}/mlflow.db",
        *args,
    ]


@pytest.mark.timeout(300)
def test_train_dist_under_srun_trains_across_two_nodes_and_checkpoints(slurm, tiny_shards, tmp_path):
    r = subprocess_run(
        _train_dist(slurm, tiny_shards, tmp_path, "train.steps=3", "train.checkpoint_every=3"), slurm.env, timeout=280
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d" in r.stdout
    run_dir = tmp_path / "runs" / "demo"
    assert complete_steps(run_dir)[-1] == 3
    assert json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.timeout(300)
def test_scancel_term_stops_train_dist_under_srun_at_the_next_step_with_a_checkpoint(slurm, tiny_shards, tmp_path):
    import subprocess

    log = tmp_path / "srun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _train_dist(
                slurm, tiny_shards, tmp_path, "train.steps=1000", "train.checkpoint_every=50", job_name="dist-stop"
            ),
            env=slurm.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        end = time.time() + 200
        while not re.search(r"step [3-9]/1000 loss", log.read_text()):
            assert proc.poll() is None and time.time() < end, log.read_text()[-4000:]
            time.sleep(0.3)
        logged = max(int(s) for s in re.findall(r"step (\d+)/1000 loss", log.read_text()))
        slurm.run("scancel", "--signal=TERM", "--name=dist-stop")
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    stopped = complete_steps(tmp_path / "runs" / "demo")[-1]
    print(
        f"\nscancel --signal=TERM to train_dist.sh under srun after step {logged}: last periodic checkpoint step 0, "
        f"stop checkpoint step {stopped}, steps lost {max(0, logged - stopped)}"
    )
    assert "to resume, rerun the same command" in text
    assert stopped >= logged and stopped % 50 != 0
    assert rc == 3, text[-4000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
