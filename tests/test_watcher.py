"""Every complete checkpoint is evaluated once, recorded in the run dir and shown as child runs
on a real MLflow server (also after an outage of that server).

Checkpoints are real: a world-size-1 DeepSpeed ZeRO-2 engine (gloo) saved with
``pipeline.checkpoint.save``; the transfer set is scikit-learn's digits, sharded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_tracking import MlflowServer, new_run

from pipeline import checkpoint
from pipeline.config import EvalConfig
from pipeline.evaluate.runner import evaluate_checkpoint
from pipeline.evaluate.watch import Watcher
from pipeline.rundir import RunDir
from pipeline.tracking import PARENT_TAG, Tracker, log_final_weights


def write_digits_shards(out: Path, size: int = 32) -> tuple[str, str]:
    """scikit-learn's digits as data_prep would shard them: 1297 train, 500 test; index paths."""
    import webdataset as wds
    from PIL import Image

    from data_prep.demo import load_digits_images

    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_images(size)
    order = np.random.default_rng(0).permutation(len(labels))
    paths = []
    for split, idx in (("train", order[500:]), ("test", order[:500])):
        with wds.TarWriter(str(out / f"{split}-000000.tar")) as sink:
            for i in idx:
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"digit{i:05d}", "jpg": buf.getvalue(), "cls": str(int(labels[i])).encode()})
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url": f"{split}-000000.tar", "nsamples": len(idx)}],
                 "classes": [str(c) for c in range(10)], "num_classes": 10}
        (out / f"{split}_index.json").write_text(json.dumps(index))
        paths.append(str(out / f"{split}_index.json"))
    return paths[0], paths[1]


def make_checkpoints(out: Path, steps: list[int], model: str = "vit_tiny_test", num_classes: int = 12,
                     overrides: tuple[str, ...] = (), **model_kw) -> str:
    """Real checkpoints of a 1-rank ZeRO-2 engine at ``steps`` (weights nudged between them);
    ``overrides``: more config ``key=value`` settings."""
    from pipeline.config import load_config, to_yaml
    from pipeline.engine import dist_setup
    from pipeline.train import build_engine

    _, _, device = dist_setup(standalone=True)
    overrides = [f"model.name={model}", "data.train=unused", f"output_dir={out}", "train.steps=10", "train.global_batch_size=8",
                 "data.micro_batch_size=8", "ray.num_workers=1", "deepspeed.zero_stage=2", "train.precision=fp32",
                 *[f"model.{k}={v}" for k, v in model_kw.items()], *overrides]
    cfg = load_config(None, overrides)
    engine, _ = build_engine(cfg, num_classes, 10, 1, device)
    ckpt_dir = out / "checkpoints"
    for step in steps:
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        meta = {"samples_seen": 8 * step, "world_size": 1, "total_steps": 10, "num_classes": num_classes, "model": model,
                "image_size": engine.module.spec.img_size, "mlflow_run_id": None}
        checkpoint.save(engine, str(ckpt_dir), step, meta, {}, to_yaml(cfg))
    return str(ckpt_dir)


def copy_tags(src: str, dst: Path, tags: list[str], run_id: str | None = None, complete: bool = True) -> str:
    """Copy checkpoint tags into ``dst`` (without the marker: an unfinished save); set the run id."""
    for tag in tags:
        shutil.copytree(Path(src) / tag, dst / tag)
        meta = json.loads((dst / tag / "meta.json").read_text())
        (dst / tag / "meta.json").write_text(json.dumps({**meta, "mlflow_run_id": run_id}))
        if not complete:
            (dst / tag / checkpoint.MARKER).unlink()
    return str(dst)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_shards(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("pretrain"), [0, 2, 4])


def eval_cfg(digits, finetune: bool = False):
    train, test = digits
    fewshot = {"name": "digits", "train": train, "test": test, "shots": [1, 5], "seeds": 1, "crop_ratio": 1.0, "batch_size": 250}
    ft = {"name": "digits", "train": train, "test": test, "image_size": 24, "steps": 3, "warmup_steps": 1, "batch_size": 32,
          "lrs": [0.1], "dev_fraction": 0.0, "precision": "fp32", "crop_min_area": 0.8, "flip": False, "num_workers": 0,
          "shuffle_buffer": 64, "eval_batch_size": 250}
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), {"fewshot": [fewshot], "finetune": [ft] if finetune else [], "poll_seconds": 0.1})


