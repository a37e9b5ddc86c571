"""Fine-tuning transfer of one checkpoint (paper B.1.1), on a one-rank DeepSpeed engine.

The pre-training head and pre-logits are dropped for a zero-initialised linear head; the
model is built at the fine-tuning resolution with its position embeddings resized by 2-D
interpolation of the patch grid (class token kept apart). Training: SGD with momentum, no
weight decay, linear warmup then cosine decay to 0, gradient clipping at global norm 1,
inception crop and flip. The lr is picked from a grid on a dev part carved from the train
split (a fixed hash of each sample key, so the carve is the same for every checkpoint);
then, as in the paper, one run on the whole train split at that lr gives the test top-1.

The engine, its schedule, the loss and the data loop are pre-training's (``pipeline.engine``,
``pipeline.data.TrainStream``); only the optimizer (SGD) and the lr sweep are fine-tuning's
own. Inside an eval task it runs on its own single-rank process group (gloo on CPU).

The images a split stores must be at least the fine-tuning resolution: a split that data_prep
shrank below it (e.g. shorter side 256 for a 384 px fine-tune) would upsample every crop, so
that is refused before any training (:func:`check_stored_size`). Images whose originals are
smaller (CIFAR's 32 px) are upsampled as in the paper.
"""

from __future__ import annotations

import copy
import functools
import gc
import itertools
import json
import logging
import time
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline import checkpoint
from pipeline.data import (
    ShardIndex,
    StreamSpec,
    TrainStream,
    iter_eval_batches,
    iter_tar_samples,
    to_model_input,
)
from pipeline.engine import (
    DTYPES,
    dist_setup,
    ds_config,
    initialize,
    loss_fn,
    micro_step,
    warmup_decay,
)
from pipeline.evaluate.fewshot import confusion_matrix
from pipeline.model import (
    VisionTransformer,
    from_config,
    get_spec,
    resize_pos_embed,
)

if TYPE_CHECKING:
    from pipeline.evaluate.runner import Result

log = logging.getLogger(__name__)


def load_for_finetune(
    ckpt_dir: str | None,
    tag: str | None,
    num_classes: int,
    image_size: int,
    interpolation: str = "bilinear",
    dropout: float = 0.0,
    init: str | None = None,
    variant: str = "raw",
    heads: int | None = None,
) -> VisionTransformer:
    """A complete checkpoint's model at ``image_size`` with a new zero-init ``num_classes`` head.

    The consolidated fp32 weights are loaded strictly, position embeddings interpolated to
    the new patch grid (``interpolation``); then the pre-training head and pre-logits are
    replaced. ``init`` names published weights (``pipeline.weights``; ``heads`` where the file
    does not record them) to start from instead; ``variant`` ``ema`` starts from the
    checkpoint's EMA weights.
    """
    if init:
        from pipeline.weights import load_pretrained

        model = load_pretrained(init, img_size=image_size, interpolation=interpolation, dropout=dropout, heads=heads)
        model.reset_head(num_classes)
        return model
    tag_dir = Path(ckpt_dir) / tag
    cfg, meta = checkpoint.saved_config(tag_dir)
    patch = get_spec(cfg.model.name, patch_size=cfg.model.patch_size).patch_size
    if image_size % patch:
        raise ValueError(
            f"fine-tuning image_size {image_size} is not a multiple of the patch size {patch} of {tag_dir}"
        )
    model = from_config(cfg.model, meta["num_classes"], img_size=image_size, dropout=dropout)
    state = checkpoint.load_fp32_weights(ckpt_dir, tag, variant)
    state["pos_embed"] = resize_pos_embed(
        state["pos_embed"], image_size // patch, model.num_prefix_tokens, interpolation
    )
    model.load_state_dict(state)
    model.reset_head(num_classes)
    return model


