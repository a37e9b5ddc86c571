"""One full ViT-H/14 training step under ZeRO-3 on CPU ranks, and the memory it takes.

    .venv/bin/python bench/bench_vit_h_step.py [--nproc 2] [--steps 1] [--budget-gib 24]
        [--offload none|optimizer|all]

Starts itself under torchrun (``--nproc`` CPU ranks, gloo, DS_ACCELERATOR=cpu). Every rank
loads ``configs/experiment/jft_vit_h14.yaml`` (ViT-H/14 at 224 px with its pre-logits
layer and an 18,291-class sigmoid head, ZeRO-3, bf16, activation checkpointing) with micro
batch 1, builds the engine with ``pipeline.recipe.build_engine`` and takes ``--steps`` full
training steps (forward, backward, ZeRO-3 reduce-scatter, AdamW on the fp32 partition,
parameter all-gather) on random images and multi-hot targets.

It reports, per rank, the RSS after building and after the step, the peak RSS
(ru_maxrss) and the wall time of each phase, next to the ZeRO-3 arithmetic (16Ψ/N bytes of
model states per rank) and the transient fp32 model every rank builds before DeepSpeed
partitions it (4Ψ). The table ends with the ratios peak / arithmetic and all ranks' peaks
/ the memory budget.

On a CPU "offloading" moves nothing (it is all host memory), but ``--offload optimizer``
(the default) swaps torch's AdamW for DeepSpeedCPUAdam, which updates the fp32 partition in
place: torch's foreach AdamW allocates partition-sized temporaries in the step and took
the peak of a 2-rank ViT-H/14 past 24 GiB (measured: a rank was OOM-killed at 11.5 GiB).
glibc is told to return freed blocks over 1 MiB at once (``MALLOC_MMAP_THRESHOLD_``), so
the fp32 model freed after partitioning does not stay in the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "experiment" / "jft_vit_h14.yaml"))
    p.add_argument("--classes", type=int, default=18291, help="JFT-300M's class count")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--offload", choices=("none", "optimizer", "all"), default="optimizer")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: where rank 0 writes the findings
    return p.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / GIB


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.data import to_model_input
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    rank, world, device = dist_setup()
    overrides = [
        "data.micro_batch_size=1",
        f"train.global_batch_size={world}",
        f"ray.num_workers={world}",
        "data.train=unused",
        "tracking.system_metrics=false",
    ]
    if args.offload != "none":
        overrides += ["deepspeed.offload_optimizer=true", f"deepspeed.offload_param={args.offload == 'all'}"]
    cfg = load_config(args.config, overrides)
    images = torch.randint(0, 256, (1, cfg.model.img_size or 224, cfg.model.img_size or 224, 3), dtype=torch.uint8)
    targets = torch.zeros(1, args.classes)
    targets[0, [rank, 100 + rank]] = 1.0
    row = {"rank": rank, "rss_start": rss_gib()}
    t = time.perf_counter()
    engine, _ = build_engine(cfg, args.classes, 1000, world, device)
    dist.barrier()
    row.update(build_s=time.perf_counter() - t, rss_built=rss_gib(), peak_built=peak_gib())
    step_times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = loss_fn(engine(to_model_input(images, torch.bfloat16)), targets, cfg.train.loss)
        engine.backward(loss)
        engine.step()
        dist.barrier()
        step_times.append(time.perf_counter() - t)
        losses.append(loss.item())
    row.update(
        step_s=step_times,
        loss=losses,
        rss_after=rss_gib(),
        peak=peak_gib(),
        global_steps=engine.global_steps,
        params=sum(p.ds_numel for p in engine.module.parameters()),
        zero_stage=engine.zero_optimization_stage(),
        bf16=engine.bfloat16_enabled(),
        grad_checkpointing=engine.module.grad_checkpointing,
    )
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, rows: list[dict], wall: float) -> None:
    import platform

    import deepspeed
    import psutil
    import torch

    psi, n = rows[0]["params"], len(rows)
    arith = 16 * psi / n / GIB
    print(
        f"\nViT-H/14 from {Path(args.config).name}: {psi / 1e6:.0f}M params, ZeRO-{rows[0]['zero_stage']}, "
        f"bf16 {rows[0]['bf16']}, activation checkpointing {rows[0]['grad_checkpointing']}, micro batch 1 at 224 px, "
        f"{n} CPU ranks, offload: {args.offload}; DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, {psutil.virtual_memory().total / GIB:.1f} GiB RAM; whole run {wall:.0f} s"
    )
    print(
        "\n| rank | build (s) | step (s) | loss | RSS built (GiB) | RSS after step | peak RSS | ZeRO-3 arithmetic "
        "16Ψ/N | transient fp32 model 4Ψ |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        steps = ", ".join(f"{s:.1f}" for s in r["step_s"])
        print(
            f"| {r['rank']} | {r['build_s']:.1f} | {steps} | {r['loss'][-1]:.1f} | {r['rss_built']:.2f} | "
            f"{r['rss_after']:.2f} "
            f"| {r['peak']:.2f} | {arith:.2f} | {4 * psi / GIB:.2f} |"
        )
    total_peak = sum(r["peak"] for r in rows)
    print()
    print(f"- every rank reached step {rows[0]['global_steps']}: {all(r['global_steps'] == args.steps for r in rows)}")
    print(f"- peak RSS per rank / ZeRO-3 model-state arithmetic = {max(r['peak'] for r in rows) / arith:.2f}x")
    print(
        f"- sum of the ranks' peak RSS = {total_peak:.1f} GiB = {total_peak / args.budget_gib:.2f}x the "
        f"{args.budget_gib:.0f} GiB budget "
        f"({'within' if total_peak <= args.budget_gib else 'OVER'})"
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    env = {
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc)),
        "PYTHONPATH": str(ROOT),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            f"--master_port={free_port()}",
            str(Path(__file__).resolve()),
            "--config",
            args.config,
            "--classes",
            str(args.classes),
            "--steps",
            str(args.steps),
            "--worker",
            str(out),
            "--offload",
            args.offload,
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
        report(args, json.loads(out.read_text()), wall)


if __name__ == "__main__":
    main()