def child_runs(client: MlflowClient, run_id: str) -> list:
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{run_id}'")


@pytest.mark.timeout(240)
def test_no_partial_checkpoint_and_none_twice_across_watcher_restarts(server, digits, ckpts, tmp_path):
    client = MlflowClient(server.uri)
    _, run_id = new_run(client, "watch")
    run = RunDir(str(tmp_path / "run"))
    ckdir = tmp_path / "run" / "checkpoints"
    copy_tags(ckpts, ckdir, ["step_00000000"], run_id)
    copy_tags(ckpts, ckdir, ["step_00000002"], run_id, complete=False)
    cfg = eval_cfg(digits)

    watcher = Watcher(cfg, run, server.uri, run_id, use_ray=False)
    watcher.poll()
    watcher.poll()
    assert set(watcher.results) == {"step_00000000"} and not watcher.failed  # step 2 has no marker yet

    restarted = Watcher(cfg, run, server.uri, run_id, use_ray=False)
    assert restarted.done == {"step_00000000"}  # read back from the run's records
    restarted.poll()
    assert restarted.results == {}

    (ckdir / "step_00000002" / checkpoint.MARKER).write_text("")  # the save completes
    (tmp_path / "eval.yaml").write_text(OmegaConf.to_yaml({"eval": cfg}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "PIPELINE_MLFLOW_SPOOL": str(tmp_path / "spool2")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "watch", str(ckdir), str(tmp_path / "eval.yaml"),
                           "--once", "--no-ray", "--tracking-uri", server.uri],  # the run id comes from meta.json
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    submitted = [line for line in proc.stderr.splitlines() if "evaluating checkpoint" in line]
    assert len(submitted) == 1 and submitted[0].endswith("step_00000002"), submitted

    steps = sorted(int(c.data.tags["eval.checkpoint_step"]) for c in child_runs(client, run_id))
    assert steps == [0, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")) == [0, 2]
    assert Watcher(cfg, run, server.uri, run_id, use_ray=False).done == {"step_00000000", "step_00000002"}


@pytest.mark.timeout(240)
def test_each_evaluation_is_a_child_run_with_artifacts_and_a_parent_step_metric(server, digits, ckpts, tmp_path):
    client = MlflowClient(server.uri)
    _, run_id = new_run(client, "children")
    cfg = eval_cfg(digits, finetune=True)
    run = RunDir(str(tmp_path / "run"))
    result = evaluate_checkpoint(cfg, ckpts, "step_00000004", run, server.uri, run_id)
    assert set(result["fewshot"]) == {"digits"} and set(result["finetune"]) == {"digits"}

    children = {c.data.tags["eval.protocol"]: c for c in child_runs(client, run_id)}
    assert set(children) == {"fewshot_linear", "finetune"}
    for protocol, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["eval.checkpoint_step"] == "4" and child.data.tags["eval.dataset"] == "digits"
        assert child.data.tags["eval.checkpoint_path"] == f"{ckpts}/step_00000004"
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"confusion_matrix.png", "eval_config.yaml"}, protocol
    fs, ft = children["fewshot_linear"].data, children["finetune"].data
    assert 0 < fs.metrics["5shot"] <= 1 and fs.params["shots"] == "[1, 5]"
    assert 0 <= ft.metrics["top1"] <= 1 and ft.params["image_size"] == "24" and ft.metrics["best_lr"] == pytest.approx(0.1)
    assert [m.step for m in client.get_metric_history(children["finetune"].info.run_id, "train_loss/final")] == [1, 2, 3]
    for key in ("fewshot/digits/1shot", "fewshot/digits/5shot", "finetune/digits/top1"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [4], key
    assert [a.path for a in client.list_artifacts(run_id, "transfer")] == ["transfer/fewshot_vs_step.png"]

    assert set(run.eval_records()["step_00000004"]) == {"fewshot-digits", "finetune-digits"}
    again = evaluate_checkpoint(cfg, ckpts, "step_00000004", run, server.uri, run_id)
    assert again["fewshot"] == {} and again["finetune"] == {}
    assert len(child_runs(client, run_id)) == 2


@pytest.mark.timeout(120)
def test_a_remote_checkpoint_dir_is_copied_locally_and_only_complete_ones_are_evaluated(server, digits, ckpts, tmp_path):
    import fsspec

    client = MlflowClient(server.uri)
    _, run_id = new_run(client, "remote")
    local = tmp_path / "staged"
    copy_tags(ckpts, local, ["step_00000000"], run_id)
    copy_tags(ckpts, local, ["step_00000002"], run_id, complete=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(local) + "/", "/bucket/run/checkpoints/", recursive=True)
    url = "memory://bucket/run/checkpoints"

    watcher = Watcher(eval_cfg(digits), RunDir("memory://bucket/run"), server.uri, run_id, use_ray=False)
    watcher.poll()
    assert set(watcher.results) == {"step_00000000"} and not watcher.failed
    (child,) = child_runs(client, run_id)
    assert child.data.tags["eval.checkpoint_path"] == f"{url}/step_00000000"
    assert fs.exists("/bucket/run/evals/step_00000000/fewshot-digits.json")


@pytest.mark.timeout(300)
def test_evaluations_made_while_mlflow_is_down_are_kept_and_shown_once_when_it_is_back(digits, ckpts, tmp_path):
    srv = MlflowServer(tmp_path / "outage_server").start()
    try:
        client = MlflowClient(srv.uri)
        _, run_id = new_run(client, "outage")
        run = RunDir(str(tmp_path / "run"))
        run.mlflow_run_id = run_id  # as the job's driver writes it
        copy_tags(ckpts, tmp_path / "run" / "checkpoints", ["step_00000000", "step_00000002"], run_id)
        srv.stop()
        watcher = Watcher(eval_cfg(digits), run, srv.uri, run_id, use_ray=False)
        watcher.poll()
        watcher.poll()
        assert watcher.done == {"step_00000000", "step_00000002"}  # evaluated, with MLflow down
        assert sorted(watcher.unshown) == [("step_00000000", "fewshot-digits"), ("step_00000002", "fewshot-digits")]

        srv.start()
        sync = [sys.executable, "-m", "pipeline.evaluate", "sync", str(tmp_path / "run"), "--tracking-uri", srv.uri,
                "--spool-dir", str(tmp_path / "no-spool")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(2):  # a second sync finds nothing to do and duplicates nothing
            proc = subprocess.run(sync, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
            assert "every evaluation is in MLflow" in proc.stdout
        steps = sorted(int(c.data.tags["eval.checkpoint_step"]) for c in child_runs(client, run_id))
        assert steps == [0, 2]
        assert sorted(m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")) == [0, 2]
        assert run.unshown_evals() == []
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_final_weights_are_logged_as_safetensors_and_registered_once(server, ckpts, tmp_path):
    from safetensors.torch import load_file

    client = MlflowClient(server.uri)
    _, run_id = new_run(client, "final")
    tracker = Tracker(server.uri, run_id, spool_dir=str(tmp_path / "spool"))
    for _ in range(2):  # a resumed job logs again: still one model version
        log_final_weights(tracker, ckpts, "step_00000004", register_as="vit-tiny-test")
    files = {a.path for a in client.list_artifacts(run_id, "final_weights")}  # an MLflow Model (tests/test_handoff.py)
    assert {"final_weights/MLmodel", "final_weights/artifacts", "final_weights/README.md"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "final_weights/artifacts")} >= {
        f"final_weights/artifacts/{name}" for name in ("model.safetensors", "config.yaml", "meta.json")}
    (version,) = client.search_model_versions("name='vit-tiny-test'")
    assert version.run_id == run_id and version.source == f"{client.get_run(run_id).info.artifact_uri}/final_weights"
    path = client.download_artifacts(run_id, "final_weights/artifacts/model.safetensors", str(tmp_path))
    weights = load_file(path)
    expected = checkpoint.load_fp32_weights(ckpts, "step_00000004")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
