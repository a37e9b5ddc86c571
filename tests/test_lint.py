"""One formatter and one linter, ruff, as configured in pyproject.toml (line length 120, enforced):
the repository is formatted and lint-clean; and no function in pipeline/ or data_prep/ is over 80 lines."""

from __future__ import annotations

import ast
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


def test_no_function_in_pipeline_or_data_prep_is_longer_than_80_lines():
    """Every function (decorators excluded, docstring included) fits in 80 lines: a longer one is split
    into helpers that each own one concern."""
    too_long = []
    for path in sorted(p for top in ("pipeline", "data_prep") for p in (ROOT / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)
