"""Run by the tests under torchrun: several training runs ("phases") in one process.

``torchrun --nproc_per_node N tests/workers/train_phases.py <plan.json> <result.json>``

``plan.json`` holds ``{"phases": [{"name", "overrides", ...}, ...]}``. Each phase trains a
``pipeline.trainer.Trainer`` built with its overrides (sharing one process group, so the torchrun and
DeepSpeed start-up is paid once for many runs). A ZeRO-3 engine replaces
``torch.nn.functional.linear`` for the rest of the process, so put ZeRO-3 phases after the
others when runs are compared across processes. Optional keys of a phase:

* ``"expect_error": "text"``: the run must raise an exception whose message holds ``text``;
  the message is recorded instead of failing the worker.
* ``"check_load": {"ckpt_dir", "tag"}``: before training, build a fresh engine for the
  phase's config, load ``train.resume_from`` into it and compare its fp32 master weights
  and module weights with ``checkpoint.load_fp32_weights(ckpt_dir, tag)``.
* ``"save_fp32": "path"``: after training, rank 0 saves the engine's fp32 master weights there.
* ``"save_saved": "path"``: after each ``CheckpointManager.save`` during training, rank 0
  saves the engine's :func:`full_state` there (the last checkpoint's state wins).
* ``"save_resumed": "path"``: right after ``CheckpointManager.resume`` loads a checkpoint
  while the trainer is built, rank 0 saves the engine's :func:`full_state` there.

Every phase records the config dicts passed to ``deepspeed.initialize``, the precision
settings the engine parsed from them, the summary, and (rank 0) the MLflow ``train/loss``
history. Rank 0 writes ``{phase name: findings}`` to ``result.json``.
"""

import gc
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.data import ShardIndex
from pipeline.ds_ops import import_deepspeed
from pipeline.engine import dist_setup
from pipeline.recipe import build_engine, total_steps
from pipeline.tracking import tracking_uri
from pipeline.trainer import Trainer

# As training imports it (pipeline.engine.dist_setup): without MLflow, which only rank 0 uses.
deepspeed = import_deepspeed()
DeepSpeedEngine = deepspeed.runtime.engine.DeepSpeedEngine
safe_get_full_fp32_param, safe_get_full_optimizer_state = (
    deepspeed.utils.safe_get_full_fp32_param,
    deepspeed.utils.safe_get_full_optimizer_state,
)

SEEN: dict = {}  # what the current phase handed to DeepSpeed and what DeepSpeed made of it
DUMP: dict = {}  # where the current phase wants the engine's state after a resume or a save


def _spy_initialize(real):
    def initialize(*args, **kwargs):
        SEEN.setdefault("ds_configs", []).append(json.loads(json.dumps(kwargs.get("config"))))
        return real(*args, **kwargs)

    return initialize


def _spy_sanity_check(real):
    # The engine's own sanity check is where DeepSpeed refuses a precision the device lacks;
    # record what it parsed first, so a refused fp16 run still shows its loss-scale settings.
    def check(self):
        SEEN.setdefault("engine_precision", []).append(
            {
                "fp16": self.fp16_enabled(),
                "bf16": self.bfloat16_enabled(),
                "loss_scale": self.loss_scale(),
                "dynamic_loss_scale": self.dynamic_loss_scale(),
                "dynamic_loss_scale_args": {str(k): v for k, v in (self.dynamic_loss_scale_args() or {}).items()},
            }
        )
        return real(self)

    return check


