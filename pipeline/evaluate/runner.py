"""Evaluate one finished checkpoint and record it in MLflow.

Each (checkpoint, evaluation) becomes a child run of the pre-training run, tagged with the
checkpoint's step and path, the dataset and the protocol (``fewshot_linear`` or
``finetune``), holding its params, metrics, resolved config and a confusion-matrix PNG; the
headline numbers also go to the parent as step metrics (``fewshot/<dataset>/<k>shot`` and
``finetune/<dataset>/top1`` at the checkpoint's step) so the UI charts transfer against
pre-training steps, and a PNG of them is refreshed on the parent after every evaluation.
An evaluation whose finished child run exists (on the server or still in the spool) is not
run again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint
from pipeline.config import ConfigError, from_container
from pipeline.data import iter_eval_batches
from pipeline.evaluate.fewshot import best_shot_confusion, extract_features, ridge_fewshot
from pipeline.model import create_model
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "eval.checkpoint_tag"
FEWSHOT, FINETUNE = "fewshot_linear", "finetune"


def load_model(ckpt_dir: str, tag: str) -> tuple[torch.nn.Module, DictConfig, dict]:
    """The model of a complete checkpoint with consolidated fp32 weights, in eval mode."""
    tag_dir = Path(ckpt_dir) / tag
    cfg = from_container(OmegaConf.to_container(OmegaConf.load(tag_dir / "config.yaml")))
    meta = json.loads((tag_dir / "meta.json").read_text())
    model = create_model(
        cfg.model.name, num_classes=meta["num_classes"], img_size=cfg.model.img_size, patch_size=cfg.model.patch_size,
        pool=cfg.model.pool, representation_size=cfg.model.representation_size,
    )
    model.load_state_dict(checkpoint.load_fp32_weights(ckpt_dir, tag))
    return model.eval(), cfg, meta


def fewshot_features(model, fs, image_size: int):
    train = extract_features(model, iter_eval_batches(fs.train, image_size, fs.batch_size, fs.crop_ratio))
    test = extract_features(model, iter_eval_batches(fs.test, image_size, fs.batch_size, fs.crop_ratio))
    return train, test


def wanted(eval_cfg: DictConfig) -> set[tuple[str, str]]:
    """The (protocol, dataset) pairs every checkpoint gets."""
    return {(FEWSHOT, fs.name) for fs in eval_cfg.fewshot} | {(FINETUNE, ft.name) for ft in eval_cfg.get("finetune", [])}


def evaluated(parent: Tracker) -> dict[str, set[tuple[str, str]]]:
    """Checkpoint tag -> (protocol, dataset) pairs with a FINISHED child run of ``parent``.

    Reads the server and the spool (evaluations logged while the server was away), so it
    holds across outages and restarts. Raises when the server cannot be read.
    """
    done: dict[str, set[tuple[str, str]]] = {}
    tags = [run.data.tags for run in parent.children("attributes.status = 'FINISHED'")]
    tags += [t for t in parent.spooled_children() if t.get("status") == "FINISHED"]
    for t in tags:
        if t.get(CHECKPOINT_TAG):
            done.setdefault(t[CHECKPOINT_TAG], set()).add((t.get("eval.protocol", FEWSHOT), t.get("eval.dataset", "")))
    return done


def _done_for(parent: Tracker, tag: str) -> set[tuple[str, str]]:
    try:
        return evaluated(parent).get(tag, set())
    except Exception as e:  # server away: the watcher checked before submitting; trust the spool
        log.warning("MLflow unreadable (%s); skipping only the evaluations found in the spool", e)
        spooled = [t for t in parent.spooled_children() if t.get("status") == "FINISHED" and t.get(CHECKPOINT_TAG) == tag]
        return {(t.get("eval.protocol", FEWSHOT), t.get("eval.dataset", "")) for t in spooled}


def validate_eval(eval_cfg: DictConfig) -> None:
    """Checks of the eval section that types cannot express (run before anything starts)."""
    from pipeline.evaluate.finetune import check

    names = [(FEWSHOT, fs.name) for fs in eval_cfg.fewshot] + [(FINETUNE, ft.name) for ft in eval_cfg.finetune]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval: dataset names repeat within a protocol: {names}")
    for ft in eval_cfg.finetune:
        check(ft)


def evaluate_checkpoint(eval_cfg: DictConfig, ckpt_dir: str, tag: str, tracking_uri: str | None, parent_run_id: str | None,
                        spool_dir: str | None = None, source: str | None = None) -> dict:
    """Run every configured evaluation on one checkpoint; log child runs when tracking.

    ``source`` names the checkpoint dir in the records when ``ckpt_dir`` is a local copy of
    a remote one. Evaluations already recorded for this checkpoint are skipped.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    step = checkpoint.step_of(tag)
    parent = Tracker(tracking_uri, parent_run_id, spool_dir=spool_dir) if tracking_uri and parent_run_id else None
    done = _done_for(parent, tag) if parent else set()
    where = f"{(source or str(ckpt_dir)).rstrip('/')}/{tag}"
    results: dict = {"step": step, "tag": tag, "fewshot": {}, "finetune": {}, "skipped": sorted(done & wanted(eval_cfg))}
    todo_fs = [fs for fs in eval_cfg.fewshot if (FEWSHOT, fs.name) not in done]
    if todo_fs:
        model, _, meta = load_model(ckpt_dir, tag)
        model.to("cuda" if torch.cuda.is_available() else "cpu")  # an eval task given a GPU uses it
        for fs in todo_fs:
            results["fewshot"][fs.name] = _fewshot(model, meta, fs, parent, tag, step, where)
        del model
    for ft in eval_cfg.get("finetune", []):
        if (FINETUNE, ft.name) not in done:
            results["finetune"][ft.name] = _finetune(ft, ckpt_dir, parent, tag, step, where)
    if parent is not None and (todo_fs or results["finetune"]):
        try:
            _plot_transfer(parent, eval_cfg)
        except Exception as e:  # the server may be away; the next evaluation redraws it
            log.warning("transfer plot not refreshed: %s", e)
    if parent is not None:
        parent.close()
    return results


