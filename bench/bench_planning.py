"""Planning a JFT-style manifest: Ray planning tasks against the in-process planner.

    .venv/bin/python bench/bench_planning.py [--lines 3000000] [--rounds 1] [--keep DIR]
                                             [--range-mb 16] [--modes in-process,ray-1,ray-2]
                                             [--address RAY_GCS]

Writes a JFT-style JSONL manifest (`--lines` lines of ~100 bytes: a path, 3-4 labels of
18,000 class names, an id), then plans it (shard_size 10,000, a 50,000 holdout (`--holdout`),
plans written to a local output) in a fresh driver process each time:
  1. the in-process planner (`planning.on_ray_bytes=0`), one core;
  2. Ray planning tasks with 1 and 2 tasks in flight (`planning.max_tasks`) on a local Ray
     cluster of 2 CPUs started here.
For each it prints records/s (planned records over the driver's wall time of `build_plan`,
Ray start excluded), records per CPU-second (the driver's, plus the Ray processes' while it
ran: tasks, raylet, GCS), the driver's peak RSS, the bytes the driver process wrote to disk
(/proc/self/io write_bytes: its spool and buckets, or only `_plan.json`) and the peak size of
its TMPDIR (the spool), then the ratios (targets: 2 tasks >= 1.8x 1 task; 1 task >= 1x the
in-process planner) and checks that the two Ray plans are byte-identical.
Run it with `--lines 30000000` by hand for the 30M figures (~3 GB of manifest, ~30 min).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 18_000
DRIVER = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from data_prep.config import PlanningConfig, PrepConfig
from data_prep.plan import build_plan
cfg = PrepConfig(source={source!r}, output={output!r}, shard_size=10000)
cfg.holdout.count = {holdout}
cfg.planning = PlanningConfig(on_ray_bytes={on_ray}, max_tasks={tasks},
                              range_bytes={range_bytes}, bucket_bytes={range_bytes})
if {tasks}:
    import ray
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
cpu = time.process_time()
start = time.perf_counter()
plan = build_plan(cfg)
seconds = time.perf_counter() - start
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({{"seconds": seconds, "records": sum(s.num_samples for s in plan.splits.values()),
                  "driver_cpu_s": time.process_time() - cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "write_bytes": int(io["write_bytes"])}}))
"""


def make_manifest(path: Path, lines: int, seed: int = 0) -> None:
    """JFT-style lines: `{"path": "jft/<dir>/<n>.jpg", "labels": ["c01234", ...], "id": ...}`."""
    rng = np.random.default_rng(seed)
    chunk = 200_000
    with open(path, "w") as f:
        for lo in range(0, lines, chunk):
            n = min(chunk, lines - lo)
            k = rng.integers(3, 5, n)
            labels = rng.integers(0, CLASSES, (n, 4))
            ids = rng.integers(0, 1 << 62, n)
            f.write(
                "".join(
                    f'{{"path":"jft/{(lo + i) % 4096:04d}/{lo + i:09d}.jpg","labels":['
                    + ",".join(f'"c{c:05d}"' for c in labels[i, : k[i]])
                    + f'],"id":"{ids[i]:016x}"}}\n'
                    for i in range(n)
                )
            )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def descendants_cpu() -> dict[int, float]:
    """CPU seconds so far of each process this one started, recursively (the Ray cluster's
    GCS, raylet and workers; the driver subprocess is measured by itself)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def run_driver(
    source: Path, output: Path, on_ray: int, tasks: int, range_bytes: int, env: dict, holdout: int = 50_000
) -> dict:
    """Plan in a fresh Python process; its figures, with the peak size of its TMPDIR and the
    CPU seconds the Ray cluster's processes used meanwhile (polled every 0.2 s, so that a
    worker that exits with the driver is counted up to its last poll)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-tmp-"))
    code = DRIVER.format(
        root=str(ROOT),
        source=str(source),
        output=str(output),
        on_ray=on_ray,
        tasks=tasks,
        range_bytes=range_bytes,
        holdout=holdout,
    )
    before = descendants_cpu()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=dict(env, TMPDIR=str(tmp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]
    last: dict[int, float] = {}

    def watch() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], dir_size(tmp))
            except FileNotFoundError:
                pass  # a file went away while being listed
            last.update(descendants_cpu())
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    time.sleep(0.5)
    last.update(descendants_cpu())
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"the planning driver failed (exit {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["tmpdir_peak_bytes"] = peak[0]
    ray_cpu = sum(v - before.get(pid, 0.0) for pid, v in last.items() if pid != proc.pid)
    result["cpu_s"] = result["driver_cpu_s"] + (ray_cpu if tasks else 0.0)
    return result


