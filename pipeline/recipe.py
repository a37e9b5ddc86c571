"""What pre-training trains: the configured model, AdamW over its parameter groups, the
learning-rate schedule, the DeepSpeed config, and the engine that wraps them (the same
initialisation on every rank). ``pipeline.train`` runs it; tests and benchmarks build it too.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline.compile import compile_blocks
from pipeline.config import batch_split
from pipeline.engine import ds_config, initialize, warmup_decay
from pipeline.model import from_config


def total_steps(cfg: DictConfig, num_samples: int) -> int:
    """The run's optimizer steps: ``train.steps``, else ``train.epochs`` over ``num_samples``."""
    if cfg.train.steps > 0:
        return int(cfg.train.steps)
    return max(1, int(cfg.train.epochs * num_samples // cfg.train.global_batch_size))


def lr_at(cfg: DictConfig, step: int, total: int) -> float:
    """Linear warmup from 0 to lr, then linear (or cosine) decay to end_lr at ``total``."""
    o = cfg.optim
    return o.lr * warmup_decay(step, o.warmup_steps, total, o.schedule, o.end_lr / o.lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weight matrices only (not biases, norms, tokens, pos-emb)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    d = cfg.deepspeed
    batch_split(cfg, world_size)  # the error names the keys
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero.update(reduce_bucket_size=d.reduce_bucket_size, overlap_comm=d.overlap_comm, contiguous_gradients=True)
    if d.zero_stage == 3:
        # Without this, ZeRO-3 saves empty 16-bit module weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.train.compile.enabled:
            zero["memory_efficient_linear"] = False  # its autograd function is opaque to dynamo (pipeline.compile)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    fp16 = {
        "loss_scale": 0,
        "initial_scale_power": d.fp16_initial_scale_power,  # dynamic loss scale
        "loss_scale_window": d.fp16_loss_scale_window,
        "hysteresis": d.fp16_hysteresis,
        "min_loss_scale": d.fp16_min_loss_scale,
    }
    out = ds_config(
        cfg.train.global_batch_size,
        cfg.data.micro_batch_size,
        world_size,
        cfg.optim.grad_clip,
        cfg.train.precision,
        zero,
        fp16,
    )
    if cfg.train.guard.enabled and cfg.train.precision == "bf16":
        out["bf16"]["check_grad_overflow"] = True  # how the guard skips an update (pipeline.guard)
    return _merge(out, dict(d.extra))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _build_optimizer(cfg: DictConfig, model: torch.nn.Module, device: torch.device):
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The model to pre-train: the configured architecture with its regularisation and head init."""
    return from_config(
        cfg.model,
        num_classes,
        dropout=cfg.model.dropout,
        drop_path=cfg.model.drop_path,
        head_bias_init=-10.0 if cfg.train.loss == "sigmoid" else 0.0,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )


def build_engine(
    cfg: DictConfig, num_classes: int, steps: int, world: int, device: torch.device, load_universal: bool = False
):
    """Model, optimizer and schedule wrapped in a DeepSpeed engine (same init on every rank);
    ``load_universal``: it will load a universal checkpoint (another world size)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, num_classes)
    if (c := cfg.train.compile).enabled:  # before ZeRO-3 registers its hooks (blocks become leaf modules)
        compile_blocks(model, c.mode, c.backend, c.dynamic, zero3=cfg.deepspeed.zero_stage == 3)
    optimizer = _build_optimizer(cfg, model, device)
    config = deepspeed_config(cfg, world)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return initialize(model, optimizer, lambda s: lr_at(cfg, s, steps) / cfg.optim.lr, config)