def _fewshot(model, meta: dict, fs: DictConfig, parent: Tracker | None, tag: str, step: int, where: str) -> dict:
    t0 = time.time()
    (train_x, train_y), (test_x, test_y) = fewshot_features(model, fs, meta["image_size"])
    res = ridge_fewshot(train_x, train_y, test_x, test_y, shots=tuple(fs.shots), seeds=fs.seeds, l2=fs.l2)
    seconds = time.time() - t0
    log.info("fewshot %s at %s: %s (%.1fs)", fs.name, tag, {k: round(v["mean"], 4) for k, v in res.items()}, seconds)
    if parent is None:
        return res
    k, cm = best_shot_confusion(res, train_x, train_y, test_x, test_y, l2=fs.l2)
    metrics = {"seconds": seconds}
    for shots, r in res.items():
        metrics[f"{shots}shot"] = r["mean"]
        metrics[f"{shots}shot_std"] = r["std"]
    params = {"shots": list(fs.shots), "seeds": fs.seeds, "l2": fs.l2, "train": fs.train, "test": fs.test,
              "train_samples": len(train_y), "test_samples": len(test_y), "feature_dim": train_x.shape[1]}
    _record(parent, FEWSHOT, fs, tag, step, where, params, metrics, {f"fewshot/{fs.name}/{s}shot": r["mean"] for s, r in res.items()},
            cm, f"{fs.name} {k}-shot (seed 0) at {tag}")
    return res


def _finetune(ft: DictConfig, ckpt_dir: str, parent: Tracker | None, tag: str, step: int, where: str) -> dict:
    from pipeline.evaluate.finetune import finetune_eval

    res = finetune_eval(ft, ckpt_dir, tag)
    if parent is None:
        return res
    metrics = {"top1": res["top1"], "best_lr": res["best_lr"], "seconds": res["seconds"]}
    metrics.update({f"dev_top1_lr_{lr:g}": acc for lr, acc in res["dev_top1"].items()})
    params = {k: v for k, v in OmegaConf.to_container(ft).items() if k not in ("name",)}
    params.update(num_classes=res["num_classes"], test_samples=res["test_samples"])
    child = _record(parent, FINETUNE, ft, tag, step, where, params, metrics, {f"finetune/{ft.name}/top1": res["top1"]},
                    res["confusion"], f"{ft.name} fine-tuned at lr {res['best_lr']:g} from {tag}", finish=False)
    for label, curve in res["curves"].items():
        for s, loss in curve:  # per-run loss curves on the child, x = fine-tuning step
            child.log_metrics({f"train_loss/{label}": loss}, s)
    child.finish()
    return res


def _record(parent: Tracker, protocol: str, node: DictConfig, tag: str, step: int, where: str, params: dict, metrics: dict,
            parent_metrics: dict, cm: np.ndarray, title: str, finish: bool = True) -> Tracker:
    """The child run of one (checkpoint, dataset) evaluation, and the parent's step metrics.

    The child is marked FINISHED last: an evaluation interrupted before that is run again.
    """
    child = parent.child(
        f"{protocol.split('_')[0]}-{node.name}-{tag}",
        {CHECKPOINT_TAG: tag, "eval.checkpoint_step": step, "eval.checkpoint_path": where,
         "eval.dataset": node.name, "eval.protocol": protocol},
    )
    child.log_params(params)
    child.log_metrics(metrics, step)
    child.log_text(OmegaConf.to_yaml(node, resolve=True), "eval_config.yaml")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "confusion_matrix.png"
        plot_confusion(cm, title, str(path))
        child.log_artifact(str(path))
    parent.log_metrics(parent_metrics, step)
    if finish:
        child.finish()
    return child


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
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title}\ntop-1 {acc:.3f}", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_transfer(parent: Tracker, eval_cfg: DictConfig) -> None:
    """PNG of transfer accuracy against pre-training step, refreshed after every eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [(f"fewshot/{fs.name}/{k}shot", f"{fs.name} {k}-shot", "o") for fs in eval_cfg.fewshot for k in fs.shots]
    series += [(f"finetune/{ft.name}/top1", f"{ft.name} fine-tuned", "s") for ft in eval_cfg.get("finetune", [])]
    for key, label, marker in series:
        hist = sorted(parent.metric_history(key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], marker=marker, label=label)
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fewshot_vs_step.png"
        fig.savefig(path, dpi=100)
        parent.log_artifact(str(path), "transfer")
    plt.close(fig)
