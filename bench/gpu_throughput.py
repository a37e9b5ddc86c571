"""Training throughput and MFU of ViT-B/16 and ViT-L/16 in bf16 at 224 px on one CUDA GPU.

    .venv/bin/python bench/gpu_throughput.py [--models vit_b16,vit_l16] [--batch 128,64]
        [--compile] [--engine] [--zero 1] [--modes eager] [--steps 20] [--rounds 3] [--peak-tflops 0]

    # train.compile's figure: the engine eager and compiled, ZeRO-2 and ZeRO-3
    .venv/bin/python bench/gpu_throughput.py --engine --zero 2,3 --modes eager,compiled

For each model (``pipeline.model.create_model``, the paper's variant, 1000-class head) it
times full training steps on random data, after a warm-up, in a plain PyTorch loop: fp32
weights, ``torch.autocast(bfloat16)``, the paper's sigmoid loss, fused AdamW with the
pipeline's parameter groups, gradient clipping at 1. With ``--compile`` the same loop runs
with each block compiled (``pipeline.compile.compile_blocks``, as ``train.compile``) too; with
``--engine`` the pipeline's own DeepSpeed engine (``pipeline.recipe.build_engine``, bf16
weights with fp32 masters) runs the same steps, for each ZeRO stage of ``--zero`` and each
of ``--modes`` (``eager``; ``compiled``: ``train.compile.enabled=true``). MFU = images/s x model
FLOPs per image (``flops_per_image``: forward
+ backward = 3x forward, no recomputation) / the GPU's dense bf16 peak, looked up by
device name (``--peak-tflops`` overrides). The table ends with the ratios against the
eager loop. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_b16,vit_l16")
    p.add_argument("--batch", default="128,64", help="images per step, one per model")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the plain loop with each block compiled")
    p.add_argument("--engine", action="store_true", help="also time the pipeline's DeepSpeed engine")
    p.add_argument("--zero", default="1", help="ZeRO stages of the engine, comma-separated")
    p.add_argument(
        "--modes", default="eager", help="the engine eager, compiled (train.compile) or both: eager,compiled"
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak of the GPU; 0: look it up")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run of this script's logic
    return p.parse_args(argv)


def data(batch: int, img: int, classes: int, device):
    import torch

    images = torch.randint(0, 256, (batch, img, img, 3), dtype=torch.uint8, device=device)
    targets = torch.zeros(batch, classes, device=device)
    targets[torch.arange(batch), torch.randint(0, classes, (batch,), device=device)] = 1.0
    return images, targets


def plain_step(
    name: str,
    args: argparse.Namespace,
    device,
    compile_model: bool = False,
    precision: str = "bf16",
    img: int | None = None,
    mode: str = "default",
):
    """A plain PyTorch training step: autocast bf16 (or fp32), sigmoid loss, clip 1, AdamW (fused
    on CUDA). The step returns the loss tensor (no host sync). bench_compile.py's CPU loop too."""
    import contextlib

    import torch

    from pipeline.compile import compile_blocks
    from pipeline.data import to_model_input
    from pipeline.engine import loss_fn
    from pipeline.model import create_model
    from pipeline.recipe import param_groups

    model = create_model(name, num_classes=args.classes, img_size=img or args.img).to(device)
    if compile_model:
        compile_blocks(model, mode=mode)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.03), lr=1e-3, fused=device.type == "cuda")

    def autocast():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(images, targets):
        with autocast():
            logits = model(to_model_input(images, torch.float32))
        loss = loss_fn(logits, targets, "sigmoid")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def engine_step(name: str, batch: int, args: argparse.Namespace, zero: int = 1, compiled: bool = False):
    """The pipeline's DeepSpeed engine on this one GPU (a one-rank process group), ZeRO ``zero``,
    its blocks compiled (``train.compile``) when ``compiled``."""
    import torch

    from pipeline.config import load_config
    from pipeline.data import to_model_input
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29513",
    }.items():
        os.environ.setdefault(key, value)
    _, world, device = dist_setup()
    cfg = load_config(
        None,
        [
            f"model.name={name}",
            f"model.img_size={args.img}",
            f"data.micro_batch_size={batch}",
            f"train.global_batch_size={batch}",
            "train.steps=100000",
            f"deepspeed.zero_stage={zero}",
            f"train.compile.enabled={compiled}",
            "train.precision=bf16",
            "data.train=unused",
            "ray.num_workers=1",
        ],
    )
    engine, _ = build_engine(cfg, args.classes, cfg.train.steps, world, device)
    engine.train()

    def step(images, targets):
        loss = loss_fn(engine(to_model_input(images, torch.bfloat16)), targets, "sigmoid")
        engine.backward(loss)
        engine.step()

    return step