def in_dev(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether sample ``key`` belongs to the dev part carved from the train split."""
    return fraction > 0 and zlib.crc32(f"{seed}/{key}".encode()) / 2**32 < fraction


def eval_batches(
    index_url: str, image_size: int, batch_size: int, crop_ratio: float, dev_fraction: float = 0.0, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of a split (only its dev part when ``dev_fraction`` > 0), in index order, uint8 NHWC."""
    keep = (lambda key: in_dev(key, dev_fraction, seed)) if dev_fraction > 0 else None
    return iter_eval_batches(index_url, image_size, batch_size, crop_ratio, keep=keep, raw=True)


@torch.no_grad()
def predict(model: torch.nn.Module, batches, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Argmax predictions and labels over ``(uint8 NHWC, labels)`` batches, in eval mode."""
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for images, y in batches:
        logits = model(to_model_input(images.to(device), dtype))
        preds.append(logits.float().argmax(-1).cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(preds), np.concatenate(labels)


def build_engine(model: torch.nn.Module, ft: DictConfig, lr: float):
    """SGD (momentum, no weight decay) and the warmup-cosine schedule to 0 in a one-rank
    DeepSpeed engine, built as pre-training builds its own (``pipeline.engine``)."""
    micro = ft.micro_batch_size or ft.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=ft.momentum, weight_decay=0.0)
    # SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it partitions like any other.
    config = ds_config(ft.batch_size, micro, 1, ft.grad_clip, ft.precision, {"stage": ft.zero_stage})
    if ft.zero_stage:
        config["zero_allow_untested_optimizer"] = True
    engine, _ = initialize(
        model, optimizer, lambda s: warmup_decay(s, ft.warmup_steps, ft.steps, "cosine", 0.0), config
    )
    return engine


def train_run(
    model: torch.nn.Module,
    ft: DictConfig,
    lr: float,
    dev_fraction: float,
    device: torch.device,
    label: str,
    num_classes: int,
    ema_out: dict | None = None,
) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Fine-tune ``model`` for ``ft.steps`` at ``lr`` on the train split less its dev part,
    read by pre-training's stream (``pipeline.data.TrainStream``: block shuffle, inception
    crop, flip); the trained module and (step, mean loss) points.

    With ``ft.ema_decay`` and an ``ema_out`` dict, the fine-tuned weights' EMA (pipeline.ema,
    as in pre-training) is left in ``ema_out["weights"]``."""
    from pipeline.ema import EMA

    engine = build_engine(model, ft, lr)
    ema = EMA(engine.module, ft.ema_decay, optimizer=engine.optimizer) if ft.ema_decay and ema_out is not None else None
    micro = ft.micro_batch_size or ft.batch_size
    spec = StreamSpec(
        index_url=ft.train,
        rank=0,
        world_size=1,
        num_workers=ft.num_workers,
        batch_size=micro,
        image_size=ft.image_size,
        num_classes=num_classes,
        seed=ft.seed,
        shuffle_block=max(1, ft.shuffle_buffer),
        crop_area=(ft.crop_min_area, 1.0),
        flip=ft.flip,
        skip_key=functools.partial(in_dev, fraction=dev_fraction, seed=ft.seed) if dev_fraction > 0 else None,
    )
    stream = TrainStream(spec)
    loss_of = functools.partial(loss_fn, kind="softmax")
    dtype = DTYPES[ft.precision]
    every = max(1, ft.steps // 100)
    curve, window, t0 = [], [], time.time()
    engine.train()
    while engine.global_steps < ft.steps:
        before = engine.global_steps
        window.append(micro_step(engine, next(stream), loss_of, dtype, device).item())
        step = engine.global_steps
        if ema is not None and step != before:
            ema.step(step)
        if step != before and (step % every == 0 or step == ft.steps):
            mean = float(np.mean(window))
            curve.append((step, mean))
            log.info(
                "finetune %s %s step %d/%d loss %.4f lr %.2e images/s %.1f",
                ft.name,
                label,
                step,
                ft.steps,
                mean,
                engine.get_lr()[0],
                len(window) * micro / (time.time() - t0),
            )
            window, t0 = [], time.time()
    del stream
    if ema is not None:
        ema_out["weights"] = ema.full_state_dict()
    module = engine.module
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    gc.collect()
    return module, curve


def finetune_eval(
    ft: DictConfig,
    ckpt_dir: str | None,
    tag: str | None,
    init: str | None = None,
    variant: str = "raw",
    heads: int | None = None,
) -> dict:
    """Fine-tune one checkpoint (its ``variant`` weights: ``raw`` or ``ema``; or published
    weights ``init`` with ``heads`` where the file does not record them) on one dataset: lr
    picked on dev, top-1 on the test split.

    Returns ``{"top1", "best_lr", "dev_top1": {lr: acc}, "curves": {label: [(step, loss)]},
    "confusion", "num_classes", "test_samples", "seconds"}``, plus ``top1_ema`` (the test top-1
    of the final run's EMA weights) when ``ft.ema_decay`` > 0.
    """
    t_start = time.time()
    check(ft)
    for split in (ft.train, ft.test):
        check_stored_size(split, ft.image_size, f"eval.finetune[{ft.name}]")
    _, _, device = dist_setup(standalone=True)
    num_classes = ft.num_classes or ShardIndex.load(ft.train).num_classes
    base = load_for_finetune(
        ckpt_dir, tag, num_classes, ft.image_size, ft.pos_embed_interpolation, ft.dropout, init, variant, heads
    )
    lrs = [float(x) for x in ft.lrs]
    dev_top1, curves, kept = {}, {}, None
    if len(lrs) > 1 and ft.dev_fraction > 0:
        for lr in lrs:
            module, curves[f"lr_{lr:g}"] = train_run(
                copy.deepcopy(base).to(device), ft, lr, ft.dev_fraction, device, f"lr {lr:g}", num_classes
            )
            pred, y = predict(
                module,
                eval_batches(ft.train, ft.image_size, ft.eval_batch_size, ft.crop_ratio, ft.dev_fraction, ft.seed),
                device,
            )
            dev_top1[lr] = float(np.mean(pred == y)) if len(y) else 0.0
            log.info("finetune %s at %s: lr %g dev top-1 %.4f (%d dev images)", ft.name, tag, lr, dev_top1[lr], len(y))
            if not ft.final_on_full_train and dev_top1[lr] == max(dev_top1.values()):
                kept = module
            del module
    best = max(dev_top1, key=dev_top1.get) if dev_top1 else lrs[0]
    ema: dict = {}
    if kept is None or ft.ema_decay:  # the final run is where the EMA is kept
        kept, curves["final"] = train_run(
            copy.deepcopy(base).to(device), ft, best, 0.0, device, f"final lr {best:g}", num_classes, ema
        )
    pred, y = predict(kept, eval_batches(ft.test, ft.image_size, ft.eval_batch_size, ft.crop_ratio), device)
    top1 = float(np.mean(pred == y)) if len(y) else 0.0
    extra = {}
    if ema:
        kept.load_state_dict({k: v.to(kept.state_dict()[k].dtype) for k, v in ema["weights"].items()})
        pred_ema, _ = predict(kept, eval_batches(ft.test, ft.image_size, ft.eval_batch_size, ft.crop_ratio), device)
        extra["top1_ema"] = float(np.mean(pred_ema == y)) if len(y) else 0.0
        log.info("finetune %s at %s: EMA (decay %g) test top-1 %.4f", ft.name, tag, ft.ema_decay, extra["top1_ema"])
    log.info("finetune %s at %s: test top-1 %.4f at lr %g (%.0fs)", ft.name, tag, top1, best, time.time() - t_start)
    return {
        "top1": top1,
        "best_lr": best,
        "dev_top1": dev_top1,
        "curves": curves,
        "num_classes": num_classes,
        "confusion": confusion_matrix(y, pred, num_classes),
        "test_samples": int(len(y)),
        "seconds": time.time() - t_start,
        **extra,
    }


PROTOCOL = "finetune"


def evaluate(ft: DictConfig, weights) -> Result:
    """The evaluator (``eval.finetune``): :func:`finetune_eval` of ``weights``
    (``pipeline.evaluate.runner.Weights``: a checkpoint's raw or EMA weights, or published weights)."""
    from pipeline.evaluate.record import metric_prefix
    from pipeline.evaluate.runner import Result

    res = finetune_eval(
        ft, weights.ckpt_dir, weights.tag, init=weights.init, variant=weights.variant, heads=weights.heads
    )
    metrics = {"top1": res["top1"], "best_lr": res["best_lr"], "seconds": res["seconds"]}
    prefix = metric_prefix("finetune", ft.name, weights.variant)
    step_metrics = {f"{prefix}/top1": res["top1"]}
    if "top1_ema" in res:  # the fine-tuned weights' own EMA
        metrics["top1_ema"] = step_metrics[f"{prefix}/top1_ema"] = res["top1_ema"]
    metrics.update({f"dev_top1_lr_{lr:g}": acc for lr, acc in res["dev_top1"].items()})
    params = {k: v for k, v in OmegaConf.to_container(ft).items() if k != "name"}
    params.update(num_classes=res["num_classes"], test_samples=res["test_samples"])
    return Result(
        metrics,
        params,
        step_metrics,
        res["confusion"],
        f"{ft.name} fine-tuned at lr {res['best_lr']:g} from {weights.label}",
        curves={label: [[int(s), float(v)] for s, v in curve] for label, curve in res["curves"].items()},
        summary=res,
    )


def check(ft: DictConfig) -> None:
    """Values types cannot rule out; each failure names the key."""
    key = f"eval.finetune[{ft.name}]"
    micro = ft.micro_batch_size or ft.batch_size
    problems = [
        (ft.steps > 0, "steps must be positive"),
        (0 <= ft.warmup_steps, "warmup_steps must be >= 0"),
        (len(ft.lrs) > 0 and all(lr > 0 for lr in ft.lrs), f"lrs must be positive values, got {list(ft.lrs)}"),
        (
            ft.batch_size > 0 and ft.batch_size % micro == 0,
            f"batch_size {ft.batch_size} is not a multiple of micro_batch_size {micro}",
        ),
        (0 <= ft.dev_fraction < 1, f"dev_fraction must be in [0, 1), got {ft.dev_fraction}"),
        (ft.precision != "fp16", "precision must be bf16 or fp32 (fp16 needs a loss scale fine-tuning does not keep)"),
        (ft.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {ft.zero_stage}"),
        (0 < ft.crop_min_area <= 1, f"crop_min_area must be in (0, 1], got {ft.crop_min_area}"),
        (ft.image_size > 0, "image_size must be positive"),
        (0 <= ft.dropout < 1, f"dropout must be in [0, 1), got {ft.dropout}"),
    ]
    for ok, message in problems:
        if not ok:
            from pipeline.config import ConfigError

            raise ConfigError(f"{key}: {message}")


def check_stored_size(index_url: str, image_size: int, key: str, samples: int = 64) -> None:
    """Refuse a split whose images data_prep shrank below ``image_size``.

    Reads the first ``samples`` samples of the first shard: the stored JPEG's size (its
    header) against the original size data_prep recorded in the sample's ``.json``. A sample
    stored with a shorter side under ``image_size`` while its original was larger means the
    split was prepared for a lower resolution: every fine-tuning crop would be upsampled.
    Without a recorded original size, a small stored image is only warned about.
    """
    url = ShardIndex.load(index_url).shards[0][0]
    shrunk, unknown, seen = [], [], 0
    for sample in itertools.islice(iter_tar_samples(url), samples):
        if "jpg" not in sample:
            continue
        seen += 1
        with Image.open(BytesIO(sample["jpg"])) as img:
            stored = min(img.size)
        if stored >= image_size:
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if "width" in meta and "height" in meta:
            if min(meta["width"], meta["height"]) > stored:
                shrunk.append((sample["__key__"], stored, min(meta["width"], meta["height"])))
        else:
            unknown.append((sample["__key__"], stored))
    if shrunk:
        from pipeline.config import ConfigError

        k, stored, original = shrunk[0]
        raise ConfigError(
            f"{key}: {index_url} stores images shrunk below the fine-tuning resolution {image_size} "
            f"({len(shrunk)} of the first {seen} samples; e.g. {k}: shorter side {stored}, originally {original}); "
            f"every crop would be upsampled. Prepare the split again with image.size >= {image_size} "
            "(or image.resize_mode=none) in its data_prep config"
        )
    if unknown:
        log.warning(
            "%s: %s has %d of the first %d images with a shorter side under the fine-tuning resolution %d "
            "(e.g. %s: %d px) and no recorded original size: if data_prep shrank them, prepare the split "
            "again at >= %d px",
            key,
            index_url,
            len(unknown),
            seen,
            image_size,
            unknown[0][0],
            unknown[0][1],
            image_size,
        )
