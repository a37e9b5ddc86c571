"""An evaluator is named by the config and nothing else: a k-NN probe that lives in a test
module (``tests/support/knn_probe.py``) runs on every checkpoint through the evaluate CLI, is recorded
in the run dir and in MLflow (child run, parent step metric, transfer plot) and appears in the
run's summary next to the few-shot lines, with no change outside its module and its config."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from data_prep.compose import ConfigError
from pipeline.config import check_paths, load_config
from pipeline.evaluate.runner import validate_eval, wanted
from pipeline.run import _print_summary, _summary
from pipeline.rundir import RunDir
from pipeline.tracking import PARENT_TAG, Tracker
from tests.support import ROOT
from tests.support.data import copy_tags, make_checkpoints, write_digits_shards
from tests.support.services import new_run


def _eval_yaml(path, train: str, test: str) -> str:
    fewshot = {
        "name": "digits",
        "train": train,
        "test": test,
        "shots": [1, 5],
        "seeds": 1,
        "crop_ratio": 1.0,
        "batch_size": 250,
    }
    knn = {
        "evaluator": "tests.support.knn_probe",
        "name": "digits",
        "train": train,
        "test": test,
        "k": 3,
        "batch_size": 250,
    }
    path.write_text(OmegaConf.to_yaml({"eval": {"fewshot": [fewshot], "extra": [knn]}}))
    return str(path)


@pytest.mark.timeout(300)
def test_an_evaluator_named_in_the_config_is_run_recorded_tracked_and_summarised(tmp_path, capsys):
    train, test = write_digits_shards(tmp_path / "digits")
    ckpts = make_checkpoints(tmp_path / "pretrain", [0, 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    _, run_id = new_run(client, "extra-evaluator")
    run = RunDir(str(tmp_path / "run"))
    run.mlflow_run_id = run_id
    copy_tags(ckpts, tmp_path / "run" / "checkpoints", ["step_00000000", "step_00000002"], run_id)

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "PIPELINE_MLFLOW_SPOOL": str(tmp_path / "spool"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "watch",
            run.url,
            _eval_yaml(tmp_path / "eval.yaml", train, test),
            "--once",
            "--no-ray",
            "--tracking-uri",
            uri,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    records = run.eval_records()
    assert {tag: sorted(recs) for tag, recs in records.items()} == {
        tag: ["fewshot-digits", "knn_probe-digits"] for tag in ("step_00000000", "step_00000002")
    }
    knn = records["step_00000002"]["knn_probe-digits"]
    assert knn["protocol"] == "knn" and knn["params"]["k"] == 3 and 0.1 < knn["metrics"]["top1"] <= 1.0

    exp = client.get_run(run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{run_id}' and tags.`eval.protocol` = 'knn'")
    assert sorted(int(c.data.tags["eval.checkpoint_step"]) for c in children) == [0, 2]
    assert all(c.info.status == "FINISHED" and c.data.metrics["top1"] > 0.1 for c in children)
    history = client.get_metric_history(run_id, "knn_probe/digits/top1")
    assert sorted((m.step, m.value) for m in history) == [
        (0, records["step_00000000"]["knn_probe-digits"]["metrics"]["top1"]),
        (2, knn["metrics"]["top1"]),
    ]
    assert [a.path for a in client.list_artifacts(run_id, "transfer")] == ["transfer/fewshot_vs_step.png"]

    # The run's summary, as the job writes it (summary.json) and prints it on a rerun.
    tracker = Tracker(uri, run_id, spool_dir=str(tmp_path / "spool"))
    run.write_summary(_summary(run, tracker, [], {"step": 2, "loss": 1.5, "total_steps": 10}, 3.0, 4.0))
    summary = run.summary()
    assert summary["evaluations"]["knn"]["digits"] == {
        "0": {"top1": records["step_00000000"]["knn_probe-digits"]["metrics"]["top1"]},
        "2": {"top1": knn["metrics"]["top1"]},
    }
    capsys.readouterr()
    _print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("knn ")] == [
        f"knn digits      random init: top1 {records['step_00000000']['knn_probe-digits']['metrics']['top1']:.3f}",
        f"knn digits           step 2: top1 {knn['metrics']['top1']:.3f}",
    ]
    fewshot = [line for line in lines if line.startswith("few-shot ")]  # the demo's lines, as before
    assert len(fewshot) == 2 and all(
        re.fullmatch(r"few-shot digits +(random init|step 2): 1-shot \d\.\d{3}  5-shot \d\.\d{3}", line)
        for line in fewshot
    ), fewshot


def test_an_extra_evaluator_is_checked_by_its_own_schema_before_anything_starts(tmp_path):
    base = ["data.train=unused", "train.steps=1", f"output_dir={tmp_path}"]
    knn = "eval.extra=[{evaluator: tests.support.knn_probe, name: digits, train: a, test: b}]"
    cfg = load_config(None, [*base, knn])
    assert [(n, spec.k) for n, spec in wanted(cfg.eval)] == [("knn_probe", 5)]  # typed by its Config: k's default
    with pytest.raises(ConfigError, match=r"eval\.extra\.0\.train: a does not exist"):  # its paths are checked at start
        check_paths(cfg)
    with pytest.raises(ConfigError, match=r"eval\.extra\.0\.k: Value 'many' .*could not be converted to Integer"):
        validate_eval(load_config(None, [*base, knn, "eval.extra.0.k=many"]).eval)
    with pytest.raises(ConfigError, match=r"eval\.extra\[digits\]\.k: must be positive"):
        validate_eval(load_config(None, [*base, knn, "eval.extra.0.k=0"]).eval)
    with pytest.raises(ConfigError, match=r"eval\.extra\.0\.evaluator: no module tests\.no_such_probe"):
        validate_eval(load_config(None, [*base, "eval.extra=[{evaluator: tests.no_such_probe, name: digits}]"]).eval)
    with pytest.raises(ConfigError, match=r"eval\.extra\.0: needs evaluator"):
        validate_eval(load_config(None, [*base, "eval.extra=[{name: digits}]"]).eval)
