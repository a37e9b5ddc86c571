"""Every complete checkpoint is evaluated once, recorded in the run dir and shown as child runs
on a real MLflow server (also after an outage of that server).

Checkpoints are real: a world-size-1 DeepSpeed ZeRO-2 engine (gloo) saved with
``pipeline.checkpoint.save``; the transfer set is scikit-learn's digits, sharded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import checkpoint
from pipeline.evaluate.runner import evaluate_checkpoint
from pipeline.evaluate.watch import Watcher
from pipeline.mlflow_model import log_final_weights
from pipeline.rundir import RunDir
from pipeline.tracking import Tracker
from tests.support import ROOT
from tests.support.data import copy_tags, eval_cfg, make_checkpoints, write_digits_shards
from tests.support.services import child_runs, new_run


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_shards(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("pretrain"), [0, 2, 4])


@pytest.mark.timeout(240)
def test_no_partial_checkpoint_and_none_twice_across_watcher_restarts(mlflow_server, digits, ckpts, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "watch")
    run = RunDir(str(tmp_path / "run"))
    ckdir = tmp_path / "run" / "checkpoints"
    copy_tags(ckpts, ckdir, ["step_00000000"], run_id)
    copy_tags(ckpts, ckdir, ["step_00000002"], run_id, complete=False)
    cfg = eval_cfg(digits)

    watcher = Watcher(cfg, run, mlflow_server.uri, run_id, use_ray=False)
    watcher.poll()
    watcher.poll()
    assert set(watcher.results) == {"step_00000000"} and not watcher.failed  # step 2 has no marker yet

    restarted = Watcher(cfg, run, mlflow_server.uri, run_id, use_ray=False)
    assert restarted.done == {"step_00000000"}  # read back from the run's records
    restarted.poll()
    assert restarted.results == {}

    (ckdir / "step_00000002" / checkpoint.MARKER).write_text("")  # the save completes
    (tmp_path / "eval.yaml").write_text(OmegaConf.to_yaml({"eval": cfg}))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "PIPELINE_MLFLOW_SPOOL": str(tmp_path / "spool2"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "watch",
            str(ckdir),
            str(tmp_path / "eval.yaml"),
            "--once",
            "--no-ray",
            "--tracking-uri",
            mlflow_server.uri,
        ],  # the run id comes from meta.json
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    submitted = [line for line in proc.stderr.splitlines() if "evaluating checkpoint" in line]
    assert len(submitted) == 1 and submitted[0].endswith("step_00000002"), submitted

    steps = sorted(int(c.data.tags["eval.checkpoint_step"]) for c in child_runs(client, run_id))
    assert steps == [0, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")) == [0, 2]
    assert Watcher(cfg, run, mlflow_server.uri, run_id, use_ray=False).done == {"step_00000000", "step_00000002"}


@pytest.mark.timeout(240)
def test_each_evaluation_is_a_child_run_with_artifacts_and_a_parent_step_metric(mlflow_server, digits, ckpts, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "children")
    cfg = eval_cfg(digits, finetune=True)
    run = RunDir(str(tmp_path / "run"))
    result = evaluate_checkpoint(cfg, ckpts, "step_00000004", run, mlflow_server.uri, run_id)
    assert set(result["fewshot"]) == {"digits"} and set(result["finetune"]) == {"digits"}

    children = {c.data.tags["eval.protocol"]: c for c in child_runs(client, run_id)}
    assert set(children) == {"fewshot_linear", "finetune"}
    for protocol, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["eval.checkpoint_step"] == "4" and child.data.tags["eval.dataset"] == "digits"
        assert child.data.tags["eval.checkpoint_path"] == f"{ckpts}/step_00000004"
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {
            "confusion_matrix.png",
            "eval_config.yaml",
        }, protocol
    fs, ft = children["fewshot_linear"].data, children["finetune"].data
    assert 0 < fs.metrics["5shot"] <= 1 and fs.params["shots"] == "[1, 5]"
    assert (
        0 <= ft.metrics["top1"] <= 1 and ft.params["image_size"] == "24" and ft.metrics["best_lr"] == pytest.approx(0.1)
    )
    assert [m.step for m in client.get_metric_history(children["finetune"].info.run_id, "train_loss/final")] == [
        1,
        2,
        3,
    ]
    for key in ("fewshot/digits/1shot", "fewshot/digits/5shot", "finetune/digits/top1"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [4], key
    assert [a.path for a in client.list_artifacts(run_id, "transfer")] == ["transfer/fewshot_vs_step.png"]

    assert set(run.eval_records()["step_00000004"]) == {"fewshot-digits", "finetune-digits"}
    again = evaluate_checkpoint(cfg, ckpts, "step_00000004", run, mlflow_server.uri, run_id)
    assert again["fewshot"] == {} and again["finetune"] == {}
    assert len(child_runs(client, run_id)) == 2


@pytest.mark.timeout(180)
def test_an_evaluation_task_writes_records_without_mlflow_and_its_watcher_shows_them(
    mlflow_server, digits, ckpts, tmp_path
):
    """The Ray task's body (``_remote_eval``), in a fresh interpreter as in a Ray worker, writes
    the record and never imports MLflow; the watcher's next poll makes it a child run."""
    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "task")
    run = RunDir(str(tmp_path / "run"))
    copy_tags(ckpts, tmp_path / "run" / "checkpoints", ["step_00000004"], run_id)
    cfg = eval_cfg(digits)
    OmegaConf.save(cfg, tmp_path / "eval.yaml")
    code = (
        "import sys\nfrom omegaconf import OmegaConf\nfrom pipeline.evaluate.watch import _remote_eval\n"
        f"out = _remote_eval(OmegaConf.to_container(OmegaConf.load({str(tmp_path / 'eval.yaml')!r})), "
        f"{run.url!r}, 'step_00000004')\n"
        "print(sorted(out['fewshot']), 'mlflow' in sys.modules)"
    )
    task = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=150, check=True
    )
    assert task.stdout.split("\n")[-2] == "['digits'] False", task.stdout[-2000:] + task.stderr[-2000:]
    assert set(run.eval_records()["step_00000004"]) == {"fewshot-digits"}
    assert child_runs(client, run_id) == []  # the task showed nothing

    watcher = Watcher(cfg, run, mlflow_server.uri, run_id, use_ray=False)
    watcher.poll()
    assert watcher.results == {} and watcher.unshown == []  # nothing to evaluate, all shown
    [child] = child_runs(client, run_id)
    assert child.info.status == "FINISHED" and child.data.tags["eval.checkpoint_step"] == "4"
    assert [m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")] == [4]


@pytest.mark.timeout(120)
def test_a_remote_checkpoint_dir_is_copied_locally_and_only_complete_ones_are_evaluated(
    mlflow_server, digits, ckpts, tmp_path
):
    import fsspec

    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "remote")
    local = tmp_path / "staged"
    copy_tags(ckpts, local, ["step_00000000"], run_id)
    copy_tags(ckpts, local, ["step_00000002"], run_id, complete=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(local) + "/", "/bucket/run/checkpoints/", recursive=True)
    url = "memory://bucket/run/checkpoints"

    watcher = Watcher(eval_cfg(digits), RunDir("memory://bucket/run"), mlflow_server.uri, run_id, use_ray=False)
    watcher.poll()
    assert set(watcher.results) == {"step_00000000"} and not watcher.failed
    (child,) = child_runs(client, run_id)
    assert child.data.tags["eval.checkpoint_path"] == f"{url}/step_00000000"
    assert fs.exists("/bucket/run/evals/step_00000000/fewshot-digits.json")


