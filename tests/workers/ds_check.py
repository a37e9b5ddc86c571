"""Run by the tests under torchrun: real DeepSpeed on N CPU ranks (gloo).

``torchrun --nproc_per_node N tests/workers/ds_check.py <result.json> key=value ...``
trains with pipeline.train, then builds a fresh engine, loads the latest checkpoint into it
and compares every parameter with the trained engine; rank 0 writes the findings as JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import load_config
from pipeline.data import ShardIndex
from pipeline.ds_ops import import_deepspeed
from pipeline.engine import dist_setup
from pipeline.recipe import build_engine, total_steps
from pipeline.tracking import Tracker
from pipeline.trainer import Trainer

deepspeed = import_deepspeed()  # as training imports it: without MLflow, which only rank 0 uses


def full_params(engine) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in params.items()}


def main() -> None:
    result_path, overrides = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--local_rank")]
    cfg = load_config(None, overrides)
    with Trainer(cfg) as trainer:
        summary = trainer.train()
    engine = trainer.engine
    rank, world, device = dist_setup()
    trained = full_params(engine)
    index = ShardIndex.load(cfg.data.train)
    ckpt_dir = str(Path(cfg.output_dir) / "checkpoints")
    fresh, _ = build_engine(
        cfg, cfg.model.num_classes or index.num_classes, total_steps(cfg, index.num_samples), world, device
    )
    before = full_params(fresh)
    checkpoint.load(fresh, ckpt_dir, checkpoint.latest_tag(ckpt_dir))
    loaded = full_params(fresh)
    diffs = {k: (trained[k] - loaded[k]).abs().max().item() for k in trained}
    changed = max((trained[k] - before[k]).abs().max().item() for k in trained)
    if rank == 0:
        losses = [
            m.value
            for m in sorted(
                Tracker(Tracker.start(cfg, summary["run_id"]).uri, summary["run_id"]).metric_history("train/loss"),
                key=lambda m: m.step,
            )
        ]
        Path(result_path).write_text(
            json.dumps(
                {
                    "summary": summary,
                    "max_diff": max(diffs.values()),
                    "changed_by_training": changed,
                    "losses": losses,
                    "zero_stage": engine.zero_optimization_stage(),
                    "bf16": engine.bfloat16_enabled(),
                    "world": world,
                    "tags": checkpoint.complete_tags(ckpt_dir),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
