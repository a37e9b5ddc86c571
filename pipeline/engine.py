"""The training engine both pre-training and fine-tuning are built from.

The process group (:func:`dist_setup`), the DeepSpeed config (:func:`ds_config`), the
warmup-then-decay schedule (:func:`warmup_decay`), the engine with its schedule
(:func:`initialize`), the loss (:func:`loss_fn`) and one micro-step (:func:`micro_step`). Pre-training
(``pipeline.recipe``, ``pipeline.trainer``) adds AdamW/ZeRO options, checkpoints and tracking; fine-tuning
(``pipeline.evaluate.finetune``) adds SGD and its lr sweep. Both read their batches from
``pipeline.data.TrainStream``.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.data import to_model_input
from pipeline.ds_ops import import_deepspeed, own_extensions_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dist_setup(standalone: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, joining the process group its launcher
    describes (torchrun, the deepspeed launcher, Ray Train set the env). ``standalone`` makes a
    one-rank group on a free local port when there is none (an evaluation task); there, a
    group of more than one rank is an error."""
    own_extensions_dir()
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if dist.is_initialized():
        if standalone and dist.get_world_size() != 1:
            raise RuntimeError(f"this runs on one rank; the process is in a group of {dist.get_world_size()}")
        if standalone:  # the group outlived its env (DeepSpeed's engine reads LOCAL_RANK)
            for key in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(key, "0")
            for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                os.environ.setdefault(key, "1")
    elif standalone:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        deepspeed.init_distributed(
            dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False, verbose=False
        )
    else:
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    return dist.get_rank(), dist.get_world_size(), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warmup_decay(step: int, warmup: int, total: int, schedule: str = "cosine", end: float = 0.0) -> float:
    """The lr multiplier at ``step``: linear warmup from 1/warmup to 1 over ``warmup`` steps,
    then linear or cosine decay to ``end`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0 + (end - 1.0) * frac


def ds_config(
    global_batch: int,
    micro_batch: int,
    world: int,
    grad_clip: float,
    precision: str,
    zero: dict | None = None,
    fp16: dict | None = None,
) -> dict:
    """A DeepSpeed config: batch split, clipping, precision and ZeRO (``zero``: the
    ``zero_optimization`` section, None or stage 0 for none)."""
    if global_batch <= 0 or global_batch % (micro_batch * world):
        raise ValueError(f"batch {global_batch} is not a multiple of micro batch x world = {micro_batch} x {world}")
    out = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * world),
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", **(fp16 or {})},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero and zero.get("stage", 0):
        out["zero_optimization"] = dict(zero)
    return out


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_factor: Callable[[int], float], config: dict
):
    """``model`` and ``optimizer`` in a DeepSpeed engine, the lr scaled by ``lr_factor(step)``;
    (engine, scheduler)."""
    import deepspeed

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, scheduler


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid cross-entropy summed over classes (the paper's), or softmax cross-entropy.

    ``label_smoothing`` e mixes the targets with the uniform e/K over the K classes (optax's
    ``smooth_labels``): softmax targets become (1-e) y/|y| + e/K, each sigmoid target (1-e) y + e/K.
    """
    logits = logits.float()
    if label_smoothing:
        k = logits.shape[-1]
        if kind == "sigmoid":
            targets = targets * (1 - label_smoothing) + label_smoothing / k
        else:
            targets = targets / targets.sum(-1, keepdim=True) * (1 - label_smoothing) + label_smoothing / k
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    return -(targets / targets.sum(-1, keepdim=True) * F.log_softmax(logits, -1)).sum(-1).mean()


def forward_loss(
    engine,
    batch: dict,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    mixup_lam: float | None = None,
) -> torch.Tensor:
    """The loss of one ``pipeline.data`` batch, its images and targets mixed by ``mixup_lam``
    when given (``pipeline.augment.mixup``); backward it with ``engine.backward``."""
    targets = batch["targets"].to(device, non_blocking=True)
    if mixup_lam is None:
        x = to_model_input(batch["images"].to(device, non_blocking=True), dtype)
    else:
        from pipeline.augment import mixup

        x, targets = mixup(to_model_input(batch["images"].to(device, non_blocking=True)), targets, mixup_lam)
        x = x.to(dtype)
    return loss(engine(x), targets)


def micro_step(
    engine,
    batch: dict,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    mixup_lam: float | None = None,
) -> torch.Tensor:
    """Forward, backward and (at the accumulation boundary) the optimizer step of one batch
    (:func:`forward_loss`); the loss, detached."""
    value = forward_loss(engine, batch, loss, dtype, device, mixup_lam)
    engine.backward(value)
    engine.step()
    return value.detach()
