"""What resuming at another world size costs: the universal conversion that
``CheckpointManager.prepare`` runs when a checkpoint was saved at another world size.

    torchrun --nproc_per_node 2 bench/bench_reshard.py [--model vit_b16] [--stage 2] [--dir /tmp/x]

The ranks build a ZeRO engine (bf16, AdamW, CPU ranks), take one step (so Adam's moments
exist) and save a checkpoint with ``pipeline.checkpoint.save``; then rank 0 converts it with
``pipeline.checkpoint.to_universal`` (DeepSpeed's ``ds_to_universal``, one extract and one
merge worker, plus our manifest) and prints the tag's size and the conversion's time.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from pipeline import checkpoint
    from pipeline.config import load_config
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    rank, world, device = dist_setup()
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            "data.train=unused",
            "train.steps=10",
            f"train.global_batch_size={2 * world}",
            "data.micro_batch_size=2",
            f"ray.num_workers={world}",
            f"deepspeed.zero_stage={args.stage}",
            "train.precision=bf16",
        ],
    )
    engine, _ = build_engine(cfg, 1000, 10, world, device)
    size = engine.module.spec.img_size
    x = torch.randn(2, 3, size, size, dtype=torch.bfloat16)
    y = torch.nn.functional.one_hot(torch.tensor([1, 2]), 1000).float()
    engine.backward(functools.partial(loss_fn, kind="softmax")(engine(x), y))
    engine.step()

    root = args.dir or (tempfile.mkdtemp(prefix="bench-reshard-") if rank == 0 else None)
    box = [root]
    dist.broadcast_object_list(box)
    ckpt_dir = str(Path(box[0]) / "checkpoints")
    tag = checkpoint.save(engine, ckpt_dir, 1, {"world_size": world}, {}, "{}\n")
    if rank == 0:
        gb = sum(f.stat().st_size for f in (Path(ckpt_dir) / tag).rglob("*") if f.is_file()) / 1e9
        t0 = time.perf_counter()
        out = checkpoint.to_universal(ckpt_dir, tag, str(Path(box[0]) / "universal"))
        seconds = time.perf_counter() - t0
        ugb = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 1e9
        print(
            f"{args.model} ZeRO-{args.stage}, {world} ranks: tag {gb:.2f} GB -> universal {ugb:.2f} GB in "
            f"{seconds:.1f} s "
            f"({out})",
            flush=True,
        )
    dist.barrier()
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
