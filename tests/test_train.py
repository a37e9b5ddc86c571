"""Real DeepSpeed on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu) driven through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.data import write_shards
from tests.support.services import free_port

WORKER = ROOT / "tests" / "workers" / "ds_check.py"


def torchrun(ranks, nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each run's own sqlite store
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]
    proc = ranks.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def tiny_overrides(out: Path, shards: str, **extra) -> list[str]:
    base = {
        "model.name": "vit_tiny_test",
        "data.train": shards,
        "output_dir": str(out),
        "train.steps": 8,
        "train.global_batch_size": 16,
        "data.micro_batch_size": 4,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.loss": "softmax",
        "data.num_workers": 1,
        "tracking.system_metrics": False,
        "data.crop_min_area": 0.8,
        "data.flip": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("train_shards"), num_classes=4, per_shard=[40, 40, 40])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_bf16_trains_saves_and_reloads_identically(tmp_path, shards, stage, ranks):
    result = tmp_path / "result.json"
    torchrun(
        ranks,
        2,
        [str(WORKER), str(result), *tiny_overrides(tmp_path / "run", shards, **{"deepspeed.zero_stage": stage})],
    )
    r = json.loads(result.read_text())
    assert r["zero_stage"] == stage and r["bf16"] and r["world"] == 2
    assert r["summary"]["step"] == 8
    assert len(r["losses"]) == 8
    assert r["losses"][-1] < r["losses"][0], r["losses"]
    assert r["changed_by_training"] > 0
    assert r["max_diff"] == 0.0, "a fresh engine loading the checkpoint must hold identical weights"
    assert r["tags"] == ["step_00000000", "step_00000004", "step_00000008"]
    # the run id travels in the checkpoint, so evaluations can find the pre-training run
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == r["summary"]["run_id"] and meta["world_size"] == 2


def test_the_step_log_line_carries_an_eta_at_the_current_rate():
    from pipeline.step_metrics import eta

    assert eta(100, 2.0) == "0:00:50"
    assert eta(7260, 1.0) == "2:01:00"
    assert eta(5, 0.0) == "?"
