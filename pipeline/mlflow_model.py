"""An exported checkpoint as an MLflow Model: loadable with ``mlflow.pyfunc`` and
``mlflow.pytorch``, servable with ``mlflow models serve``, registrable with a schema.

The ``python_function`` flavor is ``pipeline.serving.ViTImages`` (images in, logits or
pre-logits features out), built from the timm-named ``model.safetensors`` artifact (the very
file of ``--format timm``); the model carries the few modules of this package it imports
(``code/pipeline``: the ViT and evaluation's preprocessing), so loading it needs torch,
Pillow and safetensors, not this package. The ``pytorch`` flavor is the same module exported
with ``torch.export`` (``data/model.pt2``: no pickle), batch size free, input NCHW in [-1, 1].
Signature: an ``image`` column (binary) in, (N, classes) float32 ``logits`` out, a string
param ``output`` (``logits`` | ``features``).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from pipeline.export import CARD_FILE, WEIGHTS_FILE, Export, load_export, model_card, write_timm
from pipeline.serving import ViTImages

ARCH_FILE = "arch.json"
PACKAGE_DIR = Path(__file__).resolve().parent
# What the served model imports of this package (pipeline.serving's imports): the model carries these only.
SERVING_MODULES = ("__init__.py", "serving.py", "model.py", "data", "augment.py")  # data: a package


def signature(export: Export):
    """Input: an ``image`` column (binary); output: (N, classes) float32 logits; param ``output``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    width = export.arch["num_classes"] or export.arch["representation_size"] or export.arch["width"]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width), "logits")]),
        params=ParamSchema([ParamSpec("output", "string", "logits")]),
    )


def example_input(export: Export):
    """Two PNGs of the model's resolution (a served request's shape)."""
    import pandas as pd
    from PIL import Image

    size = export.preprocess["image_size"]
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return pd.DataFrame({"image": images})


def pip_requirements() -> list[str]:
    """What the served model imports, pinned to this environment; CPU torch where no GPU is."""
    reqs = [f"{p}=={version(p)}" for p in ("mlflow", "numpy", "pillow", "safetensors", "fsspec", "pandas")]
    torch_version = str(torch.__version__)
    if torch.version.cuda is None:
        reqs.insert(0, "--extra-index-url https://download.pytorch.org/whl/cpu")
    return reqs + [f"torch=={torch_version}"]


def save(export: Export, path: str, pytorch_flavor: bool = True) -> str:
    """Write the MLflow Model of ``export`` into the new directory ``path``; ``pytorch_flavor``:
    also the ``torch.export`` program (about 15 s of CPU for a small model, most of it imports)."""
    with tempfile.TemporaryDirectory(prefix="vit-mlflow-") as tmp:
        weights = write_timm(export, str(Path(tmp) / WEIGHTS_FILE))
        (Path(tmp) / ARCH_FILE).write_text(json.dumps({"arch": export.arch, "preprocess": export.preprocess}, indent=2))
        (Path(tmp) / "meta.json").write_text(json.dumps(export.meta, indent=2, default=str))
        (Path(tmp) / "config.yaml").write_text(export.config_yaml)
        (Path(tmp) / CARD_FILE).write_text(model_card(export))
        artifacts = {
            "weights": weights,
            "arch": str(Path(tmp) / ARCH_FILE),
            "meta": str(Path(tmp) / "meta.json"),
            "config": str(Path(tmp) / "config.yaml"),
            "card": str(Path(tmp) / CARD_FILE),
        }
        code = Path(tmp) / "code" / "pipeline"
        code.mkdir(parents=True)
        for name in SERVING_MODULES:
            if (PACKAGE_DIR / name).is_dir():
                shutil.copytree(PACKAGE_DIR / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(PACKAGE_DIR / name, code / name)
        mlflow.pyfunc.save_model(
            path,
            python_model=ViTImages(),
            artifacts=artifacts,
            code_paths=[str(code)],
            signature=signature(export),
            input_example=example_input(export),
            pip_requirements=pip_requirements(),
            metadata={"checkpoint_tag": export.tag, "weights_variant": export.variant},
        )
    if pytorch_flavor:
        _add_pytorch_flavor(export, Path(path))
    shutil.copy2(Path(path) / "artifacts" / CARD_FILE, Path(path) / CARD_FILE)
    return path


def _add_pytorch_flavor(export: Export, path: Path) -> None:
    """``data/model.pt2``: the module through ``torch.export`` (dynamic batch), as the
    ``pytorch`` flavor of the same MLmodel."""
    from mlflow.models import Model

    model = export.model()
    size = export.arch["img_size"]
    x = torch.zeros(2, 3, size, size)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}})
    (path / "data").mkdir(exist_ok=True)
    torch.export.save(program, str(path / "data" / "model.pt2"))
    mlmodel = Model.load(str(path / "MLmodel"))
    mlmodel.add_flavor("pytorch", model_data="data", pytorch_version=str(torch.__version__), code=None)
    mlmodel.model_size_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    mlmodel.save(str(path / "MLmodel"))


