"""The install: launch/setup.sh into a fresh directory keeps the CPU torch where no GPU is
present, stays small, and records the exact versions it installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

MAX_VENV_MB = 2560


def _has_gpu() -> bool:
    nvidia = shutil.which("nvidia-smi")
    return bool(nvidia) and subprocess.run([nvidia, "-L"], capture_output=True).returncode == 0


@pytest.fixture
def fresh_venv(tmp_path) -> tuple[Path, subprocess.CompletedProcess]:
    """``launch/setup.sh --locked`` into a new directory: the venv and the script's output."""
    venv = tmp_path / "venv"
    proc = subprocess.run(
        [str(ROOT / "launch" / "setup.sh"), "--venv", str(venv), "--locked"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
    )
    return venv, proc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_setup_into_a_fresh_venv_keeps_the_cpu_torch_and_stays_small(fresh_venv):
    venv, proc = fresh_venv
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not _has_gpu():
        assert version.endswith("+cpu"), f"a machine without a GPU got torch {version}"
        size_mb = int(
            subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout.split()[0]
        )
        assert size_mb <= MAX_VENV_MB, f"{venv} is {size_mb} MB"
    freeze = (venv / "freeze.txt").read_text()
    assert f"torch=={version}" in freeze
    lock = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    installed = {line.split("==")[0].lower(): line.split("==")[1] for line in freeze.splitlines() if "==" in line}
    assert installed["deepspeed"] == lock["deepspeed"] and installed["ray"] == lock["ray"]
    assert f"{venv}" in proc.stdout and "MB" in proc.stdout


def test_setup_rejects_an_unknown_option():
    proc = subprocess.run([str(ROOT / "launch" / "setup.sh"), "--nope"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--nope" in proc.stderr
