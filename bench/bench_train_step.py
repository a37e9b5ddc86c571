"""Train-step time of the pipeline's DeepSpeed engine against a plain PyTorch DDP loop.

    .venv/bin/python bench/bench_train_step.py [--model vit_ti16 --img 96 --micro 16]
        [--nproc 2] [--zero 2] [--precisions bf16,fp32] [--rounds 7] [--steps 4]

Starts itself under torchrun (``--nproc`` CPU ranks, gloo, DS_ACCELERATOR=cpu, one thread
a rank). On every rank the same model (``pipeline.recipe.build_model``, same seed) is built
twice and trained side by side on the same in-memory batches (uint8 images turned into
model input as the trainer does, multi-hot targets, the paper's sigmoid loss):

  * ours: the engine from ``pipeline.recipe.build_engine`` (ZeRO ``--zero``, the configured
    precision: the module in bf16 with fp32 master weights, gradient clipping at 1), the
    loop body of ``pipeline.train``: ``engine(x)``, ``engine.backward``, ``engine.step``;
  * baseline: ``torch.nn.parallel.DistributedDataParallel`` on gloo, fp32 weights with
    ``torch.autocast(bfloat16)`` for bf16 (PyTorch's own mixed precision), AdamW with the
    same parameter groups and schedule, ``clip_grad_norm_(1.0)``.

After a warm-up, each round times ``--steps`` steps of each (order alternating between
rounds; the slowest rank counts) and the table ends with the ratio of throughputs,
ours / baseline (target >= 0.9 on CPU): from the median step times, the median of the
per-round ratios (both loops of a round share the machine's load at that moment) and the
CPU seconds a step costs the busiest rank (steady where other jobs share the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_ti16")
    p.add_argument("--img", type=int, default=96)
    p.add_argument("--micro", type=int, default=16, help="images per rank and step")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage of our engine")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="steps per candidate per round")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
    """Re-run this script under torchrun with ``args.nproc`` CPU ranks."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--master_port={free_port()}",
        str(Path(__file__).resolve()),
        *sys.argv[1:],
    ]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(args: argparse.Namespace, precision: str, world: int):
    from pipeline.config import load_config

    return load_config(
        None,
        [
            f"model.name={args.model}",
            f"model.img_size={args.img}",
            f"data.micro_batch_size={args.micro}",
            f"train.global_batch_size={args.micro * world}",
            "train.steps=100000",
            "optim.warmup_steps=10",
            f"deepspeed.zero_stage={args.zero}",
            f"train.precision={precision}",
            "data.train=unused",
            "train.loss=sigmoid",
            f"ray.num_workers={world}",
        ],
    )


def batches(args: argparse.Namespace, rank: int, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(1234 + rank)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (args.micro, args.img, args.img, 3), dtype=torch.uint8, generator=g)
        targets = torch.zeros(args.micro, args.classes)
        targets[torch.arange(args.micro), torch.randint(0, args.classes, (args.micro,), generator=g)] = 1.0
        out.append((images, targets))
    return out


def make_ours(cfg, args, world, device):
    import torch

    from pipeline.data import to_model_input
    from pipeline.engine import loss_fn
    from pipeline.recipe import build_engine

    engine, _ = build_engine(cfg, args.classes, cfg.train.steps, world, device)
    engine.train()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.precision]

    def step(images, targets):
        loss = loss_fn(engine(to_model_input(images, dtype)), targets, "sigmoid")
        engine.backward(loss)
        engine.step()
        return loss

    return step


def make_baseline(cfg, args):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.data import to_model_input
    from pipeline.engine import loss_fn
    from pipeline.recipe import build_model, lr_at, param_groups

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, args.classes)
    ddp = DistributedDataParallel(model)
    ddp.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s, cfg.train.steps) / o.lr)
    bf16 = cfg.train.precision == "bf16"

    def step(images, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = ddp(to_model_input(images, torch.float32))
        loss = loss_fn(logits, targets, "sigmoid")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, data, n: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over ``n`` steps, the slowest rank's."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        step(*data[i % len(data)])
    c = time.process_time() - c
    dist.barrier()
    dt = torch.tensor([(time.perf_counter() - t) / n, c / n])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt[0].item(), dt[1].item()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from pipeline.engine import dist_setup
    from pipeline.model import flops_per_image, get_spec

    rank, world, device = dist_setup()
    data = batches(args, rank)
    rows = []
    for precision in args.precisions.split(","):
        cfg = config(args, precision, world)
        candidates = {"ours": make_ours(cfg, args, world, device), "baseline": make_baseline(cfg, args)}
        for step in candidates.values():
            timed(step, data, args.warmup)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
        for r in range(args.rounds):
            for name in list(candidates) if r % 2 == 0 else list(candidates)[::-1]:
                times[name].append(timed(candidates[name], data, args.steps))
            if rank == 0:
                print(
                    f"[{precision}] round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{k} {v[-1][0]:.3f}s/step" for k, v in times.items()),
                    flush=True,
                )
        rows.append((precision, times))
        del candidates
    if rank == 0:
        report(args, world, rows, flops_per_image(get_spec(args.model, img_size=args.img), args.classes))
    dist.barrier()
    dist.destroy_process_group()


def report(args, world: int, rows, flops: float) -> None:
    import platform

    import deepspeed
    import torch

    batch = args.micro * world
    print(
        f"\n{args.model} at {args.img}px, {world} CPU ranks x {args.micro} images (global batch {batch}), "
        f"ours = DeepSpeed {deepspeed.__version__} ZeRO-{args.zero}, baseline = torch {torch.__version__} DDP (gloo); "
        f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps; "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        "\n| precision | loop | s/step (median) | min | max | images/s | model GFLOP/s | CPU s/step (median, busiest "
        "rank) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for precision, times in rows:
        wall = {k: [w for w, _ in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in wall.items()}
        for name, v in wall.items():
            label = (
                f"ours (DeepSpeed ZeRO-{args.zero})"
                if name == "ours"
                else "plain PyTorch DDP" + (" + autocast" if precision == "bf16" else "")
            )
            cpu = statistics.median(c for _, c in times[name])
            print(
                f"| {precision} | {label} | {med[name]:.3f} | {min(v):.3f} | {max(v):.3f} | {batch / med[name]:.1f} "
                f"| {batch * flops / med[name] / 1e9:.1f} | {cpu:.3f} |"
            )
        # Both loops of a round run back to back under the same load: the per-round ratio is
        # the steadier figure on a shared machine.
        paired = statistics.median(b / o for b, o in zip(wall["baseline"], wall["ours"], strict=True))
        cpu = statistics.median(c for _, c in times["baseline"]) / statistics.median(c for _, c in times["ours"])
        ratios.append((precision, med["baseline"] / med["ours"], paired, cpu))
    print()
    for precision, ratio, paired, cpu in ratios:
        print(
            f"- {precision}: ours / baseline throughput = {ratio:.2f}x from the median wall times, {paired:.2f}x "
            "median "
            f"of the per-round ratios, {cpu:.2f}x per CPU-second (target >= 0.9)"
        )


def main() -> None:
    args = parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch(args))
    worker(args)


if __name__ == "__main__":
    main()
