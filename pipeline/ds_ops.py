"""Importing DeepSpeed, where and with which ninja its JIT ops are built, and building them ahead
of time.

Standard library only until the build itself, so that ``launch/setup.sh`` can start the builds
from the repository root as soon as torch and DeepSpeed are installed (``python -m
pipeline.ds_ops ShareMemCommBuilder``), beside the install of everything else.
"""

from __future__ import annotations

import os
import shutil
import sys


def own_extensions_dir() -> None:
    """Build DeepSpeed's JIT ops (the CPU shm comm op, CPU Adam) inside this virtualenv, not in
    the user-wide ~/.cache/torch_extensions: two environments sharing that folder rebuild the
    ops in turn, and a process killed mid-build there leaves a lock that makes every later
    process of every environment wait forever. $TORCH_EXTENSIONS_DIR, when set, wins.

    And with this virtualenv's ninja (DeepSpeed installs it), put first on PATH: torch runs the
    first ``ninja`` on PATH, and a machine's own ninja of another version takes the other's
    build log for a foreign one and rebuilds the op from scratch. Processes with and without
    the venv's ``bin`` on PATH (a launcher's, Ray's, a test's) then rebuilt it in turn: 12
    times, 28-72 s each, in one run of the test suite here. ``launch/setup.sh`` builds the ops
    through this too."""
    if sys.prefix == sys.base_prefix:
        return
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    bindir = os.path.join(sys.prefix, "bin")
    ours, found = os.path.join(bindir, "ninja"), shutil.which("ninja")
    if os.path.exists(ours) and not (found and os.path.samefile(found, ours)):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def import_deepspeed():
    """``import deepspeed``, without the MLflow import that DeepSpeed's autotuner (which this
    pipeline does not use) makes when DeepSpeed is imported: a second of CPU in every training
    rank, most of which never log (``pipeline.tracking`` imports MLflow at its first write).
    Where MLflow is already imported, or DeepSpeed is, this is the plain import."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner goes without
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def build(name: str) -> None:
    """Build (or find built) the op of DeepSpeed's builder ``name`` for this machine's accelerator,
    where training loads it from."""
    own_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(name).load(verbose=False)


def main(argv: list[str]) -> None:
    """``python -m pipeline.ds_ops OP ...`` builds the ops of those builders; ``python -m
    pipeline.ds_ops -m MODULE ARG ...`` runs one of DeepSpeed's scripts (say
    ``deepspeed.checkpoint.ds_to_universal``) as ``python -m`` would, DeepSpeed imported
    without MLflow."""
    if argv[:1] == ["-m"]:
        import runpy

        import_deepspeed()
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    for op in argv:
        build(op)


if __name__ == "__main__":
    main(sys.argv[1:])