def timed(step, batch_data, warmup: int, steps: int, rounds: int, device) -> tuple[list[float], float]:
    """Seconds per step of each round, and the warm-up's seconds (compilation included)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(warmup):
        step(*batch_data)
    sync()
    warm = time.perf_counter() - t
    per_round = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step(*batch_data)
        sync()
        per_round.append((time.perf_counter() - t) / steps)
    return per_round, warm


def main() -> int:
    args = parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to measure.")
        return 0
    from pipeline.devices import peak_tflops
    from pipeline.model import flops_per_image, get_spec

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else args.device
    peak = (args.peak_tflops or peak_tflops(gpu)) * 1e12
    rows = []
    for name, batch in zip(args.models.split(","), (int(b) for b in args.batch.split(",")), strict=True):
        flops = flops_per_image(get_spec(name, img_size=args.img), args.classes)
        batch_data = data(batch, args.img, args.classes, device)
        loops = ["plain PyTorch (eager)"] + ["plain PyTorch (compiled blocks)"] * args.compile
        loops += [f"engine ZeRO-{z} ({m})" for z in args.zero.split(",") for m in args.modes.split(",")] * args.engine
        for loop in loops:
            torch.manual_seed(0)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if loop.startswith("engine"):
                step = engine_step(name, batch, args, int(loop.split("ZeRO-")[1][0]), compiled="compiled" in loop)
            else:
                step = plain_step(name, args, device, compile_model="compiled" in loop)
            per_round, warm = timed(step, batch_data, args.warmup, args.steps, args.rounds, device)
            del step
            s = statistics.median(per_round)
            rows.append(
                {
                    "model": name,
                    "loop": loop,
                    "batch": batch,
                    "s": s,
                    "ips": batch / s,
                    "warm": warm,
                    "tflops": batch * flops / s / 1e12,
                    "mfu": batch * flops / s / peak if peak else float("nan"),
                    "mem": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
                }
            )
            print(f"{name} {loop}: {batch / s:.0f} images/s", flush=True)
    report(args, gpu, peak, rows)
    return 0


def report(args: argparse.Namespace, gpu: str, peak: float, rows: list[dict]) -> None:
    import torch

    print(
        f"\n{gpu} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s), torch {torch.__version__}, {args.img} px, bf16, "
        f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps"
    )
    print("\n| model | loop | batch | ms/step | images/s | model TFLOP/s | MFU | peak memory (GiB) | warm-up (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['loop']} | {r['batch']} | {r['s'] * 1e3:.1f} | {r['ips']:.0f} | {r['tflops']:.0f} "
            f"| {r['mfu']:.1%} | {r['mem']:.1f} | {r['warm']:.0f} |"
        )
    print()
    for r in rows:  # each compiled loop against the same loop eager; the engine eager against the plain loop
        same = f"{r['loop'].rsplit(' (', 1)[0]} (eager)"
        base = next(
            (b for b in rows if b["model"] == r["model"] and b["loop"] == same and b is not r),
            next(b for b in rows if b["model"] == r["model"] and b["loop"] == "plain PyTorch (eager)"),
        )
        if r is not base:
            print(
                f"- {r['model']}: {r['loop']} / {base['loop']} = {r['ips'] / base['ips']:.2f}x "
                f"(MFU {r['mfu']:.1%} vs {base['mfu']:.1%})"
            )
    for r in rows:
        if r["loop"].endswith("(eager)"):
            print(f"- {r['model']}: {r['loop']} MFU {r['mfu']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
