"""Memory per rank of ViT-B/16 model states under ZeRO 1, 2 and 3, measured and predicted.

    .venv/bin/python bench/bench_zero_memory.py [--model vit_b16] [--nproc 2] [--stages 1,2,3]

For each stage a fresh torchrun group of ``--nproc`` CPU ranks (gloo, DS_ACCELERATOR=cpu)
builds the engine with ``pipeline.recipe.build_engine`` (bf16, AdamW, micro batch 2 at
224 px) and takes two optimizer steps. Each rank measures its model states after the last
backward pass (gradients reduced, activations freed, before the optimizer step) two ways:

  * live tensor storage: every distinct storage reachable from Python objects (gc) or held
    by the engine's ZeRO optimizer, minus those alive before the engine was built, split
    into module weights, fp32 master weights, Adam moments, gradients, reduce buckets and
    the rest;
  * RSS delta: the larger of process RSS there and after the step, minus RSS just before
    the engine was built (imports, process group and the batch already in place), and the
    peak RSS (ru_maxrss, activations included).

Next to them: the ZeRO paper's mixed-precision arithmetic for Ψ params on N ranks (stage 1
4Ψ + 12Ψ/N bytes, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N) and DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs_all_live``, ``estimate_zero3_..._all_live``;
there is none for stage 1). The table ends with measured / arithmetic ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: result file of one torchrun group
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def storages() -> dict[int, int]:
    """data_ptr -> bytes of every distinct tensor storage reachable from Python objects."""
    import torch

    out = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                s = obj.untyped_storage()
                if s.nbytes():
                    out[s.data_ptr()] = s.nbytes()
        except Exception:  # meta tensors, odd subclasses: not memory
            continue
    return out


def flatten(x) -> list:
    """The tensors in nested lists, tuples and dict values."""
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in flatten(item)]
    return []


def model_state_tensors(engine) -> dict[str, list]:
    """The tensors DeepSpeed holds for the model states, by kind (ZeRO 1/2 and 3 name them differently)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    params = list(engine.module.parameters())
    master = list(
        getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
    )
    grads = [t for t in [p.grad for p in params + master] if t is not None]
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:  # ZeRO-3
        grads.append(opt.grad_partitions_flat_buffer)
    grads += flatten(getattr(opt, "averaged_gradients", None))  # ZeRO-1/2 reduced partitions
    buckets = flatten([getattr(b, "buffer", None) for b in (getattr(opt, "ipg_buckets", None) or {}).values()])
    buckets += flatten(getattr(opt, "ipg_buffer", None))
    return {
        "weights": [getattr(p, "ds_tensor", p) for p in params],
        "fp32_master": master,
        "adam_moments": [
            v for st in base.state.values() for v in st.values() if hasattr(v, "untyped_storage") and v.numel() > 1
        ],
        "gradients": grads,
        "buckets": buckets,
    }


def measure(engine, before: dict[int, int]) -> dict[str, float]:
    """MB of live storage added since ``before``, split by kind ("other": not named by DeepSpeed)."""
    total = storages()
    out, counted = {}, set(before)
    for kind, tensors in model_state_tensors(engine).items():
        sizes = {}
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in counted:
                sizes[st.data_ptr()] = st.nbytes()
        counted |= set(sizes)
        total.update(sizes)
        out[kind] = sum(sizes.values()) / MB
    out["storage_delta"] = sum(v for k, v in total.items() if k not in before) / MB
    out["other"] = out["storage_delta"] - sum(out[k] for k in KINDS)
    return out


