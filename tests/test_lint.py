"""One formatter and one linter, ruff, as configured in pyproject.toml (line length 120, enforced):
the repository is formatted and lint-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_the_repository_is_ruff_clean(command):
    ruff = Path(sys.executable).parent / "ruff"
    r = subprocess.run([str(ruff), *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff {' '.join(command)}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
