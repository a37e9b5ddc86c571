"""The one MLflow wrapper: the pre-training run, its step metrics and its eval child runs.

Everything is logged with explicit run ids and explicit steps through ``MlflowClient``, so
a resumed run appends to the same run without duplicated or rewound curves, and several
processes (training rank 0, eval tasks) can log to one run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(cfg) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a sqlite file in the run dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """Logs to one MLflow run (``run_id``) of one tracking store."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, cfg, run_id: str | None = None) -> Tracker:
        """Create the pre-training run, or resume ``run_id`` (or ``cfg.tracking.run_id``)."""
        uri = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        run_id = run_id or cfg.tracking.run_id
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifacts = None
            if uri.startswith("sqlite:"):
                artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags={"pipeline.kind": "pretrain"})
        return cls(uri, run.info.run_id)

    def log_params(self, params: dict) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def child(self, name: str, tags: dict[str, str]) -> Tracker:
        """A nested run under this one (``mlflow.parentRunId`` set), e.g. one eval."""
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(
            parent.info.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id, **{k: str(v) for k, v in tags.items()}}
        )
        return Tracker(self.uri, run.info.run_id)

    def children(self, extra_filter: str = "") -> list:
        """Child runs of this run, e.g. to skip checkpoints that were evaluated already."""
        parent = self.client.get_run(self.run_id)
        query = f"tags.`{PARENT_TAG}` = '{self.run_id}'" + (f" and {extra_filter}" if extra_filter else "")
        return self.client.search_runs([parent.info.experiment_id], filter_string=query, max_results=10_000)

    def metric_history(self, key: str) -> list:
        return self.client.get_metric_history(self.run_id, key)


def _param_value(v) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."