def log_dir(tracker, model_dir: str, artifact_path: str) -> None:
    """Log a saved MLflow Model's files under ``artifact_path`` of the tracker's run (spooled
    through outages like every write of the run)."""
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.parent.relative_to(root).as_posix()
        tracker.log_artifact(str(path), artifact_path if rel == "." else f"{artifact_path}/{rel}")


def log(
    tracker, export: Export, artifact_path: str, register_as: str | None = None, pytorch_flavor: bool = True
) -> str:
    """Log ``export`` as an MLflow Model at ``artifact_path`` of the tracker's run; with
    ``register_as``, a new version of that registered model (once per run and path)."""
    with tempfile.TemporaryDirectory(prefix="vit-mlflow-") as tmp:
        log_dir(tracker, save(export, str(Path(tmp) / "model"), pytorch_flavor), artifact_path)
    if register_as:
        tracker.register_model(register_as, artifact_path)
    return artifact_path


def log_and_register(export: Export, name: str, model_dir: str, tracking_uri: str | None = None) -> str:
    """The command line's ``--register``: a saved model (``model_dir``) logged to the run the
    checkpoint belongs to (``model_<tag>``) and registered as ``name``; returns its models: URI."""
    from pipeline.tracking import Tracker, resolve_uri

    run_id = export.meta.get("mlflow_run_id")
    uri = resolve_uri(explicit=tracking_uri, configured=export.tracking_uri)
    if not run_id or not uri:
        raise ValueError(
            f"checkpoint {export.tag}: no MLflow run recorded in its meta.json (mlflow_run_id) or no "
            "tracking URI (--tracking-uri): cannot register it"
        )
    tracker = Tracker(uri, run_id)
    artifact_path = f"model_{export.tag}" + ("" if export.variant == "raw" else f"_{export.variant}")
    log_dir(tracker, model_dir, artifact_path)
    tracker.register_model(name, artifact_path)
    if not tracker.flush(tracker.flush_timeout_s):
        raise RuntimeError(f"MLflow at {uri} did not take the model; it stays spooled in {tracker.journal.path_hint()}")
    versions = tracker.client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    version = max(int(v.version) for v in versions if v.tags.get("pipeline.artifact_path") == artifact_path)
    return f"models:/{name}/{version}"


def log_final_weights(
    tracker, source: str, tag: str, register_as: str | None = None, pytorch_flavor: bool = True
) -> str:
    """Log checkpoint ``tag`` of a run dir or checkpoints dir (``source``, any fsspec URL) as an
    MLflow Model (pyfunc and pytorch flavors, a signature, the
    timm-named weights, config, meta and model card as artifacts) at ``final_weights/`` of the
    tracker's run; with ``register_as`` it becomes a new version of that registered model
    (once per run). Returns the artifact path."""
    artifact_path = log(tracker, load_export(source, tag), "final_weights", register_as, pytorch_flavor)
    tracker.set_tags({"pipeline.final_checkpoint": tag})
    return artifact_path
