"""The demo end to end through Ray: corpus -> shards -> Ray Train + DeepSpeed -> evals -> MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.support import ROOT

TINY = [
    "demo.classes=10",
    "demo.per_class=16",
    "prep.0.shard_size=64",
    "train.steps=4",
    "train.global_batch_size=32",
    "data.micro_batch_size=16",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "eval.fewshot.0.shots=[1,5]",
    "eval.fewshot.0.seeds=1",
    "eval.poll_seconds=0.5",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, job):
    out = tmp_path_factory.mktemp("e2e") / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = job.run(
        [sys.executable, "-m", "pipeline.run", "configs/experiment/demo.yaml", f"output_dir={out}", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rerun = job.run(
        [sys.executable, "-m", "pipeline.run", "configs/experiment/demo.yaml", f"output_dir={out}", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, proc.stdout, rerun


@pytest.mark.timeout(480)
def test_demo_logs_a_pretraining_run_with_step_metrics_and_child_eval_runs(demo_run):
    out, stdout, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 4
    assert summary["shards_written"] == 3 + 2 + 1  # 160 glyphs / 64 per shard; digits: 1297 train / 1000, 500 test
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in stdout
    # MLflow 3 opens in its GenAI view unless the page asks for the classic one
    assert f"runs/{summary['run_id']}?workflowType=machine_learning" in stdout

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.name"] == "vit_demo" and parent.data.params["deepspeed.zero_stage"] == "2"
    losses = client.get_metric_history(parent.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    for key in ("train/lr", "train/images_per_s", "train/grad_norm"):
        assert len(client.get_metric_history(parent.info.run_id, key)) == 4
    # step 0 (random init), 2 and 4 each evaluated once, as a child run and as parent step metrics
    acc = client.get_metric_history(parent.info.run_id, "fewshot/digits/5shot")
    assert sorted(m.step for m in acc) == [0, 2, 4]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(c.data.tags["eval.checkpoint_step"]) for c in children) == [0, 2, 4]
    for child in children:
        assert child.data.tags["eval.dataset"] == "digits" and child.data.tags["eval.protocol"] == "fewshot_linear"
        assert 0.0 < child.data.metrics["5shot"] <= 1.0 and "1shot" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in artifacts and "transfer" in artifacts


@pytest.mark.timeout(60)
def test_a_bad_config_fails_before_anything_starts(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "configs/experiment/demo.yaml",
            f"output_dir={out}",
            "train.global_batch_size=100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "train.global_batch_size" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(480)
def test_the_summary_lists_every_evaluation_and_a_finished_run_rerun_says_so(demo_run):
    out, stdout, rerun = demo_run
    fewshot = [line for line in stdout.splitlines() if line.startswith("few-shot digits")]
    assert [line.split(":")[0].split()[-1] for line in fewshot] == ["init", "2", "4"], stdout[-3000:]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "is finished (step 4 of 4" in rerun.stdout
    assert [line for line in rerun.stdout.splitlines() if line.startswith("few-shot digits")] == fewshot
    records = sorted(p.name for p in (out / "evals").glob("step_*/*.json"))
    assert records == ["fewshot-digits.json"] * 3
