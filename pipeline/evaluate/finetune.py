"""Fine-tuning transfer of one checkpoint (paper B.1.1), on a one-rank DeepSpeed engine.

The pre-training head and pre-logits are dropped for a zero-initialised linear head; the
model is built at the fine-tuning resolution with its position embeddings resized by 2-D
interpolation of the patch grid (class token kept apart). Training: SGD with momentum, no
weight decay, linear warmup then cosine decay to 0, gradient clipping at global norm 1,
inception crop and flip. The lr is picked from a grid on a dev part carved from the train
split (a fixed hash of each sample key, so the carve is the same for every checkpoint);
then, as in the paper, one run on the whole train split at that lr gives the test top-1.

The engine is DeepSpeed's, as in pre-training (precision and ZeRO stage from the config);
inside an eval task it runs on its own single-rank process group (gloo on CPU).

The images a split stores must be at least the fine-tuning resolution: a split that data_prep
shrank below it (e.g. shorter side 256 for a 384 px fine-tune) would upsample every crop, so
that is refused before any training (:func:`check_stored_size`). Images whose originals are
smaller (CIFAR's 32 px) are upsampled as in the paper.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import logging
import math
import os
import random
import socket
import time
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline import checkpoint
from pipeline.config import from_container
from pipeline.data import (
    ShardIndex,
    decode_train,
    iter_eval_batches,
    iter_tar_samples,
    sample_labels,
    to_model_input,
)
from pipeline.evaluate.fewshot import confusion_matrix
from pipeline.model import (
    POS_EMBED_INTERPOLATIONS,
    VisionTransformer,
    create_model,
    get_spec,
    resize_pos_embed,
)

log = logging.getLogger(__name__)


def load_for_finetune(ckpt_dir: str | None, tag: str | None, num_classes: int, image_size: int,
                      interpolation: str = "bilinear", dropout: float = 0.0, init: str | None = None,
                      variant: str = "raw") -> VisionTransformer:
    """A complete checkpoint's model at ``image_size`` with a new zero-init ``num_classes`` head.

    The consolidated fp32 weights are loaded strictly, position embeddings interpolated to
    the new patch grid (``interpolation``); then the pre-training head and pre-logits are
    replaced. ``init`` names published weights (``pipeline.weights``) to start from instead;
    ``variant`` ``ema`` starts from the checkpoint's EMA weights.
    """
    if init:
        from pipeline.weights import load_pretrained

        model = load_pretrained(init, img_size=image_size, interpolation=interpolation, dropout=dropout)
        model.reset_head(num_classes)
        return model
    tag_dir = Path(ckpt_dir) / tag
    cfg = from_container(OmegaConf.to_container(OmegaConf.load(tag_dir / "config.yaml")))
    meta = json.loads((tag_dir / "meta.json").read_text())
    patch = get_spec(cfg.model.name, patch_size=cfg.model.patch_size).patch_size
    if image_size % patch:
        raise ValueError(f"fine-tuning image_size {image_size} is not a multiple of the patch size {patch} of {tag_dir}")
    model = create_model(
        cfg.model.name, num_classes=meta["num_classes"], img_size=image_size, patch_size=cfg.model.patch_size,
        pool=cfg.model.pool, representation_size=cfg.model.representation_size, dropout=dropout,
    )
    state = checkpoint.load_fp32_weights(ckpt_dir, tag, variant)
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], image_size // patch, model.num_prefix_tokens, interpolation)
    model.load_state_dict(state)
    model.reset_head(num_classes)
    return model


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def in_dev(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether sample ``key`` belongs to the dev part carved from the train split."""
    return fraction > 0 and zlib.crc32(f"{seed}/{key}".encode()) / 2**32 < fraction


