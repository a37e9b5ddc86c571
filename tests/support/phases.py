"""Several trainings ("phases") in one torchrun process group, so its start-up is paid once.

``tests/workers/train_phases.py`` says what a phase may ask for; a resume is always a new
invocation, as it would be after a real stop.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from tests.support import ROOT
from tests.support.services import free_port

WORKER = ROOT / "tests" / "workers" / "train_phases.py"


def run_phases(procs, nproc: int, phases: list[dict], workdir: Path, timeout: int = 400) -> dict:
    """Run ``phases`` in one torchrun invocation of ``nproc`` ranks, started through ``procs``
    (the ``ranks`` fixture); returns rank 0's findings
    (its output is kept in ``workdir/log_<first phase>.txt``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan, result = workdir / f"plan_{phases[0]['name']}.json", workdir / f"result_{phases[0]['name']}.json"
    plan.write_text(json.dumps({"phases": phases}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(WORKER),
        str(plan),
        str(result),
    ]
    proc = procs.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (workdir / f"log_{phases[0]['name']}.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(result.read_text())


def overrides(out: Path, shards: str, mlflow_uri: str, **extra) -> list[str]:
    """A 2-layer ViT on 16 px images, 8 steps of 16 images; dropout on, so RNG state matters.

    Two dataloader workers per rank and 24-sample shuffle blocks make step 4 fall mid-pass
    (30 samples per reader) and mid-block; step 8 crosses into the next pass.
    """
    base = {
        "model.name": "vit_tiny_test",
        "model.dropout": 0.1,
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
        "data.num_workers": 2,
        "data.shuffle_block": 24,
        "data.crop_min_area": 0.8,
        "data.flip": True,
        "train.log_sample_keys": True,
        "tracking.system_metrics": False,
        "tracking.uri": mlflow_uri,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def keys_by_step(run_dir: Path) -> dict[int, dict[int, list[list[str]]]]:
    """rank -> step -> the keys of each micro-batch, from ``sample_keys_rank{r}.jsonl``."""
    out: dict[int, dict[int, list[list[str]]]] = {}
    for path in sorted(run_dir.glob("sample_keys_rank*.jsonl")):
        steps: dict[int, list[list[str]]] = defaultdict(list)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]].append(record["keys"])
        out[int(path.stem.removeprefix("sample_keys_rank"))] = dict(steps)
    return out


def ranks_env() -> dict:
    """The environment of a torchrun process group of ours (CPU ranks, one thread each, no MLflow URI)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def guard_run_overrides(out: Path, shards: str, *extra: str) -> list[str]:
    """12 steps of a tiny ViT, 2 micro-batches a rank a step, a checkpoint every 4."""
    return [
        f"data.train={shards}",
        f"output_dir={out}",
        "model.name=vit_tiny_test",
        "model.num_classes=0",
        "train.steps=12",
        "train.global_batch_size=16",
        "data.micro_batch_size=4",
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "data.num_workers=1",
        "tracking.system_metrics=false",
        "data.crop_min_area=0.8",
        "eval.enabled=false",
        "demo.enabled=false",
        "prep=[]",
        "train.log_sample_keys=true",
        *extra,
    ]


def checkpoint_to_universal(ckpt_dir: str, tag: str, out_dir: str) -> str:
    """DeepSpeed's universal format of a checkpoint (to resume on another world size)."""
    from pipeline import checkpoint

    return checkpoint.to_universal(ckpt_dir, tag, out_dir)
