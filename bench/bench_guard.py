"""What the divergence guard costs a training step: the guard's own work per step (its one
all-reduce of two values and the running median) timed on its own, then whole steps with and
without it, in pairs, side by side in one process.

    .venv/bin/python -m torch.distributed.run --nproc_per_node=2 bench/bench_guard.py [--model vit_demo]
        [--micro-batch 64] [--precision bf16] [--pairs 4] [--calls 2000]

A step without the guard is the training loop's forward, backward and optimizer step; with it,
the same plus :meth:`Guard.judge` before the last backward and :meth:`Guard.settle` after the
step. Whole steps are noisy to a few per cent, so the guard's share is its own time over the
median step time; the paired step ratio shows nothing else changed. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_demo")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from pipeline import guard
    from pipeline.config import load_config
    from pipeline.engine import DTYPES, dist_setup, forward_loss, loss_fn
    from pipeline.recipe import build_engine

    rank, world, device = dist_setup(standalone="RANK" not in os.environ)
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            "data.train=unused",
            "train.steps=1000",
            f"train.global_batch_size={args.micro_batch * world}",
            f"data.micro_batch_size={args.micro_batch}",
            f"ray.num_workers={world}",
            "deepspeed.zero_stage=2",
            f"train.precision={args.precision}",
            "optim.warmup_steps=10",
        ],
    )
    engine, _ = build_engine(cfg, 100, 1000, world, device)
    size = engine.module.spec.img_size
    batch = {
        "images": torch.randint(0, 256, (args.micro_batch, size, size, 3), dtype=torch.uint8),
        "targets": torch.nn.functional.one_hot(torch.randint(0, 100, (args.micro_batch,)), 100).float(),
    }
    loss_of = functools.partial(loss_fn, kind="softmax")
    dtype = DTYPES[args.precision]
    sentry = guard.Guard(cfg.train.guard, warmup_steps=0, quiet=True)

    def step(with_guard: bool, n: int) -> float:
        t0 = time.perf_counter()
        before = engine.skipped_steps
        value = forward_loss(engine, batch, loss_of, dtype, device)
        verdict = sentry.judge(n, value.detach().float(), 1) if with_guard else None
        engine.backward(value)
        engine.step()
        if with_guard:
            sentry.settle(verdict, engine.skipped_steps > before)
        return time.perf_counter() - t0

    step(False, 0)  # warm-up: DeepSpeed's first step builds its buffers
    step(True, 0)
    plain, guarded = [], []
    for i in range(args.pairs):
        plain.append(step(False, 2 * i + 1))
        guarded.append(step(True, 2 * i + 2))

    # The guard alone: the same two calls on a fixed loss, the collective included.
    loss = torch.tensor(2.5)
    dist.barrier()
    t0 = time.perf_counter()
    for n in range(args.calls):
        sentry.settle(sentry.judge(n, loss, 1), False)
    own = (time.perf_counter() - t0) / args.calls

    if rank == 0:
        p_med, g_med = statistics.median(plain), statistics.median(guarded)
        print(
            f"model {args.model}, {args.precision}, ZeRO-2, {world} rank(s), micro-batch {args.micro_batch}, "
            f"{args.pairs} pairs; torch {torch.__version__}"
        )
        print(f"{'step without the guard (median)':<40}{p_med * 1e3:>12.1f} ms")
        print(f"{'step with the guard (median)':<40}{g_med * 1e3:>12.1f} ms   ratio {g_med / p_med:.3f}")
        print(f"{'the guard alone, per step':<40}{own * 1e3:>12.3f} ms   {own / p_med:.4%} of a step")
    dist.barrier()


if __name__ == "__main__":
    main()
