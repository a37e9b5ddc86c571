"""Data-prep throughput against the bare Pillow loop, and the planner's peak memory.

    .venv/bin/python bench/bench_data_prep.py [--images 2000] [--rounds 3]

Makes a few thousand realistic JPEGs (500x375 / 375x500, quality 90, smooth colour fields,
gradients and sensor-like noise), then, after a warm-up round, times on the same files:
  1. the bare loop: read, Pillow decode, RGB, resize shorter side to 256, JPEG encode;
  2. data_prep's `write_shard` in this process, one core, with the same transform;
  3. `run_prep` on a local Ray cluster with 1 and with 2 shard tasks in flight.
It prints a table ending with the ratios (targets: in-process >= 0.85x the bare loop per
core; 2 workers >= 1.8x one), then the peak RSS of `python -m data_prep --dry-run` on a
1M-entry JSONL manifest (the driver's planning memory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.config import ImageConfig, PrepConfig  # noqa: E402
from data_prep.plan import build_plan  # noqa: E402
from data_prep.process import target_size  # noqa: E402
from data_prep.shard import write_shard  # noqa: E402

SIZE = 256
QUALITY = 90


class Row(NamedTuple):
    name: str
    wall: float  # images per wall-clock second
    cpu: float  # images per CPU second (of this process, or of the Ray shard tasks)
    cores: int


def make_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs in 10 class folders that compress like photos (~30-60 KB at q90)."""
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        cls = root / f"class{i % 10:02d}"
        cls.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float32)
        gx, gy = rng.uniform(-0.2, 0.2, 2)
        field += (gx * xx + gy * yy)[..., None]
        detail = np.asarray(
            Image.fromarray(rng.integers(0, 256, (94, 125), dtype=np.uint8)).resize(
                (500, 375), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        field += (detail[..., None] - 128) * 0.25 + rng.normal(0, 4, field.shape)
        img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        if i % 4 == 3:
            img = img.transpose(Image.Transpose.ROTATE_90)
        path = cls / f"img_{i:06d}.jpg"
        img.save(path, quality=QUALITY)
        paths.append(path)
    return paths


def bare_loop(paths: list[Path]) -> None:
    for p in paths:
        data = p.read_bytes()
        img = Image.open(io.BytesIO(data))
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = target_size(img.width, img.height, "shorter", SIZE)
        if size is not None:
            img = img.resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=QUALITY)


def config(source: Path, output: Path, n: int, in_flight: int = 0) -> PrepConfig:
    return PrepConfig(
        source=str(source),
        output=str(output),
        shard_size=max(1, n // 8),
        image=ImageConfig(resize_mode="shorter", size=SIZE, quality=QUALITY),
        max_in_flight=in_flight,
        io_threads=4,
    )


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[tuple[float, float, Any]]]:
    """Run each function once to warm up, then `rounds` times in turn (A B A B ...), so that
    drift in a shared machine's load hits all of them alike. Returns (wall s, CPU s of this
    process, result) per round."""
    for fn in fns.values():
        fn()
    out: dict[str, list[tuple[float, float, Any]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            result = fn()
            out[name].append((time.perf_counter() - t, time.process_time() - c, result))
    return out


def bench_throughput(work: Path, n: int, rounds: int) -> tuple[list[Row], dict[str, float]]:
    src = work / "src"
    t = time.perf_counter()
    paths = make_images(src, n)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"made {n} JPEGs ({mb / n * 1000:.0f} KB each) in {time.perf_counter() - t:.0f}s", flush=True)
    cfg = config(src, work / "inproc", n)
    plan = build_plan(cfg)

    def in_process() -> None:
        for split, index in plan.shards():
            write_shard(cfg, split, index)

    local = interleaved({"bare": lambda: bare_loop(paths), "ours": in_process}, rounds)
    median = statistics.median
    rows = [
        Row(
            "bare Pillow loop",
            n / median(w for w, _, _ in local["bare"]),
            n / median(c for _, c, _ in local["bare"]),
            1,
        ),
        Row(
            "data_prep write_shard, in-process",
            n / median(w for w, _, _ in local["ours"]),
            n / median(c for _, c, _ in local["ours"]),
            1,
        ),
    ]
    ratios = {
        "inproc_wall": median(b[0] / o[0] for b, o in zip(local["bare"], local["ours"], strict=True)),
        "inproc_cpu": median(b[1] / o[1] for b, o in zip(local["bare"], local["ours"], strict=True)),
    }
    print(f"in-process: {rows[1].wall:.1f} img/s vs bare {rows[0].wall:.1f}", flush=True)

    import ray

    from data_prep.job import run_prep

    runs = iter(range(10**6))

    def ray_run(workers: int) -> tuple[float, float, float]:
        """Images per wall second of the shard phase and per CPU second of the shard tasks,
        and how busy the workers were (task seconds / (workers x shard-phase seconds))."""
        out = work / f"ray{workers}-{next(runs)}"
        rate = run_prep(config(src, out, n, workers))["images_per_second"]
        stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
        cpu = sum(s["cpu_seconds"] for s in stats)
        busy = sum(s["seconds"] for s in stats) / (workers * n / rate)
        return rate, n / cpu, busy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = interleaved({"1": lambda: ray_run(1), "2": lambda: ray_run(2)}, rounds)
    finally:
        ray.shutdown()
    for workers in (1, 2):
        rate = median(r[0] for _, _, r in remote[str(workers)])
        cpu = median(r[1] for _, _, r in remote[str(workers)])
        rows.append(Row(f"data_prep run_prep, Ray, {workers} worker(s)", rate, cpu, workers))
    pairs = list(zip(remote["1"], remote["2"], strict=True))
    ratios["ray2_over_ray1"] = median(b[2][0] / a[2][0] for a, b in pairs)
    ratios["ray2_over_ray1_cpu"] = median(b[2][1] / a[2][1] for a, b in pairs)
    ratios["busy1"] = median(a[2][2] for a, _ in pairs)
    ratios["busy2"] = median(b[2][2] for _, b in pairs)
    ratios["ray1_over_bare"] = rows[2].wall / rows[0].wall
    return rows, ratios


def bench_planner_rss(work: Path, entries: int) -> tuple[float, float, float]:
    """Peak RSS (MB) of a `--dry-run` on an `entries`-line manifest, of the bare imports,
    and the dry run's seconds."""
    manifest = work / "manifest.jsonl"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21841, entries)
    with open(manifest, "w") as f:
        for i, label in enumerate(labels.tolist()):
            f.write(
                json.dumps({"path": f"n{label:08d}/n{label:08d}_{i}.JPEG", "label": f"n{label:08d}", "size": 110_000})
                + "\n"
            )
    repo = Path(__file__).resolve().parents[1]

    def peak(cmd: list[str]) -> tuple[float, float]:
        t = time.perf_counter()
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: measure in a fresh shell.
        probe = (
            "import resource,subprocess,sys;subprocess.run(sys.argv[1:],check=True,"
            "stdout=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, *cmd], cwd=repo, check=True, capture_output=True, text=True
        ).stdout
        return int(out.split()[-1]) / 1024, time.perf_counter() - t

    dry, seconds = peak(
        [sys.executable, "-m", "data_prep", f"source={manifest}", f"output={work / 'unused'}", "--dry-run"]
    )
    imports, _ = peak([sys.executable, "-c", "import data_prep.plan, data_prep.__main__"])
    return dry, imports, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-entries", type=int, default=1_000_000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_data_prep-") as tmp:
        work = Path(tmp)
        rows, ratios = bench_throughput(work, args.images, args.rounds)
        rss = bench_planner_rss(work, args.rss_entries) if args.rss_entries else None
    print()
    print(
        f"{args.images} JPEGs 500x375 q{QUALITY} -> shorter side {SIZE}, JPEG q{QUALITY}; "
        f"median of {args.rounds} interleaved rounds after a warm-up; {os.cpu_count()} CPU "
        f"cores ({platform.machine()}); 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print()
    print("| run | images/s (wall) | images per CPU-second | workers | images/s per core (wall) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.name} | {r.wall:.1f} | {r.cpu:.1f} | {r.cores} | {r.wall / r.cores:.1f} |")
    print()
    print(
        f"- in-process data_prep / bare loop, one core: {ratios['inproc_wall']:.2f}x wall, "
        f"{ratios['inproc_cpu']:.2f}x per CPU-second (target >= 0.85)"
    )
    print(f"- Ray 1 worker / bare loop: {ratios['ray1_over_bare']:.2f}x wall")
    print(
        f"- Ray 2 workers / 1 worker: {ratios['ray2_over_ray1']:.2f}x wall (target >= 1.8); "
        f"images per task CPU-second {ratios['ray2_over_ray1_cpu']:.2f}x; workers busy "
        f"{ratios['busy1']:.0%} (1) and {ratios['busy2']:.0%} (2) of the shard phase"
    )
    if rss:
        print(
            f"- planner peak RSS, --dry-run on a {args.rss_entries:,}-entry manifest: "
            f"{rss[0]:.0f} MB (the interpreter and imports alone: {rss[1]:.0f} MB); "
            f"{rss[2]:.0f} s"
        )


if __name__ == "__main__":
    main()
