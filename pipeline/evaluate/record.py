"""Showing evaluations in MLflow: the one place that records and plots them.

Evaluators return results; :func:`record_of` turns one into a record that the run dir keeps
(``RunDir.write_eval_record``, the fact that the checkpoint was evaluated), and
:func:`publish` shows a record in MLflow as a child run of the pre-training run (tags: the
checkpoint's tag, step and path, the dataset and protocol; params, metrics, the config and a
confusion-matrix PNG) plus the parent's step metrics (``<evaluator>/<dataset>/<metric>``, e.g.
``fewshot/digits/5shot``, ``finetune/digits/top1``) and the transfer-vs-step plot of them all.

Publishing talks to the server directly (MLflow's own HTTP retries, short timeouts) and is
idempotent: a child run is found again by its tags, metrics carry the record's own
timestamp (the store keeps one row per key, value, timestamp and step), and the run dir
notes the child run id only once it is FINISHED. A record the server did not take stays
unshown; whoever holds the run dir publishes it later (the job's driver before it exits,
``python -m pipeline.evaluate sync <run dir>`` by hand).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.lease import Lease, LeaseHeld
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "eval.checkpoint_tag"
EVAL_NAME_TAG = "eval.name"
VARIANT_TAG = "eval.variant"


def eval_name(evaluator: str, dataset: str, variant: str = "raw") -> str:
    """The name of one evaluation in the run dir and in MLflow: ``fewshot-digits`` for a
    checkpoint's own weights, ``fewshot-digits-ema`` for its EMA weights."""
    return f"{evaluator}-{dataset}" + ("" if variant == "raw" else f"-{variant}")


def metric_prefix(evaluator: str, dataset: str, variant: str = "raw") -> str:
    """Parent-run metric prefix: ``fewshot/digits`` (raw weights), ``fewshot/ema/digits`` (EMA)."""
    return f"{evaluator}/{dataset}" if variant == "raw" else f"{evaluator}/{variant}/{dataset}"


def record_of(
    protocol: str,
    dataset: str,
    tag: str,
    step: int,
    where: str,
    params: dict,
    metrics: dict,
    parent_metrics: dict,
    confusion: np.ndarray,
    title: str,
    curves: dict | None = None,
    config_yaml: str = "",
    variant: str = "raw",
) -> dict:
    return {
        "protocol": protocol,
        "dataset": dataset,
        "variant": variant,
        "tag": tag,
        "step": step,
        "where": where,
        "params": params,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "parent_metrics": {k: float(v) for k, v in parent_metrics.items()},
        "confusion": np.asarray(confusion).astype(int).tolist(),
        "title": title,
        "curves": curves or {},
        "config_yaml": config_yaml,
        "time_ms": int(time.time() * 1000),
    }


def publish(run: RunDir, uri: str, parent_run_id: str, tag: str, name: str, record: dict, timeout_s: int = 10) -> bool:
    """Show one evaluation record in MLflow; True once it is there (noted in the run dir)."""
    if run.shown_in_mlflow(tag, name):
        return True
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PARENT_TAG, configure_http

    configure_http(timeout_s, 1)
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_run_id)
        exp = parent.info.experiment_id
        found = client.search_runs(
            [exp],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
            f"tags.`{CHECKPOINT_TAG}` = '{tag}' and tags.`{EVAL_NAME_TAG}` = '{name}'",
            max_results=5,
        )
        finished = [r for r in found if r.info.status == "FINISHED"]
        if finished:
            run.mark_shown_in_mlflow(tag, name, finished[0].info.run_id)
            return True
        ts = record["time_ms"]
        if found:
            child_id = found[0].info.run_id
        else:
            tags = {
                PARENT_TAG: parent_run_id,
                CHECKPOINT_TAG: tag,
                EVAL_NAME_TAG: name,
                "eval.checkpoint_step": str(record["step"]),
                "eval.checkpoint_path": record["where"],
                "eval.dataset": record["dataset"],
                "eval.protocol": record["protocol"],
                VARIANT_TAG: record.get("variant", "raw"),
            }
            child_id = client.create_run(exp, start_time=ts, tags=tags, run_name=f"{name}-{tag}").info.run_id
        params = [Param(k, _param_value(v)) for k, v in record["params"].items()]
        metrics = [Metric(k, v, ts, record["step"]) for k, v in record["metrics"].items()]
        for label, curve in record.get("curves", {}).items():  # fine-tuning loss curves, x = fine-tuning step
            metrics += [Metric(f"train_loss/{label}", float(loss), ts, int(s)) for s, loss in curve]
        for i in range(0, max(len(params), len(metrics), 1), 100):
            client.log_batch(child_id, metrics=metrics[i : i + 100], params=params[i : i + 100], tags=[])
        with tempfile.TemporaryDirectory() as d:
            if record.get("config_yaml"):
                (Path(d) / "eval_config.yaml").write_text(record["config_yaml"])
                client.log_artifact(child_id, str(Path(d) / "eval_config.yaml"))
            png = plot_confusion(
                np.asarray(record["confusion"]), record["title"], str(Path(d) / "confusion_matrix.png")
            )
            client.log_artifact(child_id, png)
        client.log_batch(
            parent_run_id,
            metrics=[Metric(k, v, ts, record["step"]) for k, v in record["parent_metrics"].items()],
            tags=[RunTag("pipeline.last_evaluated", tag)],
        )
        client.set_terminated(child_id, "FINISHED", end_time=ts)
    except Exception as e:
        log.warning("evaluation %s of %s not shown in MLflow yet (%s); it is kept in %s", name, tag, _short(e), run.url)
        return False
    run.mark_shown_in_mlflow(tag, name, child_id)
    try:
        plot_transfer(
            client,
            parent_run_id,
            sorted({k for r in run.eval_records().values() for rec in r.values() for k in rec["parent_metrics"]}),
        )
    except Exception as e:  # the next publish redraws it
        log.warning("transfer plot not refreshed: %s", _short(e))
    return True


