"""What checksumming a checkpoint costs: DeepSpeed's own save of a ViT-B/16 ZeRO-2 engine
(bf16, AdamW, one CPU rank) against the sha256 manifest that ``pipeline.checkpoint.save``
adds to it, and the check a resume makes, side by side in one process.

    .venv/bin/python bench/bench_checkpoint.py [--model vit_b16] [--rounds 3] [--dir /tmp/x]

Each round saves the engine with ``engine.save_checkpoint`` (the baseline: what a save costs
without checksums) into a fresh tag, then hashes that tag's files (``checkpoint.manifest``)
and checks them (``checkpoint.check_files``), as save and load do. The table ends with the
manifest's share of the save. On N ranks per host each rank hashes 1/N of its host's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the tags (default: a temp dir)")
    args = p.parse_args()

    import functools

    import torch

    from pipeline import checkpoint
    from pipeline.config import load_config
    from pipeline.engine import dist_setup, loss_fn
    from pipeline.recipe import build_engine

    _, _, device = dist_setup(standalone=True)
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            "data.train=unused",
            "train.steps=10",
            "train.global_batch_size=2",
            "data.micro_batch_size=2",
            "ray.num_workers=1",
            "deepspeed.zero_stage=2",
            "train.precision=bf16",
        ],
    )
    engine, _ = build_engine(cfg, 1000, 10, 1, device)
    size = engine.module.spec.img_size
    x = torch.randn(2, 3, size, size, dtype=torch.bfloat16)
    y = torch.nn.functional.one_hot(torch.tensor([1, 2]), 1000).float()
    engine.backward(functools.partial(loss_fn, kind="softmax")(engine(x), y))
    engine.step()  # Adam's moments exist from the first step on

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    for r in range(args.rounds + 1):  # round 0 warms the page cache and DeepSpeed's code paths
        tag = f"step_{r:08d}"
        t0 = time.perf_counter()
        engine.save_checkpoint(str(root), tag=tag, client_state={"universal_checkpoint_info": {}})
        t1 = time.perf_counter()
        files = checkpoint.manifest(root / tag)
        t2 = time.perf_counter()
        (root / tag / checkpoint.META_FILE).write_text(json.dumps({"files": files}))
        (root / tag / checkpoint.MARKER).write_text("")
        t3 = time.perf_counter()
        checkpoint.check_files(root / tag)
        t4 = time.perf_counter()
        nbytes = sum(e["size"] for e in files.values())
        if r:
            rows.append((t1 - t0, t2 - t1, t4 - t3, nbytes))
        shutil.rmtree(root / tag)
    print(f"{args.model} ZeRO-2 bf16, 1 rank, {rows[0][3] / 1e9:.2f} GB a tag, {len(rows)} rounds")
    print(f"{'round':>5} {'save s':>8} {'manifest s':>11} {'check s':>8} {'manifest/save':>14} {'GB/s':>6}")
    for i, (save, man, check, nbytes) in enumerate(rows, 1):
        print(f"{i:>5} {save:8.2f} {man:11.2f} {check:8.2f} {man / save:14.1%} {nbytes / man / 1e9:6.2f}")
    med = sorted(rows, key=lambda t: t[1] / t[0])[len(rows) // 2]
    print(
        f"median: the manifest adds {med[1]:.2f} s to a {med[0]:.2f} s save ({med[1] / med[0]:.1%}); "
        f"a resume checks in {med[2]:.2f} s"
    )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
