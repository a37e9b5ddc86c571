"""The finished model where its users use it: an MLflow Model in the registry (pyfunc and
pytorch loads, ``mlflow models serve`` over HTTP, the registry page's schema in Chromium), a
transformers folder that ``ViTForImageClassification`` loads strictly, the timm file, a
model card; all from one export of real checkpoints, the weights equal in every form.

One ``mlflow server`` and one ``mlflow models serve`` for the module; the checkpoints are
those of ``test_watcher`` (a 1-rank ZeRO-2 engine of ``vit_tiny_test``, width 32, depth 2).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import checkpoint
from pipeline.data import decode_eval, eval_crop, to_model_input
from pipeline.evaluate.record import record_of
from pipeline.export import load_export
from pipeline.mlflow_model import log_final_weights
from pipeline.rundir import RunDir
from pipeline.tracking import Tracker
from tests.support.browser import ML, render, text_of
from tests.support.data import copy_tags, make_checkpoints
from tests.support.services import free_port, new_run

TAG = "step_00000004"
NAME = "vit-handoff"


def jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_shards) -> Path:
    """A run dir with checkpoints at steps 2 and 4 of a 4-class model trained (in name) on the
    tiny shards, and a few-shot record for step 4."""
    out = tmp_path_factory.mktemp("handoff_run")
    make_checkpoints(out, [2, 4], num_classes=4, overrides=(f"data.train={tiny_shards}",))
    record = record_of(
        "fewshot_linear",
        "digits",
        TAG,
        4,
        str(out / "checkpoints" / TAG),
        {"shots": [5]},
        {"5shot": 0.625},
        {"fewshot/digits/5shot": 0.625},
        np.eye(4, dtype=int),
        "digits",
    )
    RunDir(str(out)).write_eval_record(TAG, "fewshot-digits", record)
    return out


@pytest.fixture(scope="module")
def ours(run_dir):
    export = load_export(str(run_dir), TAG)
    return export, export.model()


@pytest.fixture(scope="module")
def registered(mlflow_server, run_dir, tmp_path_factory) -> dict:
    """The run's final weights logged and registered as the training job does (that a resumed
    job logging again makes no second version: tests/test_watcher.py)."""
    client = MlflowClient(mlflow_server.uri)
    exp_id, run_id = new_run(client, "handoff")
    tracker = Tracker(mlflow_server.uri, run_id, spool_dir=str(tmp_path_factory.mktemp("spool")))
    log_final_weights(tracker, str(run_dir / "checkpoints"), TAG, register_as=NAME)
    (version,) = client.search_model_versions(f"name='{NAME}'")
    return {
        "client": client,
        "run_id": run_id,
        "experiment_id": exp_id,
        "version": version.version,
        "uri": f"models:/{NAME}/{version.version}",
    }


def expected(model, images: list, size: int, crop_ratio: float, features: bool = False) -> np.ndarray:
    """Our model on images preprocessed as evaluation does."""
    pixels = [
        decode_eval(im, size, crop_ratio) if isinstance(im, bytes) else eval_crop(Image.fromarray(im), size, crop_ratio)
        for im in images
    ]
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(np.stack(pixels)))
        return (model.forward_features(x) if features else model(x)).numpy()


@pytest.mark.timeout(300)
def test_the_final_weights_are_a_registered_mlflow_model_with_schema_weights_and_card(registered, run_dir, tmp_path):
    client, run_id = registered["client"], registered["run_id"]
    version = client.get_model_version(NAME, registered["version"])
    assert version.run_id == run_id and version.source == f"{client.get_run(run_id).info.artifact_uri}/final_weights"
    local = Path(client.download_artifacts(run_id, "final_weights", str(tmp_path)))
    mlmodel = (local / "MLmodel").read_text()
    assert "python_function" in mlmodel and "pytorch:" in mlmodel and "signature" in mlmodel
    assert (local / "serving_input_example.json").is_file() and (local / "requirements.txt").is_file()
    assert "torch==" in (local / "requirements.txt").read_text()
    # The same bytes as the timm export of the command line.
    timm = tmp_path / "timm.safetensors"
    assert checkpoint.main(["export", str(run_dir), TAG, str(timm)]) == 0
    digest = hashlib.sha256(timm.read_bytes()).hexdigest()
    assert hashlib.sha256((local / "artifacts" / "model.safetensors").read_bytes()).hexdigest() == digest
    assert {p.name for p in (local / "artifacts").iterdir()} >= {
        "model.safetensors",
        "config.yaml",
        "meta.json",
        "README.md",
    }
    card = (local / "README.md").read_text()
    assert card == (local / "artifacts" / "README.md").read_text()
    for fact in (
        "width 32, depth 2, heads 2",
        "index: `train`",
        "samples: 48",
        "classes: 4",
        "global batch 8",
        "| fewshot-digits | fewshot_linear | digits | 5shot | 0.6250 |",
        "ViTForImageClassification",
        "mlflow.pyfunc.load_model",
        "safetensors.torch.load_file",
    ):
        assert fact in card, fact


@pytest.mark.timeout(300)
def test_pyfunc_and_pytorch_loads_from_the_registry_give_our_logits(registered, ours, mlflow_server, monkeypatch):
    import mlflow.pyfunc
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    export, model = ours
    size, ratio = export.preprocess["image_size"], export.preprocess["crop_ratio"]
    rng = np.random.default_rng(3)
    images = [jpeg(rng, 40, 24), jpeg(rng, 16, 16), rng.integers(0, 256, (21, 35, 3), dtype=np.uint8)]
    pyfunc = mlflow.pyfunc.load_model(registered["uri"])
    logits = pyfunc.predict(pd.DataFrame({"image": images}))
    want = expected(model, images, size, ratio)
    assert logits.shape == (3, 4) and np.allclose(logits, want, atol=1e-5, rtol=1e-5)
    feats = pyfunc.predict(pd.DataFrame({"image": images}), params={"output": "features"})
    want_feats = expected(model, images, size, ratio, features=True)
    assert (
        feats.shape == (3, 32) and np.allclose(feats, want_feats, atol=1e-5) and np.ptp(want_feats, axis=0).max() > 0.1
    )
    module = mlflow.pytorch.load_model(registered["uri"])
    x = torch.rand(5, 3, size, size) * 2 - 1  # a batch size the export never saw
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, export.state[k]) for k, v in module.state_dict().items())


@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_an_http_request_with_our_logits(registered, ours, mlflow_server, tmp_path):
    export, model = ours
    port = free_port()
    # The local environment manager execs `uvicorn`: the venv's, found first on PATH.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        registered["uri"],
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.exceptions.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(0.5)
        rng = np.random.default_rng(4)
        images = [jpeg(rng, 30, 20), jpeg(rng, 18, 18)]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(im).decode()] for im in images]}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text[-2000:]
        logits = np.asarray(r.json()["predictions"], dtype=np.float32)
        size, ratio = export.preprocess["image_size"], export.preprocess["crop_ratio"]
        assert np.allclose(logits, expected(model, images, size, ratio), atol=1e-5, rtol=1e-5)
        body["params"] = {"output": "features"}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert r.status_code == 200 and np.asarray(r.json()["predictions"]).shape == (2, 32)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the CLI and its uvicorn worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.timeout(300)
def test_any_tag_on_request_becomes_a_registered_model_of_its_run(
    registered, run_dir, mlflow_server, tmp_path, monkeypatch
):
    import mlflow.pyfunc

    tag = "step_00000002"
    copy_tags(str(run_dir / "checkpoints"), tmp_path / "run" / "checkpoints", [tag], registered["run_id"])
    out = tmp_path / "model"
    argv = [
        "export",
        str(tmp_path / "run"),
        tag,
        str(out),
        "--format",
        "mlflow",
        "--register",
        f"{NAME}-early",
        "--tracking-uri",
        mlflow_server.uri,
    ]
    assert checkpoint.main(argv) == 0 and (out / "MLmodel").is_file()
    (version,) = registered["client"].search_model_versions(f"name='{NAME}-early'")
    assert version.run_id == registered["run_id"] and version.source.endswith(f"/model_{tag}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    image = [np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)]
    export = load_export(str(run_dir), tag)
    logits = mlflow.pyfunc.load_model(f"models:/{NAME}-early/{version.version}").predict(pd.DataFrame({"image": image}))
    assert np.allclose(logits, expected(export.model(), image, 16, export.preprocess["crop_ratio"]), atol=1e-5)


@pytest.fixture(scope="module")
def pre_logits_run(tmp_path_factory, tiny_shards) -> Path:
    out = tmp_path_factory.mktemp("handoff_prelogits")
    make_checkpoints(out, [2], num_classes=4, overrides=(f"data.train={tiny_shards}",), representation_size=16)
    return out


@pytest.mark.timeout(300)
def test_transformers_loads_the_hf_export_strictly_with_our_logits(run_dir, ours, tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    export, model = ours
    out = tmp_path / "hf"
    assert checkpoint.main(["export", str(run_dir), TAG, str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }
    hf, info = ViTForImageClassification.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.id2label == {i: f"c{i}" for i in range(4)}
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((16, 16), (27, 19), (40, 64))]
    processor = AutoImageProcessor.from_pretrained(str(out))
    pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    size, ratio = export.preprocess["image_size"], export.preprocess["crop_ratio"]
    ours_pixels = to_model_input(
        torch.from_numpy(np.stack([eval_crop(Image.fromarray(a), size, ratio) for a in arrays]))
    )
    assert torch.allclose(pixels, ours_pixels, atol=1e-6)  # the image processor preprocesses as we do
    with torch.no_grad():
        assert torch.allclose(hf.eval()(pixel_values=pixels).logits, model(ours_pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(300)
def test_a_pre_logits_model_exports_as_a_vit_model_whose_pooler_is_our_pre_logits(pre_logits_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import ViTModel

    export = load_export(str(pre_logits_run))
    model = export.model()
    out = tmp_path / "hf"
    assert checkpoint.main(["export", str(pre_logits_run), "latest", str(out), "--format", "hf"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    hf, info = ViTModel.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    head = load_file(str(out / "pretraining_head.safetensors"))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        pooled = hf.eval()(pixel_values=x).pooler_output
        assert torch.allclose(pooled, model.forward_features(x), atol=1e-5, rtol=1e-5)
        logits = pooled @ head["classifier.weight"].T + head["classifier.bias"]
        assert torch.allclose(logits, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(300)
def test_a_global_average_pooling_model_is_refused_for_transformers(tmp_path, tiny_shards, capsys):
    out = tmp_path / "gap_run"
    make_checkpoints(out, [2], num_classes=4, overrides=(f"data.train={tiny_shards}",), pool="gap")
    assert checkpoint.main(["export", str(out), "latest", str(tmp_path / "hf"), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert "pool=gap" in err and "global-average-pooling" in err and not (tmp_path / "hf").exists()
    assert checkpoint.main(["export", str(out), "latest", str(tmp_path / "gap.safetensors")]) == 0  # timm takes it


@pytest.mark.timeout(300)
def test_any_host_exports_from_a_run_dir_on_object_storage(run_dir, ours, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(run_dir / "checkpoints" / TAG), f"/bucket/handoff/checkpoints/{TAG}", recursive=True)
    fs.put(str(run_dir / "evals"), "/bucket/handoff/evals", recursive=True)
    try:
        remote = load_export("memory://bucket/handoff", TAG)
        export, _ = ours
        assert remote.state.keys() == export.state.keys()
        assert all(torch.equal(remote.state[k], v) for k, v in export.state.items())
        assert remote.results == export.results and remote.results["fewshot-digits"]["metrics"] == {"5shot": 0.625}
    finally:
        fs.rm("/bucket/handoff", recursive=True)


@pytest.mark.slow
@pytest.mark.timeout(900)  # room for installing chromium on first use
def test_the_registry_page_shows_the_version_with_its_schema(chromium, registered, mlflow_server):  # noqa: F811
    version = registered["version"]
    page = text_of(
        render(chromium, f"{mlflow_server.uri}/#/models/{NAME}/versions/{version}", "registered_model_version")
    )
    assert f"Version {version}" in page and "Source Run : handoff" in page
    assert "Schema Name Type Inputs (1) Outputs (1)" in page  # no schema: "Inputs (0)"
    # The registry page folds the columns; the run's artifact view shows them in the MLmodel.
    exp, run = registered["experiment_id"], registered["run_id"]
    view = text_of(
        render(
            chromium,
            f"{mlflow_server.uri}/#/experiments/{exp}/runs/{run}/artifacts/final_weights/MLmodel?{ML}",
            "registered_model_mlmodel",
        )
    )
    flat = re.sub(r"\s+", "", view)
    assert "python_function:" in flat and "pytorch:" in flat and "model_data:data" in flat
    assert '"type":"binary","name":"image"' in flat and '"name":"logits"' in flat and '"dtype":"float32"' in flat
