"""The planner (pipeline.plan) against measurements on this CPU: activation peaks and step times.

    .venv/bin/python bench/bench_train_plan.py memory [--cases vit_demo:64,vit_b16:4:ckpt,...] [--precision fp32]
    .venv/bin/python bench/bench_train_plan.py time [--calibrate vit_demo:64,vit_b16:2] \
        [--predict vit_demo:128,vit_b16:4,vit_b32:8] [--write]

``memory``: each case in a fresh process (``MALLOC_MMAP_THRESHOLD_=64KiB`` so freed tensors
go back to the system at once): the model in ``--precision`` (fp32 by default: bf16 is
emulated on CPUs without avx512_bf16; the plan's formula takes the element size), one warm-up
forward + backward so the gradients exist, then the peak RSS (VmHWM, reset through
/proc/self/clear_refs) of a second forward + backward minus the RSS before it: the
activation peak, next to ``pipeline.plan.activation_bytes``.

``time``: one process, one thread (CPU seconds per step are steady on a shared machine,
wall seconds are not): forward, backward and an AdamW step of the model, median of
``--rounds`` after a warm-up. The ``--calibrate`` cases give model-FLOP/s per thread (the
plan's CPU rate, by width); each ``--predict`` case is predicted from the calibrated
case of the nearest width and compared. ``--write`` stores the rates in
bench/train_plan_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLASSES = 1000
DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def cases(text: str) -> list[tuple[str, int, bool]]:
    """ "model:micro[:ckpt]" items (ckpt: activation checkpointing on)."""
    return [(c.split(":")[0], int(c.split(":")[1]), c.endswith(":ckpt")) for c in text.split(",") if c]


def build(name: str, precision: str):
    import torch

    from pipeline.model import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=CLASSES).to(getattr(torch, DTYPE[precision])).train()


def batch(model, micro: int):
    import torch

    s = model.spec.img_size
    dtype = next(model.parameters()).dtype
    return torch.randn(micro, 3, s, s, dtype=dtype), torch.randint(0, CLASSES, (micro,))


def fwd_bwd(model, x, y) -> None:
    import torch.nn.functional as F

    F.cross_entropy(model(x).float(), y).backward()


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_worker(name: str, micro: int, ckpt: bool, precision: str) -> dict:
    import torch

    torch.set_num_threads(1)
    model = build(name, precision)
    model.grad_checkpointing = ckpt
    x, y = batch(model, micro)
    fwd_bwd(model, x, y)  # gradients allocated; later backwards add into them
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    fwd_bwd(model, x, y)
    return {"model": name, "micro": micro, "peak_delta_mb": (status_kib("VmHWM") - before) * 1024 / 1e6}


def memory(args) -> None:
    from pipeline.model import get_spec
    from pipeline.plan import activation_bytes

    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    print(f"load average before: {os.getloadavg()}; {args.precision}")
    print(
        "| model | micro-batch | activation checkpointing | measured peak delta (MB) | plan.activation_bytes (MB) | "
        "plan / measured |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name, micro, ckpt in cases(args.cases):
        out = subprocess.run(
            [sys.executable, __file__, "memory-worker", f"{name}:{micro}" + (":ckpt" if ckpt else ""), args.precision],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        pred = activation_bytes(get_spec(name), micro, CLASSES, precision=args.precision, recompute=ckpt) / 1e6
        print(
            f"| {name} | {micro} | {'on' if ckpt else 'off'} | {r['peak_delta_mb']:.0f} | {pred:.0f} | "
            f"{pred / r['peak_delta_mb']:.2f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


def step_cpu_seconds(name: str, micro: int, rounds: int, precision: str) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of one training step."""
    import torch

    model = build(name, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch(model, micro)
    cpu, wall = [], []
    for i in range(rounds + 1):
        c0, w0 = time.thread_time(), time.perf_counter()
        fwd_bwd(model, x, y)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if i:  # the first is the warm-up
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def timing(args) -> None:
    import torch

    from pipeline.model import get_spec
    from pipeline.plan import train_flops

    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    rates = []
    print(
        "| role | model | micro-batch | CPU s/step | wall s/step | model GFLOP per CPU-s | predicted CPU s/step | "
        "predicted / measured |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, micro, _ in cases(args.calibrate):
        cpu, wall = step_cpu_seconds(name, micro, args.rounds, args.precision)
        spec = get_spec(name)
        rate = train_flops(spec, CLASSES) * micro / cpu / 1e9
        rates.append({"model": name, "width": spec.width, "micro_batch": micro, "gflops_per_thread": round(rate, 2)})
        print(f"| calibrate | {name} | {micro} | {cpu:.3f} | {wall:.3f} | {rate:.1f} | | |", flush=True)
    for name, micro, _ in cases(args.predict):
        spec = get_spec(name)
        near = min(rates, key=lambda r: abs(r["width"] - spec.width))
        pred = train_flops(spec, CLASSES) * micro / (near["gflops_per_thread"] * 1e9)
        cpu, wall = step_cpu_seconds(name, micro, args.rounds, args.precision)
        print(
            f"| predict (rate of {near['model']}) | {name} | {micro} | {cpu:.3f} | {wall:.3f} | "
            f"{train_flops(spec, CLASSES) * micro / cpu / 1e9:.1f} | {pred:.3f} | {pred / cpu:.2f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")
    if args.write:
        path = ROOT / "bench" / "train_plan_calibration.json"
        cal = json.loads(path.read_text()) if path.is_file() else {}
        cal["cpu"] = {
            "rates": rates,
            "source": f"bench/bench_train_plan.py time, {time.strftime('%Y-%m-%d')}, {args.precision}, 1 thread, "
            f"load {os.getloadavg()[0]:.1f} (bench/RESULTS.md)",
        }
        path.write_text(json.dumps(cal, indent=1) + "\n")
        print(f"wrote {path}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "memory-worker":
        print(json.dumps(memory_worker(*cases(sys.argv[2])[0], sys.argv[3])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--cases", default="vit_demo:64,vit_demo:128,vit_b16:2,vit_b16:4,vit_demo:128:ckpt,vit_b16:4:ckpt")
    t = sub.add_parser("time")
    t.add_argument("--calibrate", default="vit_demo:64,vit_b16:2")
    t.add_argument("--predict", default="vit_demo:128,vit_b16:4,vit_b32:8")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument(
        "--write", action="store_true", help="store the calibrated rates in bench/train_plan_calibration.json"
    )
    for sp in (m, t):  # bf16 is emulated, and slow, on CPUs without avx512_bf16/AMX
        sp.add_argument("--precision", choices=sorted(DTYPE), default="fp32")
    args = p.parse_args()
    memory(args) if args.mode == "memory" else timing(args)


if __name__ == "__main__":
    main()