class TrainBatches(torch.utils.data.IterableDataset):
    """Endless shuffled micro-batches ``(uint8 NHWC, labels)`` of a train split.

    ``dev_fraction`` > 0 leaves the dev part out. Shards are permuted per pass; encoded
    samples go through a shuffle buffer and are decoded (inception crop, flip) after it.
    Dataloader workers take every n-th sample of the pass.
    """

    def __init__(self, index_url: str, image_size: int, batch_size: int, dev_fraction: float, seed: int,
                 crop_area: tuple[float, float], flip: bool, shuffle_buffer: int):
        self.index_url, self.image_size, self.batch_size = index_url, image_size, batch_size
        self.dev_fraction, self.seed, self.crop_area, self.flip = dev_fraction, seed, crop_area, flip
        self.shuffle_buffer = max(1, shuffle_buffer)

    def _samples(self, worker: int, workers: int) -> Iterator[dict]:
        index = ShardIndex.load(self.index_url)
        for pass_idx in itertools.count():
            shards = list(index.shards)
            random.Random(self.seed * 7919 + pass_idx).shuffle(shards)
            n = 0
            for url, _ in shards:
                for sample in iter_tar_samples(url):
                    if in_dev(sample["__key__"], self.dev_fraction, self.seed):
                        continue
                    n += 1
                    if n % workers == worker:
                        yield sample
            if n == 0:
                raise ValueError(f"{self.index_url}: no training samples left after carving a dev part of {self.dev_fraction}")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed * 1000 + worker)
        buffer: list[dict] = []
        images, labels = [], []
        for sample in self._samples(worker, workers):
            buffer.append(sample)
            if len(buffer) < self.shuffle_buffer:
                continue
            pick = buffer.pop(rng.randrange(len(buffer)))
            try:
                images.append(decode_train(pick["jpg"], self.image_size, rng, self.crop_area, self.flip))
                labels.append(sample_labels(pick)[0])
            except Exception as e:  # a corrupt sample must not end the evaluation
                log.warning("skipping sample %s of %s (%s)", pick.get("__key__"), pick.get("__url__"), e)
                continue
            if len(images) == self.batch_size:
                yield torch.from_numpy(np.stack(images)), torch.tensor(labels)
                images, labels = [], []


def eval_batches(index_url: str, image_size: int, batch_size: int, crop_ratio: float,
                 dev_fraction: float = 0.0, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


def init_single_rank() -> torch.device:
    """A one-rank process group for DeepSpeed (gloo on CPU) unless one exists; the device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"fine-tuning evaluation runs on one rank; this process is in a group of {dist.get_world_size()}")
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False, verbose=False)
    if accel.device_name() == "cuda":
        accel.set_device(0)
        return torch.device("cuda", 0)
    return torch.device(accel.device_name())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(model: torch.nn.Module, ft: DictConfig, lr: float):
    """SGD (momentum, no weight decay) and warmup-cosine schedule in a DeepSpeed engine."""
    import deepspeed

    micro = ft.micro_batch_size or ft.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=ft.momentum, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, ft.warmup_steps, ft.steps))
    config = {
        "train_batch_size": ft.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ft.batch_size // micro,
        "gradient_clipping": ft.grad_clip,
        "bf16": {"enabled": ft.precision == "bf16"},
        "steps_per_print": 10**9,
    }
    if ft.zero_stage:
        # SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it partitions like any other.
        config.update(zero_optimization={"stage": ft.zero_stage}, zero_allow_untested_optimizer=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def train_run(model: torch.nn.Module, ft: DictConfig, lr: float, dev_fraction: float, device: torch.device,
              label: str, ema_out: dict | None = None) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Fine-tune ``model`` for ``ft.steps`` at ``lr``; the trained module and (step, mean loss) points.

    With ``ft.ema_decay`` and an ``ema_out`` dict, the fine-tuned weights' EMA (pipeline.ema,
    as in pre-training) is left in ``ema_out["weights"]``."""
    from pipeline.ema import EMA

    engine = build_engine(model, ft, lr)
    ema = EMA(engine.module, ft.ema_decay, optimizer=engine.optimizer) if ft.ema_decay and ema_out is not None else None
    micro = ft.micro_batch_size or ft.batch_size
    dataset = TrainBatches(ft.train, ft.image_size, micro, dev_fraction, ft.seed, (ft.crop_min_area, 1.0), ft.flip,
                           ft.shuffle_buffer)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=ft.num_workers,
                                              prefetch_factor=2 if ft.num_workers else None))
    dtype = torch.bfloat16 if ft.precision == "bf16" else torch.float32
    every = max(1, ft.steps // 100)
    curve, window, t0 = [], [], time.time()
    engine.train()
    while engine.global_steps < ft.steps:
        before = engine.global_steps
        images, labels = next(loader)
        loss = F.cross_entropy(engine(to_model_input(images.to(device), dtype)).float(), labels.to(device))
        engine.backward(loss)
        engine.step()
        window.append(loss.item())
        step = engine.global_steps
        if ema is not None and step != before:
            ema.step(step)
        if step != before and (step % every == 0 or step == ft.steps):
            mean = float(np.mean(window))
            curve.append((step, mean))
            log.info("finetune %s %s step %d/%d loss %.4f lr %.2e images/s %.1f", ft.name, label, step, ft.steps, mean,
                     engine.get_lr()[0], len(window) * micro / (time.time() - t0))
            window, t0 = [], time.time()
    del loader
    if ema is not None:
        ema_out["weights"] = ema.full_state_dict()
    module = engine.module
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    gc.collect()
    return module, curve


def finetune_eval(ft: DictConfig, ckpt_dir: str | None, tag: str | None, init: str | None = None,
                  variant: str = "raw") -> dict:
    """Fine-tune one checkpoint (its ``variant`` weights: ``raw`` or ``ema``; or published
    weights ``init``) on one dataset: lr picked on dev, top-1 on the test split.

    Returns ``{"top1", "best_lr", "dev_top1": {lr: acc}, "curves": {label: [(step, loss)]},
    "confusion", "num_classes", "test_samples", "seconds"}``, plus ``top1_ema`` (the test top-1
    of the final run's EMA weights) when ``ft.ema_decay`` > 0.
    """
    t_start = time.time()
    check(ft)
    for split in (ft.train, ft.test):
        check_stored_size(split, ft.image_size, f"eval.finetune[{ft.name}]")
    device = init_single_rank()
    num_classes = ft.num_classes or ShardIndex.load(ft.train).num_classes
    base = load_for_finetune(ckpt_dir, tag, num_classes, ft.image_size, ft.pos_embed_interpolation, ft.dropout, init, variant)
    lrs = [float(x) for x in ft.lrs]
    dev_top1, curves, kept = {}, {}, None
    if len(lrs) > 1 and ft.dev_fraction > 0:
        for lr in lrs:
            module, curves[f"lr_{lr:g}"] = train_run(copy.deepcopy(base).to(device), ft, lr, ft.dev_fraction, device, f"lr {lr:g}")
            pred, y = predict(module, eval_batches(ft.train, ft.image_size, ft.eval_batch_size, ft.crop_ratio, ft.dev_fraction, ft.seed), device)
            dev_top1[lr] = float(np.mean(pred == y)) if len(y) else 0.0
            log.info("finetune %s at %s: lr %g dev top-1 %.4f (%d dev images)", ft.name, tag, lr, dev_top1[lr], len(y))
            if not ft.final_on_full_train and dev_top1[lr] == max(dev_top1.values()):
                kept = module
            del module
    best = max(dev_top1, key=dev_top1.get) if dev_top1 else lrs[0]
    ema: dict = {}
    if kept is None or ft.ema_decay:  # the final run is where the EMA is kept
        kept, curves["final"] = train_run(copy.deepcopy(base).to(device), ft, best, 0.0, device, f"final lr {best:g}", ema)
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
        "top1": top1, "best_lr": best, "dev_top1": dev_top1, "curves": curves, "num_classes": num_classes,
        "confusion": confusion_matrix(y, pred, num_classes), "test_samples": int(len(y)),
        "seconds": time.time() - t_start, **extra,
    }