KINDS = ("weights", "fp32_master", "adam_moments", "gradients", "buckets")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.data import to_model_input
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    rank, world, device = dist_setup()
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            f"data.micro_batch_size={args.micro}",
            f"train.global_batch_size={args.micro * world}",
            "train.steps=100",
            "optim.warmup_steps=10",
            f"deepspeed.zero_stage={args.stage}",
            "train.precision=bf16",
            "data.train=unused",
            f"ray.num_workers={world}",
        ],
    )
    size = 224
    images = torch.randint(0, 256, (args.micro, size, size, 3), dtype=torch.uint8)
    targets = torch.zeros(args.micro, args.classes)
    targets[:, rank] = 1.0
    gc.collect()
    rss0, store0 = rss_mb(), storages()
    engine, _ = build_engine(cfg, args.classes, cfg.train.steps, world, device)
    gc.collect()
    rss_built = rss_mb()
    for step in range(args.steps):
        loss = loss_fn(engine(to_model_input(images, torch.bfloat16)), targets, "sigmoid")
        engine.backward(loss)
        del loss
        if step == args.steps - 1:  # gradients reduced, activations freed: every model state is live
            gc.collect()
            states, rss_grads = measure(engine, store0), rss_mb()
        engine.step()
    gc.collect()
    rss1 = rss_mb()
    mine = {
        "rank": rank,
        "rss_before": rss0,
        "rss_built": rss_built,
        "rss_with_grads": rss_grads,
        "rss_after": rss1,
        "rss_delta": max(rss_grads, rss1) - rss0,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        **states,
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def run_stage(args: argparse.Namespace, stage: int) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            f"--master_port={free_port()}",
            str(Path(__file__).resolve()),
            "--model",
            args.model,
            "--classes",
            str(args.classes),
            "--micro",
            str(args.micro),
            "--steps",
            str(args.steps),
            "--stage",
            str(stage),
            "--worker",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def deepspeed_estimates(args: argparse.Namespace) -> tuple[dict[int, float], str]:
    """Per-rank model-state bytes DeepSpeed predicts (no offload), and its printed tables."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_live,
    )
    from deepspeed.runtime.zero.stage3 import model_to_params as z3_params
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_live,
    )

    from pipeline.model import create_model

    model = create_model(args.model, num_classes=args.classes)  # on CPU: the estimators tell params apart by data_ptr
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=args.nproc)
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=args.nproc)
    total, largest = z3_params(model)
    _, z2 = estimate_zero2_model_states_mem_needs(total, args.nproc, 1, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(
        total, largest, args.nproc, 1, cpu_offload=False, cpu_offload_params=False
    )
    return {2: z2 / MB, 3: z3 / MB}, printed.getvalue()


def arithmetic(stage: int, psi: int, n: int) -> float:
    """The ZeRO paper's model-state bytes per rank with mixed-precision Adam (K = 12)."""
    return {1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage] / MB


def report(args: argparse.Namespace, results: dict[int, list[dict]]) -> None:
    import platform

    import deepspeed
    import torch

    estimates, printed = deepspeed_estimates(args)
    psi = results[min(results)][0]["params"]
    n = args.nproc
    print(
        f"\n{args.model} ({psi / 1e6:.1f}M params, {args.classes} classes) on {n} CPU ranks, bf16, micro batch "
        f"{args.micro} "
        f"at 224 px, {args.steps} steps; DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}; "
        "MB = 1e6 bytes, per rank (mean of ranks; max in brackets)\n"
    )
    print(
        "| ZeRO | arithmetic | DeepSpeed estimate | live storage | = weights + fp32 master + Adam moments + grads + "
        "buckets + other "
        "| RSS delta | peak RSS | storage / arithmetic | RSS / arithmetic |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    ratios = []
    for stage, ranks in sorted(results.items()):
        mean = {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0] if isinstance(ranks[0][k], (int, float))}
        top = {k: max(r[k] for r in ranks) for k in mean}
        a = arithmetic(stage, psi, n)
        est = f"{estimates[stage]:.0f}" if stage in estimates else "n/a (none for stage 1)"
        parts = " + ".join(f"{mean[k]:.0f}" for k in (*KINDS, "other"))
        print(
            f"| {stage} | {a:.0f} | {est} | {mean['storage_delta']:.0f} ({top['storage_delta']:.0f}) | {parts} "
            f"| {mean['rss_delta']:.0f} ({top['rss_delta']:.0f}) | {mean['peak_rss']:.0f} ({top['peak_rss']:.0f}) "
            f"| {mean['storage_delta'] / a:.2f} | {mean['rss_delta'] / a:.2f} |"
        )
        ratios.append((stage, mean["storage_delta"] / a, mean["rss_delta"] / a))
    print()
    for stage, s, r in ratios:
        print(f"- ZeRO-{stage}: live model-state storage / arithmetic = {s:.2f}x; RSS delta / arithmetic = {r:.2f}x")
    print("\nDeepSpeed's estimators, as printed:\n" + printed.rstrip())


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    for stage in (int(s) for s in args.stages.split(",")):
        results[stage] = run_stage(args, stage)
        print(
            f"ZeRO-{stage}: "
            + "; ".join(
                f"rank {r['rank']} storage +{r['storage_delta']:.0f} MB, RSS +{r['rss_delta']:.0f} MB, "
                f"peak {r['peak_rss']:.0f} MB"
                for r in results[stage]
            ),
            flush=True,
        )
    report(args, results)


if __name__ == "__main__":
    main()
