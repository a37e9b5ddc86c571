"""Evaluate one finished checkpoint: every configured evaluator (few-shot linear probes,
fine-tuning) by name from the eval config, each result kept as a record in the run dir (the
fact that it was evaluated, readable with MLflow down) and shown in MLflow by
``pipeline.evaluate.record``. An evaluation with a record is not run again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint
from pipeline.config import ConfigError, from_container
from pipeline.data import iter_eval_batches
from pipeline.evaluate.fewshot import best_shot_confusion, extract_features, ridge_fewshot
from pipeline.evaluate.record import FEWSHOT, FINETUNE, eval_name, metric_prefix, publish, record_of
from pipeline.model import create_model
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)



def load_model(ckpt_dir: str, tag: str, variant: str = "raw") -> tuple[torch.nn.Module, DictConfig, dict]:
    """The model of a complete checkpoint with consolidated fp32 weights (``variant`` ``ema``:
    its EMA weights), in eval mode."""
    tag_dir = Path(ckpt_dir) / tag
    cfg = from_container(OmegaConf.to_container(OmegaConf.load(tag_dir / "config.yaml")))
    meta = json.loads((tag_dir / "meta.json").read_text())
    model = create_model(
        cfg.model.name, num_classes=meta["num_classes"], img_size=cfg.model.img_size, patch_size=cfg.model.patch_size,
        pool=cfg.model.pool, representation_size=cfg.model.representation_size,
    )
    model.load_state_dict(checkpoint.load_fp32_weights(ckpt_dir, tag, variant))
    return model.eval(), cfg, meta


def fewshot_features(model, fs, image_size: int):
    train = extract_features(model, iter_eval_batches(fs.train, image_size, fs.batch_size, fs.crop_ratio))
    test = extract_features(model, iter_eval_batches(fs.test, image_size, fs.batch_size, fs.crop_ratio))
    return train, test


def wanted(eval_cfg: DictConfig) -> list[tuple[str, str]]:
    """The (protocol, dataset) pairs every checkpoint gets."""
    return [(FEWSHOT, fs.name) for fs in eval_cfg.fewshot] + [(FINETUNE, ft.name) for ft in eval_cfg.get("finetune", [])]


def evaluated(run: RunDir, eval_cfg: DictConfig) -> set[str]:
    """Tags of the checkpoints with a record of every configured evaluation of every weights
    variant they hold (the run's own records: readable with MLflow down)."""
    out = set()
    for tag, recs in run.eval_records().items():
        raw = {eval_name(p, d) for p, d in wanted(eval_cfg)}
        if raw <= set(recs) and (not _has_ema(run, tag) or {eval_name(p, d, "ema") for p, d in wanted(eval_cfg)} <= set(recs)):
            out.add(tag)
    return out


def _has_ema(run: RunDir, tag: str) -> bool:
    return run.checkpoints.fs.exists(f"{run.checkpoints.root}/{tag}/{checkpoint.EMA_FILE}")


def validate_eval(eval_cfg: DictConfig) -> None:
    """Checks of the eval section that types cannot express (run before anything starts)."""
    from pipeline.evaluate.finetune import check

    names = [(FEWSHOT, fs.name) for fs in eval_cfg.fewshot] + [(FINETUNE, ft.name) for ft in eval_cfg.finetune]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval: dataset names repeat within a protocol: {names}")
    for ft in eval_cfg.finetune:
        check(ft)


def evaluate_checkpoint(eval_cfg: DictConfig, ckpt_dir: str, tag: str, run: RunDir, tracking_uri: str | None = None,
                        parent_run_id: str | None = None, source: str | None = None) -> dict:
    """Run every configured evaluation of one (local) checkpoint not yet recorded in ``run``,
    for each weights variant it holds (``raw``; ``ema`` when trained with an EMA); record each
    in the run dir, then show it in MLflow when tracking.

    ``source`` names the checkpoint dir in the records when ``ckpt_dir`` is a local copy.
    Results are ``{"fewshot": {dataset: ...}, "finetune": {...}}`` for the raw weights, and the
    same under ``"ema"`` for the EMA weights.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    step = checkpoint.step_of(tag)
    where = f"{(source or str(ckpt_dir)).rstrip('/')}/{tag}"
    recorded = run.eval_records().get(tag, {})
    variants = checkpoint.variants(Path(ckpt_dir) / tag)
    names = {eval_name(p, d, v) for p, d in wanted(eval_cfg) for v in variants}
    results: dict = {"step": step, "tag": tag, "fewshot": {}, "finetune": {}, "skipped": sorted(n for n in recorded if n in names)}
    for variant in variants:
        out = results if variant == "raw" else results.setdefault(variant, {"fewshot": {}, "finetune": {}})
        todo_fs = [fs for fs in eval_cfg.fewshot if eval_name(FEWSHOT, fs.name, variant) not in recorded]
        if todo_fs:
            model, _, meta = load_model(ckpt_dir, tag, variant)
            model.to("cuda" if torch.cuda.is_available() else "cpu")  # an eval task given a GPU uses it
            for fs in todo_fs:
                res, record = _fewshot(model, meta, fs, tag, step, where, variant)
                out["fewshot"][fs.name] = res
                _keep(run, tag, record, tracking_uri, parent_run_id)
            del model
        for ft in eval_cfg.get("finetune", []):
            if eval_name(FINETUNE, ft.name, variant) not in recorded:
                res, record = _finetune(ft, ckpt_dir, tag, step, where, variant)
                out["finetune"][ft.name] = res
                _keep(run, tag, record, tracking_uri, parent_run_id)
    return results


def _keep(run: RunDir, tag: str, record: dict, uri: str | None, parent_run_id: str | None) -> None:
    name = eval_name(record["protocol"], record["dataset"], record.get("variant", "raw"))
    run.write_eval_record(tag, name, record)
    if uri and parent_run_id:
        publish(run, uri, parent_run_id, tag, name, run.eval_record(tag, name))


def _fewshot(model, meta: dict, fs: DictConfig, tag: str, step: int, where: str, variant: str = "raw") -> tuple[dict, dict]:
    t0 = time.time()
    (train_x, train_y), (test_x, test_y) = fewshot_features(model, fs, meta["image_size"])
    res = ridge_fewshot(train_x, train_y, test_x, test_y, shots=tuple(fs.shots), seeds=fs.seeds, l2=fs.l2)
    seconds = time.time() - t0
    log.info("fewshot %s at %s (%s weights): %s (%.1fs)", fs.name, tag, variant, {k: round(v["mean"], 4) for k, v in res.items()}, seconds)
    k, cm = best_shot_confusion(res, train_x, train_y, test_x, test_y, l2=fs.l2)
    metrics = {"seconds": seconds}
    for shots, r in res.items():
        metrics[f"{shots}shot"] = r["mean"]
        metrics[f"{shots}shot_std"] = r["std"]
    params = {"shots": list(fs.shots), "seeds": fs.seeds, "l2": fs.l2, "train": fs.train, "test": fs.test,
              "train_samples": len(train_y), "test_samples": len(test_y), "feature_dim": int(train_x.shape[1])}
    prefix = metric_prefix(FEWSHOT, fs.name, variant)
    record = record_of(FEWSHOT, fs.name, tag, step, where, params, metrics,
                       {f"{prefix}/{s}shot": r["mean"] for s, r in res.items()}, cm,
                       f"{fs.name} {k}-shot (seed 0) at {tag}{'' if variant == 'raw' else f' ({variant})'}",
                       config_yaml=OmegaConf.to_yaml(fs, resolve=True), variant=variant)
    return res, record


def _finetune(ft: DictConfig, ckpt_dir: str, tag: str, step: int, where: str, variant: str = "raw") -> tuple[dict, dict]:
    from pipeline.evaluate.finetune import finetune_eval

    res = finetune_eval(ft, ckpt_dir, tag, variant=variant)
    metrics = {"top1": res["top1"], "best_lr": res["best_lr"], "seconds": res["seconds"]}
    parent = {f"{metric_prefix(FINETUNE, ft.name, variant)}/top1": res["top1"]}
    if "top1_ema" in res:  # the fine-tuned weights' own EMA
        metrics["top1_ema"] = res["top1_ema"]
        parent[f"{metric_prefix(FINETUNE, ft.name, variant)}/top1_ema"] = res["top1_ema"]
    metrics.update({f"dev_top1_lr_{lr:g}": acc for lr, acc in res["dev_top1"].items()})
    params = {k: v for k, v in OmegaConf.to_container(ft).items() if k not in ("name",)}
    params.update(num_classes=res["num_classes"], test_samples=res["test_samples"])
    record = record_of(FINETUNE, ft.name, tag, step, where, params, metrics, parent,
                       res["confusion"], f"{ft.name} fine-tuned at lr {res['best_lr']:g} from {tag}"
                       + ("" if variant == "raw" else f" ({variant})"),
                       curves={label: [[int(s), float(v)] for s, v in curve] for label, curve in res["curves"].items()},
                       config_yaml=OmegaConf.to_yaml(ft, resolve=True), variant=variant)
    return res, record
