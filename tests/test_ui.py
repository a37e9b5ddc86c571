"""The MLflow UI shows a pipeline run: its metric charts drawn and its eval child runs listed.

A small real run is logged the way the pipeline logs one (``pipeline.tracking.Tracker``: a
parent run with step metrics, a child run per evaluated checkpoint) into a sqlite store,
served by a real ``mlflow server`` on 127.0.0.1, and looked at by Debian's Chromium,
headless: ``--dump-dom`` gives the DOM after the page has rendered, ``--screenshot`` a PNG.
Screenshots go to ``tests/artifacts/`` (git-ignored); each test prints where.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.browser import ML, render, text_of
from tests.support.services import free_port

STEPS = (0, 100, 200, 300, 400)
SHOTS = {0: 0.38, 100: 0.52, 200: 0.59, 300: 0.63, 400: 0.65}  # digits 10-shot, as the demo measured


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> dict:
    """A pre-training run with `train/loss` and `fewshot/digits/10shot` step metrics and two
    eval child runs, logged into a fresh sqlite store as the job logs them: the Tracker for
    the training run, evaluation records published by `pipeline.evaluate.record`."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.evaluate.record import publish, record_of
    from pipeline.rundir import RunDir
    from pipeline.tracking import Tracker

    out = tmp_path_factory.mktemp("mlflow")
    db = out / "mlflow.db"
    cfg = load_config(
        None,
        [
            "data.train=unused",
            f"output_dir={out}",
            "train.steps=400",
            "name=ui-demo",
            f"tracking.uri=sqlite:///{db}",
            "tracking.experiment=vit-ui-test",
        ],
    )
    parent = Tracker.start(cfg)
    parent.log_params({"model.name": "vit_demo", "train.steps": 400})
    run = RunDir(str(out / "run"))
    for step in STEPS:
        parent.log_metrics({"train/loss": 4.6 * 0.6 ** (step / 100), "train/lr": 1e-3}, step)
    children = []
    for step in (0, 400):  # evaluation records shown the way the job shows them
        tag = f"step_{step:08d}"
        record = record_of(
            "fewshot_linear",
            "digits",
            tag,
            step,
            f"{run.url}/checkpoints/{tag}",
            {"shots": [10]},
            {"10shot": SHOTS[step]},
            {"fewshot/digits/10shot": SHOTS[step]},
            np.eye(10, dtype=int) * 5,
            f"digits 10-shot at {tag}",
        )
        run.write_eval_record(tag, "fewshot-digits", record)
        assert publish(run, parent.uri, parent.run_id, tag, "fewshot-digits", run.eval_record(tag, "fewshot-digits"))
        children.append((f"fewshot-digits-{tag}", run.shown_in_mlflow(tag, "fewshot-digits")))
    for step in STEPS[1:-1]:
        parent.log_metrics({"fewshot/digits/10shot": SHOTS[step]}, step)
    parent.finish()
    exp_id = parent.client.get_run(parent.run_id).info.experiment_id
    for _, run_id in children:
        assert parent.client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    return {"db": db, "experiment_id": exp_id, "run_id": parent.run_id, "children": children}


@pytest.fixture(scope="module")
def mlflow_ui(logged_run, tmp_path_factory) -> str:
    """`mlflow server` over the run's store on a free 127.0.0.1 port; stopped by its pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("mlflow-server") / "server.log", "wb")
    # No job-runner processes (MLflow 3 starts seven otherwise): this server only serves the UI.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{logged_run['db']}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 90 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(900)  # room for installing chromium on first use
def test_the_run_page_shows_its_last_metrics_and_names_its_child_runs(chromium, mlflow_ui, logged_run):
    exp, run = logged_run["experiment_id"], logged_run["run_id"]
    text = text_of(render(chromium, f"{mlflow_ui}/#/experiments/{exp}/runs/{run}?{ML}", "run_overview"))
    assert "ui-demo" in text and "Status Finished" in text
    assert "fewshot/digits/10shot 0.65" in text and re.search(r"train/loss 0\.59\d*", text)
    children = re.search(r"Child runs (.*?) Source", text).group(1)
    assert sorted(children.split(" , ")) == sorted(name for name, _ in logged_run["children"])


@pytest.mark.slow
@pytest.mark.timeout(900)  # room for installing chromium on first use
def test_the_model_metrics_page_draws_every_chart_with_every_step(chromium, mlflow_ui, logged_run):
    exp, run = logged_run["experiment_id"], logged_run["run_id"]
    dom = render(chromium, f"{mlflow_ui}/#/experiments/{exp}/runs/{run}/model-metrics?{ML}", "run_model_metrics")
    text = text_of(dom)
    assert "fewshot/digits (1)" in text and "train (2)" in text
    assert "spin-spinning" not in dom, "a chart is still a spinner"
    assert dom.count('data-testid="draggable-chart-cards-grid"') >= 2
    # Plotly draws a marker per logged point: 3 metrics x 5 steps.
    assert dom.count('class="point"') == 3 * len(STEPS)
    for legend in ("ui-demo (fewshot/digits/10shot)", "ui-demo (train/loss)", "ui-demo (train/lr)"):
        assert legend in text
    assert "0.65" in text and "Step" in text  # the 10-shot axis reaches the last value


@pytest.mark.slow
@pytest.mark.timeout(900)  # room for installing chromium on first use
def test_the_runs_list_shows_the_run_and_its_child_runs(chromium, mlflow_ui, logged_run):
    exp = logged_run["experiment_id"]
    nested = text_of(render(chromium, f"{mlflow_ui}/#/experiments/{exp}/runs?{ML}", "runs_list"))
    assert "ui-demo" in nested and "3 matching runs" in nested  # children folded under the parent
    # Sorted by name, MLflow lists child runs as rows of their own.
    by_name = "orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
    flat = text_of(render(chromium, f"{mlflow_ui}/#/experiments/{exp}/runs?{ML}&{by_name}", "runs_list_by_name"))
    assert "Sort: Run Name" in flat
    names = [name for name, _ in logged_run["children"]] + ["ui-demo"]
    assert [flat.index(name) for name in sorted(names)] == sorted(flat.index(name) for name in names)
