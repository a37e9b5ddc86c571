"""The install: launch/setup.sh into a fresh directory keeps the CPU torch where no GPU is
present, stays small, and records the exact versions it installed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

MAX_VENV_MB = 2560


def _has_gpu() -> bool:
    nvidia = shutil.which("nvidia-smi")
    return bool(nvidia) and subprocess.run([nvidia, "-L"], capture_output=True).returncode == 0


def _built_by_ci() -> subprocess.CompletedProcess | None:
    """The venv these tests run in, when ``launch/setup.sh --fresh --locked`` built it from the
    current setup.sh, requirements.lock and pyproject.toml (its ``setup-record``, written as the
    script's last act under ``set -e``, so only after a whole run exited 0): what ``.ci/run`` has
    just done. Its outcome as the script's, with the script's last line as its output."""
    venv = ROOT / ".venv"
    record = venv / "setup-record"
    if Path(sys.prefix).resolve() != venv.resolve() or not record.exists():
        return None
    flags, *lines = record.read_text().splitlines()
    if "fresh=1" not in flags.split() or "locked=1" not in flags.split():
        return None
    sums, done = lines[:-1], lines[-1]
    for line in sums:
        digest, name = line.split()
        if hashlib.sha256((ROOT / name).read_bytes()).hexdigest() != digest:
            return None
    return subprocess.CompletedProcess(["launch/setup.sh", flags], 0, stdout=done + "\n", stderr="")


@pytest.fixture
def fresh_venv(tmp_path) -> tuple[Path, subprocess.CompletedProcess]:
    """``launch/setup.sh --locked`` into a new directory: the venv and the script's output.
    Under ``.ci/run`` that is the venv CI has just built from scratch with ``--locked`` (and
    ``--dev``, a superset: the size limit holds a fortiori), not a second build of the same."""
    if (ci := _built_by_ci()) is not None:
        print(f"\nchecking the venv .ci/run built: {ci.args[1]}; {ci.stdout.strip()}")
        return ROOT / ".venv", ci
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


def test_deepspeeds_ops_build_with_the_venvs_ninja_whatever_comes_first_on_path(monkeypatch):
    """torch runs the first ``ninja`` on PATH; the machine's own (1.11 here) and the venv's (1.13)
    each read the other's build log as foreign and rebuild the op from scratch, so processes with
    and without the venv's ``bin`` on PATH rebuilt DeepSpeed's shm op in turn (12 times in one
    suite run). ``dist_setup`` puts the venv's ninja first."""
    from pipeline.ds_ops import own_extensions_dir

    ours = Path(sys.prefix) / "bin" / "ninja"
    assert ours.exists(), "DeepSpeed's dependency ninja is not in this venv"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    own_extensions_dir()
    assert Path(shutil.which("ninja")).samefile(ours)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