@pytest.mark.timeout(300)
def test_evaluations_made_while_mlflow_is_down_are_kept_and_shown_once_when_it_is_back(
    digits, ckpts, tmp_path, mlflow_servers
):
    srv = mlflow_servers(tmp_path / "outage_server")
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
        sync = [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "sync",
            str(tmp_path / "run"),
            "--tracking-uri",
            srv.uri,
            "--spool-dir",
            str(tmp_path / "no-spool"),
        ]
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
def test_final_weights_are_logged_as_safetensors_and_registered_once(mlflow_server, ckpts, tmp_path):
    from safetensors.torch import load_file

    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "final")
    tracker = Tracker(mlflow_server.uri, run_id, spool_dir=str(tmp_path / "spool"))
    for _ in range(2):  # a resumed job logs again: still one model version
        log_final_weights(tracker, ckpts, "step_00000004", register_as="vit-tiny-test", pytorch_flavor=False)
    files = {a.path for a in client.list_artifacts(run_id, "final_weights")}  # an MLflow Model (tests/test_handoff.py)
    assert {"final_weights/MLmodel", "final_weights/artifacts", "final_weights/README.md"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "final_weights/artifacts")} >= {
        f"final_weights/artifacts/{name}" for name in ("model.safetensors", "config.yaml", "meta.json")
    }
    (version,) = client.search_model_versions("name='vit-tiny-test'")
    assert version.run_id == run_id and version.source == f"{client.get_run(run_id).info.artifact_uri}/final_weights"
    path = client.download_artifacts(run_id, "final_weights/artifacts/model.safetensors", str(tmp_path))
    weights = load_file(path)
    expected = checkpoint.load_fp32_weights(ckpts, "step_00000004")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
