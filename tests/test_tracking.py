"""MLflow as a real service: a `mlflow server` on 127.0.0.1, stopped and restarted under the tracker."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.tracking import SystemMetrics, Tracker, deliver_orphans
from tests.support.services import new_run


@pytest.mark.timeout(240)
def test_an_outage_loses_nothing_and_duplicates_nothing(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    exp_id, run_id = new_run(client, "outage")
    spool = tmp_path / "spool"
    tracker = Tracker(mlflow_server.uri, run_id, spool_dir=str(spool))
    tracker.log_params({"model.name": "vit_demo", "optim.lr": 1e-3})
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    started = client.get_run(run_id).info.start_time / 1000
    system = SystemMetrics(tracker, interval_s=1.0)

    mlflow_server.stop()
    down = time.time() - started
    t0 = time.time()
    for step in range(5, 10):  # training goes on
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    cfg = load_config(
        None,
        [
            "data.train=x",
            f"output_dir={tmp_path}",
            "train.steps=1",
            "ray.num_workers=1",
            "train.global_batch_size=64",
            f"tracking.uri={mlflow_server.uri}",
            f"tracking.spool_dir={spool}",
        ],
    )
    resumed = Tracker.start(cfg, run_id=run_id)  # a restarted rank 0 resumes its run offline
    resumed.log_metrics({"train/lr": 0.5}, 9)
    tracker.log_text("l2: 1024\n", "notes/eval_config.yaml")  # an artifact, from a temp file the spool copies
    tracker.log_metrics({"fewshot/digits/5shot": 0.5}, 10)
    offline_seconds = time.time() - t0
    assert offline_seconds < 20, f"a dead server cost {offline_seconds:.1f}s of logging"
    assert tracker.pending() > 0 and list(spool.glob("*.jsonl"))

    time.sleep(2)  # system metrics are sampled while the server is away
    up = time.time() - started
    mlflow_server.start()  # same port, same store
    time.sleep(1.5)
    system.finish()
    assert tracker.flush(timeout=60)
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(10))
    assert [m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")] == [10]
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [9]
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.info.status == "RUNNING"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/eval_config.yaml"]
    cpu = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert any(down < s < up for s in cpu) and max(cpu) > up, (down, up, cpu)


@pytest.mark.timeout(120)
def test_replaying_a_spool_twice_lands_every_write_once(mlflow_server, tmp_path):
    """A crash between sending a record and noting it sent makes replay send it again."""
    client = MlflowClient(mlflow_server.uri)
    exp_id, run_id = new_run(client, "replay")
    spool = tmp_path / "spool"
    tracker = Tracker(mlflow_server.uri, run_id, spool_dir=str(spool))
    tracker.journal.append(
        {"op": "log_batch", "run": run_id, "uri": mlflow_server.uri, "metrics": [["acc", 0.25, 1000, 3]]}
    )
    tracker.log_metrics({"top1": 0.75}, 3)  # spooled: earlier writes wait
    tracker.log_params({"shots": [1, 5]})
    tracker.set_tags({"phase": "replayed"})
    journal = next(spool.glob("*.jsonl"))
    shutil.copy(journal, spool / "crashed-before-noting.jsonl")  # an orphan holding the same records

    assert tracker.flush(timeout=30)
    assert deliver_orphans(spool)
    assert not (spool / "crashed-before-noting.jsonl").exists()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "acc")] == [(3, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "top1")] == [(3, 0.75)]
    run = client.get_run(run_id)
    assert run.data.params["shots"] == "[1, 5]" and run.data.tags["phase"] == "replayed"


@pytest.mark.timeout(60)
def test_the_ui_serves_the_run_page_and_its_ajax_api(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    exp_id, run_id = new_run(client, "ui")
    Tracker(mlflow_server.uri, run_id).log_metrics({"train/loss": 0.5}, 1)
    page = requests.get(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{run_id}", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()  # the single-page app
    api = requests.get(f"{mlflow_server.uri}/ajax-api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10)
    assert api.status_code == 200
    run = api.json()["run"]
    assert run["info"]["run_id"] == run_id
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"train/loss": 0.5}


@pytest.mark.timeout(90)
def test_system_metrics_of_the_training_run_land_in_the_run(mlflow_server, tmp_path, monkeypatch):
    from pipeline.step_metrics import system_monitor

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = load_config(
        None,
        [
            "data.train=x",
            f"output_dir={tmp_path}",
            "train.steps=1",
            "ray.num_workers=1",
            "train.global_batch_size=64",
            f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=sysmetrics",
        ],
    )
    tracker = Tracker.start(cfg)
    monitor = system_monitor(cfg.tracking.system_metrics, tracker)
    assert monitor is not None
    time.sleep(3.5)
    monitor.finish()
    keys = set(MlflowClient(mlflow_server.uri).get_run(tracker.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    tracker.finish()


@pytest.mark.timeout(60)
def test_a_refused_write_is_set_aside_not_retried_forever(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "refused")
    spool = tmp_path / "spool"
    tracker = Tracker(mlflow_server.uri, run_id, spool_dir=str(spool))
    tracker.log_params({"optim.lr": 0.001})
    tracker.journal.append(
        {"op": "log_batch", "run": run_id, "uri": mlflow_server.uri, "params": [["optim.lr", "0.5"]]}
    )
    tracker.journal.append(
        {"op": "log_batch", "run": run_id, "uri": mlflow_server.uri, "metrics": [["acc", 0.5, 1000, 1]]}
    )
    assert tracker.flush(timeout=10)
    assert client.get_run(run_id).data.params["optim.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run_id, "acc")] == [1]
    rejected = [json.loads(line) for f in spool.glob("*.rejected") for line in f.read_text().splitlines()]
    assert [r["params"] for r in rejected] == [[["optim.lr", "0.5"]]]


@pytest.mark.timeout(60)
def test_only_the_runs_owner_marks_a_resumed_run_running(mlflow_server, tmp_path):
    """A rank under a driver resumes the driver's run without a status write: spooled while the
    server was away and delivered after the driver ended the run, it would undo the end."""
    client = MlflowClient(mlflow_server.uri)
    _, run_id = new_run(client, "owner")
    client.set_terminated(run_id, "FINISHED")
    cfg = load_config(
        None,
        ["data.train=x", f"output_dir={tmp_path}", f"tracking.uri={mlflow_server.uri}", "train.steps=1"],
    )
    rank = Tracker.start(cfg, run_id=run_id, owner=False)
    rank.log_metrics({"train/loss": 1.0}, 1)
    assert client.get_run(run_id).info.status == "FINISHED"
    Tracker.start(cfg, run_id=run_id)  # the driver's (or the owning rank's) resume
    assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.timeout(60)
def test_a_restarted_rank_0_goes_by_the_step_this_host_noted_when_the_server_is_away(tmp_path):
    """Steps logged before a worker restart are not logged again by the restarted rank 0, even
    when it cannot read the run's history (the server is down): it goes by this host's note."""
    from pipeline.step_metrics import last_logged_step
    from pipeline.tracking import configure_http
    from tests.support.services import free_port

    configure_http(2, 0)
    away = f"http://127.0.0.1:{free_port()}"
    spool = str(tmp_path / "spool")
    first = Tracker(away, "run-1", spool)
    assert last_logged_step(first) == 0
    first.note_logged_step(5)
    assert last_logged_step(Tracker(away, "run-1", spool)) == 5  # the restarted rank 0, same host and run
    assert last_logged_step(Tracker(away, "run-2", spool)) == 0  # another run's note is not this run's
