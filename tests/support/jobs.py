"""``python -m pipeline.run`` (or ``launch/pretrain.sh``) as a process of its own: its output
lines with their arrival time, and everything it started killed by pid at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.support import ROOT
from tests.support.tiers import kill_family

TINY = [
    "demo.classes=10",
    "demo.per_class=16",
    "prep.0.shard_size=64",
    "train.global_batch_size=32",
    "data.micro_batch_size=16",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "eval.enabled=false",
    "train.steps=12",
    "train.checkpoint_every=3",
    "tracking.pytorch_flavor=false",  # the final model's torch.export flavor: tests/test_handoff.py
]


STEP_LINE = re.compile(r"step (\d+)/(\d+) loss")


def job_env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


PRETRAIN = str(ROOT / "launch" / "pretrain.sh")


class Job:
    """``python -m pipeline.run`` in its own session (or ``launcher``, e.g. :data:`PRETRAIN`, given
    the same arguments); its output lines kept with their arrival time."""

    def __init__(self, out, *overrides, env=None, launcher: str | None = None):
        self.proc = subprocess.Popen(
            [
                *([launcher] if launcher else [sys.executable, "-m", "pipeline.run"]),
                "configs/experiment/demo.yaml",
                f"output_dir={out}",
                *TINY,
                *overrides,
            ],
            cwd=ROOT,
            env=env or job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
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
            if v := pred():
                return v
            assert self.proc.poll() is None, (
                f"job ended (rc {self.proc.returncode}) before {what}:\n{self.text()[-6000:]}"
            )
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
        kill_family(self.proc.pid)
        self.proc.wait(10)


def mlflow_of(out, run_dir=None) -> tuple[MlflowClient, str]:
    from pipeline.rundir import RunDir

    run_id = RunDir(run_dir or str(out)).mlflow_run_id
    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"), run_id


def summary_of(run_dir) -> dict:
    from pipeline.rundir import RunDir

    return RunDir(str(run_dir)).summary()


def assert_one_run_with_steps(out, last: int, run_dir=None):
    client, run_id = mlflow_of(out, run_dir)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    for key in ("train/loss", "train/lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, last + 1)), (key, steps)
    return client.get_run(run_id)


def processes_mentioning(text: str) -> list[str]:
    """The command lines of this machine's processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def fabricated_lease(url: str, expiry_s: float):
    """A lease taken by this test process, as another job's driver would hold it."""
    from pipeline.lease import Lease

    lease = Lease(
        url,
        heartbeat_s=expiry_s / 4,
        expiry_s=expiry_s,
        job_id="raysubmit_other",
        cluster="10.0.0.9:6379",
    )
    lease.acquire()
    return lease


def complete_steps(run_dir) -> list[int]:
    """The steps of the run's complete checkpoints (``checkpoints/step_*/COMPLETE``), in order."""
    return sorted(int(p.parent.name.removeprefix("step_")) for p in Path(run_dir).glob("checkpoints/step_*/COMPLETE"))
