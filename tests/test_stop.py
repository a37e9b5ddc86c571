"""One stop path: the exit statuses named once (Python and the shell launchers agree) and a
signal turned into one stop request, a repeated one into an exit at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stop import Exit, StopRequest
from tests.support import ROOT


def test_the_shell_launchers_and_python_name_the_same_exit_statuses():
    out = subprocess.run(
        ["bash", "-c", f"source {ROOT}/launch/common.sh; set | grep '^EXIT_'"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert dict(line.split("=") for line in out.split()) == {f"EXIT_{e.name}": str(e.value) for e in Exit}
    launchers = [ROOT / "launch" / n for n in ("pretrain.sh", "train_dist.sh", "slurm/pretrain.sbatch")]
    for path in launchers:
        text = path.read_text()
        assert "common.sh" in text, f"{path} does not source the exit statuses"
        assert not re.search(r"exit 3\b|rc == 3\b", text), f"{path} spells an exit status as a bare number"


@pytest.mark.timeout(60)
def test_a_signal_is_one_stop_request_and_a_second_one_exits_at_once():
    code = (
        "import sys, time; from pipeline.stop import StopRequest; import signal\n"
        "s = StopRequest((signal.SIGTERM, signal.SIGINT), on_request=lambda n: print('stop', n, flush=True), "
        "exit_on_repeat=True)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == f"stop {int(signal.SIGTERM)}"
        time.sleep(0.3)
        assert proc.poll() is None, "the first signal only asks for a stop"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 128 + signal.SIGINT
        assert "again: exiting now" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_sees_a_sigterm_as_a_stop_request():
    request = StopRequest()
    try:
        assert request.installed and not request.requested
        signal.raise_signal(signal.SIGTERM)
        assert request.requested and request.signals == 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.timeout(400)
def test_a_run_without_a_driver_ends_its_mlflow_run_killed_after_a_stop_and_finished_at_its_end(tmp_path, ranks):
    """Without a driver (torchrun, the deepspeed launcher, launch/train_dist.sh) training rank 0
    owns the MLflow run and ends it as ``pipeline.run`` does: KILLED after a stop (under
    torchrun), FINISHED at the last step (the rerun, under the deepspeed launcher), the same run
    across the rerun (FAILED after a divergence: tests/test_guard.py; after a crash:
    tests/test_faults.py). The stop is requested, and withdrawn, with ``python -m pipeline.rundir``."""
    import json

    from mlflow.tracking import MlflowClient

    from pipeline.rundir import RunDir
    from tests.support import DEMO
    from tests.support.data import write_shards
    from tests.support.phases import guard_run_overrides, ranks_env
    from tests.support.services import free_port

    shards = write_shards(tmp_path / "shards", num_classes=4, per_shard=[40, 40, 40])
    out, status = tmp_path / "run", tmp_path / "status"

    def train(launcher: str) -> tuple[int, dict]:
        cmd = {
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
            "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"],
        }[launcher]
        port = f"--master_port={free_port()}"
        cmd = [*cmd, port, "--module" if launcher == "deepspeed" else "-m", "pipeline.train", str(DEMO)]
        cmd += guard_run_overrides(out, shards, "train.steps=4")
        proc = ranks.run(
            cmd,
            env={**ranks_env(), "PIPELINE_STATUS_FILE": str(status)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"step"')]
        assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
        return int(status.read_text()), json.loads(lines[0])

    def rundir(*args: str) -> str:  # the run dir's command line, as an operator (and the launchers) use it
        cli = [sys.executable, "-m", "pipeline.rundir", *args]
        return subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout

    assert rundir("stop", str(out), "the test: stop at the first step") == f"stop requested: {out}/STOP\n"
    assert RunDir(str(out)).stop_requested()
    code, stopped = train("torchrun")
    assert code == Exit.STOPPED and stopped["step"] == 1 and stopped["preempted"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(stopped["run_id"]).info.status == "KILLED"

    rundir("clear-stop", str(out))
    assert not RunDir(str(out)).stop_requested()
    code, finished = train("deepspeed")
    assert code == Exit.OK and finished["step"] == 4 and finished["run_id"] == stopped["run_id"]
    assert client.get_run(finished["run_id"]).info.status == "FINISHED"
