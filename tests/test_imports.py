"""The packages' import graph has no cycle: each module can be read (and imported) after the
modules it needs, whether an import sits at the top of a file or inside a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("pipeline", "data_prep")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (``from x import y`` counts ``x.y`` when
    that is a module, else ``x``)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names} & mods.keys()
                graph[name] |= subs or ({base} & mods.keys())
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_pipeline_and_data_prep_has_no_cycle():
    graph = import_graph()
    assert {"pipeline.train", "data_prep.plan", "data_prep.plan_ray", "data_prep.job"} <= graph.keys()
    assert "data_prep.plan_format" in graph["data_prep.plan_ray"]  # the graph sees relative imports
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in found
    )


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code`` (from the repo root)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return {m.split(".")[0] for m in out}


def test_checking_a_config_imports_no_torch():
    """``launch/validate.py`` runs before every launch: 0.26 s without torch, 2.0 s with it."""
    loaded = _modules_after(
        "import sys, runpy\n"
        "sys.argv = ['validate.py', '--print', 'name', 'configs/experiment/demo.yaml']\n"
        "try:\n    runpy.run_path('launch/validate.py', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code"
    )
    assert "omegaconf" in loaded and "torch" not in loaded


def test_a_training_rank_imports_deepspeed_without_mlflow_which_still_imports_after():
    """Ranks other than 0 never log: neither the trainer's modules nor DeepSpeed (its autotuner)
    import MLflow for them; rank 0's first write imports it as usual."""
    assert "mlflow" not in _modules_after(
        "import pipeline.train\nfrom pipeline.ds_ops import import_deepspeed\nimport_deepspeed()"
    )
    assert "mlflow" in _modules_after(
        "from pipeline.ds_ops import import_deepspeed\nimport_deepspeed()\nimport mlflow.tracking"
    )