def plan_digest(output: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((output / "_plan").glob("*.jsonl")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", help="folder for the manifest (kept and reused)")
    parser.add_argument(
        "--range-mb",
        type=int,
        default=16,
        help="planning.range_bytes and bucket_bytes, MiB (enough ranges and "
        "buckets for 2 tasks to share evenly; the plan does not change)",
    )
    parser.add_argument(
        "--modes",
        default="in-process,ray-1,ray-2",
        help="which planners to run, of in-process, ray-1 and ray-2 (the 30M run by hand "
        "may take only ray-2: the others grow linearly and are measured at 3M)",
    )
    parser.add_argument("--holdout", type=int, default=50_000, help="records carved out for the holdout split")
    parser.add_argument(
        "--address",
        help="plan on this running Ray cluster instead of starting one (its processes' CPU is then not counted)",
    )
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"jft-{args.lines}.jsonl"
    if not source.exists():
        t = time.perf_counter()
        make_manifest(source, args.lines)
        print(f"wrote {source} ({source.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    import ray

    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    known = {"in-process": ("in-process", 0, 0), "ray-1": ("ray, 1 task", 1, 1), "ray-2": ("ray, 2 tasks", 1, 2)}
    unknown = set(args.modes.split(",")) - set(known)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    modes = [known[m] for m in args.modes.split(",")]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in modes}
    digests = set()
    try:
        for _ in range(args.rounds):
            for name, on_ray, tasks in modes:
                output = work / "out"
                shutil.rmtree(output, ignore_errors=True)
                load = os.getloadavg()[0]
                r = run_driver(source, output, on_ray, tasks, args.range_mb << 20, env, args.holdout)
                r["load"] = load
                rows[name].append(r)
                if on_ray:
                    digests.add(plan_digest(output))
                print(
                    f"{name:>13}: {r['records'] / r['seconds']:>9,.0f} records/s  "
                    f"{r['records'] / r['cpu_s']:>9,.0f} records/CPU-s  "
                    f"{r['seconds']:6.1f} s  peak RSS {r['rss_mb']:5.0f} MB  "
                    f"driver wrote {r['write_bytes'] / 1e6:8.1f} MB  "
                    f"TMPDIR peak {r['tmpdir_peak_bytes'] / 1e6:8.1f} MB  load {load:.1f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
        shutil.rmtree(work / "out", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    best = {name: max(r["records"] / r["seconds"] for r in rs) for name, rs in rows.items()}
    per_cpu = {name: max(r["records"] / r["cpu_s"] for r in rs) for name, rs in rows.items()}
    print(
        f"\n{args.lines:,} lines, best of {args.rounds}: "
        + ", ".join(f"{k} {v:,.0f}/s ({per_cpu[k]:,.0f}/CPU-s)" for k, v in best.items())
    )
    if {"ray, 1 task", "ray, 2 tasks"} <= set(best):
        print(f"ray 2 tasks / 1 task: {best['ray, 2 tasks'] / best['ray, 1 task']:.2f}x wall (target >= 1.8)")
    if {"ray, 1 task", "in-process"} <= set(best):
        print(
            f"ray 1 task / in-process: {best['ray, 1 task'] / best['in-process']:.2f}x wall, "
            f"{per_cpu['ray, 1 task'] / per_cpu['in-process']:.2f}x per CPU-second (target >= 1)"
        )
    if len(rows) - ("in-process" in rows) > 1:
        print(f"ray plans byte-identical across task counts: {len(digests) == 1}")


if __name__ == "__main__":
    main()