def publish_pending(
    run: RunDir, uri: str | None, parent_run_id: str | None, claims, timeout_s: int = 10
) -> list[tuple[str, str]]:
    """Publish every record not yet in MLflow, each under its claim (``claims``: the claims'
    ``LeaseConfig``); returns ``(tag, name)`` of those still not shown (or being shown elsewhere)."""
    left = []
    for tag, name, rec in run.unshown_evals():
        with claimed(run, tag, [name], claims) as mine:
            if not (
                name in mine and uri and parent_run_id and publish(run, uri, parent_run_id, tag, name, rec, timeout_s)
            ):
                left.append((tag, name))
    return left


@contextlib.contextmanager
def claimed(run: RunDir, tag: str, names: Iterable[str], claims) -> Iterator[set[str]]:
    """Claim each evaluation ``name`` of checkpoint ``tag`` (a lease on ``run.claim_url``, renewed
    every ``claims.heartbeat_s``); yields the names claimed here, leaving out those another live
    claimer holds; released on exit. One evaluator and one publisher per evaluation at a time:
    the in-job watcher and any ``python -m pipeline.evaluate watch`` never evaluate or publish the
    same thing twice; the claim of an evaluator that died is taken over after ``claims.expiry_s``."""
    held: dict[str, Lease] = {}
    try:
        for name in names:
            lease = Lease(run.claim_url(tag, name), claims.heartbeat_s, claims.expiry_s)
            try:
                lease.acquire()
            except LeaseHeld as e:
                log.info("%s of %s is claimed by %s: left to it", name, tag, e.owner.describe())
                continue
            held[name] = lease.start()
        yield set(held)
    finally:
        for lease in held.values():
            lease.release()


def plot_confusion(cm: np.ndarray, title: str, path: str) -> str:
    """A confusion matrix (rows true, columns predicted) as a PNG; counts shown up to 20 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cm)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black",
                    )
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title}\ntop-1 {acc:.3f}", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_transfer(client, parent_run_id: str, keys: list[str]) -> None:
    """PNG of every evaluator's parent-run metrics (``<evaluator>/<dataset>/<metric>``) against
    pre-training step on the parent run; one marker per evaluator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluators = sorted({key.split("/")[0] for key in keys})
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        hist = sorted(client.get_metric_history(parent_run_id, key), key=lambda m: m.step)
        if hist:
            marker = "osD^v<>"[evaluators.index(key.split("/")[0]) % 7]
            ax.plot([m.step for m in hist], [m.value for m in hist], marker=marker, label=key.replace("/", " "))
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("transfer (top-1 unless named)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fewshot_vs_step.png"
        fig.savefig(path, dpi=100)
        client.log_artifact(parent_run_id, str(path), "transfer")
    plt.close(fig)


def _param_value(v) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
