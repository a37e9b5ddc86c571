"""Compiled (``train.compile``) vs eager train step of the pipeline's engine, side by side on CPU.

    .venv/bin/python bench/bench_compile.py [--models vit_demo,vit_b16] [--img 32,224]
        [--micro 64,4] [--precisions fp32,bf16] [--zero 2] [--rounds 3] [--steps 3] [--threads 1]
        [--loop engine|plain]

One process, one rank (a one-rank gloo group, DS_ACCELERATOR=cpu, ``--threads`` torch threads).
For each model and precision the same engine (``pipeline.recipe.build_engine``: ZeRO
``--zero``, AdamW, clip 1, the paper's sigmoid loss) is built twice from one seed, eager and
with ``train.compile.enabled=true`` (each block's forward compiled by inductor,
``pipeline.compile``), and both train on the same in-memory batches. The first step of each
is timed alone (the compiled one includes compiling, from dynamo's callbacks), then each
round times ``--steps`` steps of each, order alternating. ``--loop plain`` times a plain PyTorch
loop instead of the engine (the model, the sigmoid loss, clip 1, torch's AdamW over the
pipeline's parameter groups; bf16 by autocast), as the issue's first quick measurement did.
The table ends with the ratio compiled / eager throughput per CPU-second (steady on a shared
machine; the wall-time ratio beside it) and the loss of both after the last step.
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_demo,vit_b16")
    p.add_argument("--img", default="32,224", help="input resolution, one per model")
    p.add_argument("--micro", default="64,4", help="images per step, one per model")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--mode", default="default", help="train.compile.mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loop", choices=("engine", "plain"), default="engine")
    return p.parse_args(argv)


def plain_step(name: str, img: int, precision: str, compiled: bool, args: argparse.Namespace):
    """gpu_throughput.py's plain PyTorch step on the CPU: no DeepSpeed, no ZeRO bookkeeping."""
    import torch

    from bench.gpu_throughput import plain_step as gpu_plain_step

    step = gpu_plain_step(name, args, torch.device("cpu"), compiled, precision=precision, img=img, mode=args.mode)
    return lambda images, targets: step(images, targets).item()


def make_step(name: str, img: int, micro: int, precision: str, compiled: bool, args: argparse.Namespace):
    import torch

    if args.loop == "plain":
        return plain_step(name, img, precision, compiled, args)

    from pipeline.config import load_config
    from pipeline.data import to_model_input
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    _, world, device = dist_setup(standalone=True)
    cfg = load_config(
        None,
        [
            f"model.name={name}",
            f"model.img_size={img}",
            f"data.micro_batch_size={micro}",
            f"train.global_batch_size={micro}",
            "train.steps=100000",
            "optim.warmup_steps=10",
            f"deepspeed.zero_stage={args.zero}",
            f"train.precision={precision}",
            "data.train=unused",
            "ray.num_workers=1",
            f"train.compile.enabled={compiled}",
            f"train.compile.mode={args.mode}",
        ],
    )
    engine, _ = build_engine(cfg, args.classes, cfg.train.steps, world, device)
    engine.train()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]

    def step(images, targets):
        loss = loss_fn(engine(to_model_input(images, dtype)), targets, "sigmoid")
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def batches(img: int, micro: int, classes: int, n: int = 2):
    import torch

    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (micro, img, img, 3), dtype=torch.uint8, generator=g)
        targets = torch.zeros(micro, classes)
        targets[torch.arange(micro), torch.randint(0, classes, (micro,), generator=g)] = 1.0
        out.append((images, targets))
    return out


def timed(step, data, n: int) -> tuple[float, float, float]:
    """(wall s/step, CPU s/step, last loss) over ``n`` steps."""
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        loss = step(*data[i % len(data)])
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n, loss


def measure(name: str, img: int, micro: int, precision: str, args) -> dict:
    import torch

    from pipeline.compile import CompileWatch

    data = batches(img, micro, args.classes)
    steps, first = {}, {}
    watch = CompileWatch(max_recompiles=100, quiet=True)
    for label in ("eager", "compiled"):
        torch.manual_seed(0)
        steps[label] = make_step(name, img, micro, precision, label == "compiled", args)
        seconds0 = watch.seconds
        wall, cpu, _ = timed(steps[label], data, 1)
        first[label] = {"wall": wall, "cpu": cpu, "compile_s": watch.seconds - seconds0}
    watch.close()
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for label in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            times[label].append(timed(steps[label], data, args.steps))
        print(
            f"[{name} {precision}] round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1][0]:.3f}s/step" for k, v in times.items()),
            flush=True,
        )
    return {"model": name, "img": img, "micro": micro, "precision": precision, "times": times, "first": first}


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    import platform

    import deepspeed
    import torch

    loop = "a plain PyTorch loop" if args.loop == "plain" else f"DeepSpeed {deepspeed.__version__} ZeRO-{args.zero}"
    print(
        f"\ntorch {torch.__version__}, {loop}, 1 rank, {args.threads} "
        f"thread(s), compile mode {args.mode}; median of {args.rounds} rounds x {args.steps} steps after the first "
        "step; "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        "\n| model | px | batch | precision | loop | s/step (median) | CPU s/step | images/CPU-s | first step s "
        "(compiling s) |"
    )
    print("|---|---:|---:|---|---|---:|---:|---:|---:|")
    lines = []
    for row in rows:
        med = {
            k: (statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v))
            for k, v in row["times"].items()
        }
        for label, (wall, cpu) in med.items():
            f = row["first"][label]
            print(
                f"| {row['model']} | {row['img']} | {row['micro']} | {row['precision']} | {label} | {wall:.3f} | "
                f"{cpu:.3f} "
                f"| {row['micro'] / cpu:.1f} | {f['wall']:.1f} ({f['compile_s']:.1f}) |"
            )
        losses = {k: v[-1][2] for k, v in row["times"].items()}
        lines.append(
            f"- {row['model']} {row['precision']}: compiled / eager = {med['eager'][1] / med['compiled'][1]:.2f}x per "
            f"CPU-second, {med['eager'][0] / med['compiled'][0]:.2f}x wall; first step "
            f"{row['first']['compiled']['wall']:.1f} s "
            f"compiled vs {row['first']['eager']['wall']:.1f} s eager; last loss {losses['compiled']:.5f} vs "
            f"{losses['eager']:.5f}"
        )
    print("\n" + "\n".join(lines))


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    models, imgs, micros = (
        args.models.split(","),
        [int(v) for v in args.img.split(",")],
        [int(v) for v in args.micro.split(",")],
    )
    for name, img, micro in zip(models, imgs, micros, strict=True):
        for precision in args.precisions.split(","):
            rows.append(measure(name, img, micro, precision, args))
    report(args, rows)


if __name__ == "__main__":
    main()