def _spy_state(real, key: str):
    """Wrap a CheckpointManager method: afterwards, dump the tracked state where the phase says."""

    def method(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if DUMP.get(key) and self.engine.global_steps > 0:  # Adam has no moments before its first step
            state = full_state(self.engine, self.ema)
            if dist.get_rank() == 0:
                torch.save(state, DUMP[key])
        return out

    return method


deepspeed.initialize = _spy_initialize(deepspeed.initialize)
checkpoint.CheckpointManager.resume = _spy_state(checkpoint.CheckpointManager.resume, "save_resumed")
checkpoint.CheckpointManager.save = _spy_state(checkpoint.CheckpointManager.save, "save_saved")
DeepSpeedEngine._do_sanity_check = _spy_sanity_check(DeepSpeedEngine._do_sanity_check)


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights, whole, on every rank (a collective under ZeRO-3)."""
    return {k: safe_get_full_fp32_param(p).detach().float().cpu().clone() for k, p in engine.module.named_parameters()}


def full_state(engine, ema=None) -> dict[str, dict[str, torch.Tensor]]:
    """The whole fp32 master weights, both Adam moments and the EMA weights (a collective)."""
    params = dict(engine.module.named_parameters())
    # ZeRO-1/2 link a parameter to its optimizer state once, at the first step after the engine
    # is built or loaded (or earlier, to an empty state): link it again to the state there is now
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {"fp32": full_fp32(engine)}
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = {
            k: safe_get_full_optimizer_state(p, key).detach().float().cpu().clone() for k, p in params.items()
        }
    if ema is not None:
        state["ema"] = {k: v.detach().float().cpu().clone() for k, v in ema.full_state_dict().items()}
    state["step"] = {"global_steps": torch.tensor(engine.global_steps)}
    return state


def full_module(engine) -> dict[str, torch.Tensor]:
    """The module's own (16-bit under bf16) weights, gathered under ZeRO-3."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone() for k, v in params.items()}


def check_load(cfg, ckpt_dir: str, tag: str) -> dict:
    """Load ``cfg.train.resume_from`` into a fresh engine; compare with the source's fp32 weights."""
    _, world, device = dist_setup()
    index = ShardIndex.load(cfg.data.train)
    src = Path(cfg.train.resume_from)
    engine, _ = build_engine(
        cfg,
        cfg.model.num_classes or index.num_classes,
        total_steps(cfg, index.num_samples),
        world,
        device,
        load_universal=checkpoint.is_universal(src),
    )
    meta, rank_state = checkpoint.load(engine, str(src.parent), src.name)
    master, module = full_fp32(engine), full_module(engine)
    reference = checkpoint.load_fp32_weights(ckpt_dir, tag)
    out = {
        "names_match": sorted(master) == sorted(reference),
        "fp32_max_diff": max((master[k] - reference[k]).abs().max().item() for k in reference),
        "module_max_diff": max(
            (module[k].float() - reference[k].to(module[k].dtype).float()).abs().max().item() for k in reference
        ),
        "module_dtype": str(next(iter(module.values())).dtype),
        "global_steps": engine.global_steps,
        "meta_step": meta.get("step"),
        "rank_state": rank_state is not None,
        "lr": engine.lr_scheduler.get_last_lr()[0] if engine.lr_scheduler else None,
    }
    engine.destroy()
    return out


def offload_device(offload_config) -> str | None:
    device = getattr(offload_config, "device", None)
    return None if device in (None, "none") else str(getattr(device, "value", device))


def run_phase(phase: dict) -> dict:
    SEEN.clear()
    DUMP.update(save_resumed=phase.get("save_resumed"), save_saved=phase.get("save_saved"))
    cfg = load_config(None, phase["overrides"])
    out: dict = {}
    if "check_load" in phase:
        out["load"] = check_load(cfg, phase["check_load"]["ckpt_dir"], phase["check_load"]["tag"])
    try:
        with Trainer(cfg) as trainer:
            summary = trainer.train()
    except Exception as e:
        if phase.get("expect_error") and phase["expect_error"] in str(e):
            return {**out, **SEEN, "error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
        raise
    engine = trainer.engine
    out.update(
        SEEN,
        summary=summary,
        zero_stage=engine.zero_optimization_stage(),
        bf16=engine.bfloat16_enabled(),
        fp16=engine.fp16_enabled(),
        world=dist.get_world_size(),
        param_dtype=str(next(engine.module.parameters()).dtype),
        optimizer=type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        offload_optimizer=offload_device(engine.zero_offload_optimizer()),
        offload_param=offload_device(engine.zero_offload_param()),
    )
    if "save_fp32" in phase:
        weights = full_fp32(engine)
        if dist.get_rank() == 0:
            torch.save(weights, phase["save_fp32"])
    if dist.get_rank() == 0:
        from mlflow.tracking import MlflowClient

        history = MlflowClient(tracking_uri(cfg)).get_metric_history(summary["run_id"], "train/loss")
        out["loss_history"] = sorted([m.step, m.value] for m in history)
    engine.destroy()
    del engine
    gc.collect()
    return out


def main() -> None:
    plan_path, result_path = (a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    plan = json.loads(Path(plan_path).read_text())
    results = {}
    for phase in plan["phases"]:
        results[phase["name"]] = run_phase(phase)
        dist.barrier()
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
