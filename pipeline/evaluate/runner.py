"""Evaluate one finished checkpoint and record it in MLflow.

Each (checkpoint, evaluation) becomes a child run of the pre-training run, tagged with the
checkpoint's step and path, the dataset and the protocol; the headline numbers also go to
the parent as step metrics (``fewshot/<dataset>/<k>shot`` at the checkpoint's step) so the
UI charts transfer against pre-training steps.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint
from pipeline.config import from_container
from pipeline.data import iter_eval_batches
from pipeline.evaluate.fewshot import extract_features, ridge_fewshot
from pipeline.model import create_model
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "eval.checkpoint_tag"


def load_model(ckpt_dir: str, tag: str) -> tuple[torch.nn.Module, DictConfig, dict]:
    """The model of a complete checkpoint with consolidated fp32 weights, in eval mode."""
    import json

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


def evaluate_checkpoint(eval_cfg: DictConfig, ckpt_dir: str, tag: str, tracking_uri: str | None, parent_run_id: str | None) -> dict:
    """Run every configured evaluation on one checkpoint; log child runs when tracking."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _, meta = load_model(ckpt_dir, tag)
    step = checkpoint.step_of(tag)
    parent = Tracker(tracking_uri, parent_run_id) if tracking_uri and parent_run_id else None
    results: dict = {"step": step, "tag": tag, "fewshot": {}}
    for fs in eval_cfg.fewshot:
        t0 = time.time()
        (train_x, train_y), (test_x, test_y) = fewshot_features(model, fs, meta["image_size"])
        res = ridge_fewshot(train_x, train_y, test_x, test_y, shots=tuple(fs.shots), seeds=fs.seeds, l2=fs.l2)
        seconds = time.time() - t0
        results["fewshot"][fs.name] = res
        log.info("fewshot %s at %s: %s (%.1fs)", fs.name, tag, {k: round(v["mean"], 4) for k, v in res.items()}, seconds)
        if parent is None:
            continue
        child = parent.child(
            f"fewshot-{fs.name}-{tag}",
            {CHECKPOINT_TAG: tag, "eval.checkpoint_step": step, "eval.checkpoint_path": str(Path(ckpt_dir) / tag),
             "eval.dataset": fs.name, "eval.protocol": "fewshot_linear"},
        )
        child.log_params({"shots": list(fs.shots), "seeds": fs.seeds, "l2": fs.l2, "train": fs.train, "test": fs.test,
                          "train_samples": len(train_y), "test_samples": len(test_y), "feature_dim": train_x.shape[1]})
        metrics = {}
        for k, r in res.items():
            metrics[f"{k}shot"] = r["mean"]
            metrics[f"{k}shot_std"] = r["std"]
        metrics["seconds"] = seconds
        child.log_metrics(metrics, step)
        child.finish()
        parent.log_metrics({f"fewshot/{fs.name}/{k}shot": r["mean"] for k, r in res.items()}, step)
    if parent is not None:
        _plot_transfer(parent, eval_cfg)
    return results


def _plot_transfer(parent: Tracker, eval_cfg: DictConfig) -> None:
    """PNG of few-shot accuracy against pre-training step, refreshed after every eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fs in eval_cfg.fewshot:
        for k in fs.shots:
            hist = sorted(parent.metric_history(f"fewshot/{fs.name}/{k}shot"), key=lambda m: m.step)
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=f"{fs.name} {k}-shot")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("few-shot top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fewshot_vs_step.png"
        fig.savefig(path, dpi=100)
        parent.log_artifact(str(path), "transfer")
    plt.close(fig)