def check(ft: DictConfig) -> None:
    """Values types cannot rule out; each failure names the key."""
    key = f"eval.finetune[{ft.name}]"
    micro = ft.micro_batch_size or ft.batch_size
    problems = [
        (ft.steps > 0, "steps must be positive"),
        (0 <= ft.warmup_steps, "warmup_steps must be >= 0"),
        (len(ft.lrs) > 0 and all(lr > 0 for lr in ft.lrs), f"lrs must be positive values, got {list(ft.lrs)}"),
        (ft.batch_size > 0 and ft.batch_size % micro == 0, f"batch_size {ft.batch_size} is not a multiple of micro_batch_size {micro}"),
        (0 <= ft.dev_fraction < 1, f"dev_fraction must be in [0, 1), got {ft.dev_fraction}"),
        (ft.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {ft.precision!r}"),
        (ft.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {ft.zero_stage}"),
        (0 < ft.crop_min_area <= 1, f"crop_min_area must be in (0, 1], got {ft.crop_min_area}"),
        (ft.image_size > 0, "image_size must be positive"),
        (0 <= ft.dropout < 1, f"dropout must be in [0, 1), got {ft.dropout}"),
        (ft.pos_embed_interpolation in POS_EMBED_INTERPOLATIONS,
         f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got {ft.pos_embed_interpolation!r}"),
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
            "(or image.resize_mode=none) in its data_prep config")
    if unknown:
        log.warning("%s: %s has %d of the first %d images with a shorter side under the fine-tuning resolution %d "
                    "(e.g. %s: %d px) and no recorded original size: if data_prep shrank them, prepare the split "
                    "again at >= %d px", key, index_url, len(unknown), seen, image_size, unknown[0][0], unknown[0][1],
                    image_size)
