"""Plain vs AugReg recipe on the demo, 3 seeds: digits few-shot of the raw and the EMA weights.

For each seed and recipe, pre-trains the demo ViT on the glyph corpus with the real training
loop (``pipeline.train`` under torchrun, 2 CPU ranks, DeepSpeed ZeRO-2, bf16), then runs the
few-shot evaluator (``pipeline.evaluate.runner.evaluate_checkpoint``) on the final checkpoint,
which evaluates the raw weights and the EMA weights as separate variants. Prints a table of
digits k-shot mean ± std over the seeds and writes the per-run figures as JSON.

    nice -n 10 .venv/bin/python bench/augreg_compare.py --steps 200 --out runs/augreg_compare

Recipes: ``plain`` = aug preset none, no stochastic depth; ``augreg`` = ``--preset`` (default
light2: RandAugment(2, 10), mixup 0.2) plus stochastic depth ``--drop-path``. Both keep an EMA
(``--ema-decay`` with warmup: 0.9999 would not move in a few hundred steps).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "configs" / "experiment" / "demo.yaml"


def prepare(shared: Path) -> None:
    """The demo corpora and their shards, once (pipeline.run's own data step)."""
    from pipeline.config import load_config
    from pipeline.run import prepare_data

    cfg = load_config(str(DEMO), [f"output_dir={shared}", f"run_dir={shared}"])
    if not (shared / "shards" / "digits" / "test_index.json").exists():
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        prepare_data(cfg)
        ray.shutdown()


def recipe_overrides(recipe: str, args) -> list[str]:
    common = [f"train.ema.decay={args.ema_decay}", "train.ema.warmup=true"]
    if recipe == "plain":
        return common + ["aug.preset=none"]
    preset = {k: v for k, v in _preset(args.preset).items() if k != "preset"}
    return common + [
        f"aug.preset={args.preset}",
        *(f"aug.{k}={v}" for k, v in preset.items()),
        f"model.drop_path={args.drop_path}",
    ]


def _preset(name: str) -> dict:
    from pipeline.config import aug_presets

    return aug_presets()[name]


def train_and_eval(shared: Path, out: Path, recipe: str, seed: int, args) -> dict:
    run = out / f"{recipe}_seed{seed}"
    ov = [
        f"output_dir={run}",
        f"run_dir={run}",
        f"name={recipe}_seed{seed}",
        "demo.enabled=false",
        f"data.train={shared}/shards/glyphs/train_index.json",
        f"eval.fewshot.0.train={shared}/shards/digits/train_index.json",
        f"eval.fewshot.0.test={shared}/shards/digits/test_index.json",
        f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.checkpoint_at_start=false",
        f"train.seed={seed}",
        "tracking.system_metrics=false",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "train.log_every=50",
        *recipe_overrides(recipe, args),
    ]
    t0 = time.time()
    if not (run / "checkpoints" / f"step_{args.steps:08d}" / "COMPLETE").exists():
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "PIPELINE_QUIET": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={29500 + seed * 7 + len(recipe)}",
            "-m",
            "pipeline.train",
            str(DEMO),
            *ov,
        ]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    train_s = time.time() - t0

    from pipeline.config import load_config
    from pipeline.evaluate.runner import evaluate_checkpoint
    from pipeline.rundir import RunDir

    cfg = load_config(str(DEMO), ov)
    t1 = time.time()
    res = evaluate_checkpoint(cfg.eval, str(run / "checkpoints"), f"step_{args.steps:08d}", RunDir(str(run)))
    recs = RunDir(str(run)).eval_records()[f"step_{args.steps:08d}"]
    shots = {v: recs[f"fewshot-digits{'' if v == 'raw' else '-ema'}"]["metrics"] for v in ("raw", "ema")}
    del res
    return {
        "recipe": recipe,
        "seed": seed,
        "train_seconds": train_s,
        "eval_seconds": time.time() - t1,
        "fewshot": {v: {k: m[k] for k in m if k.endswith("shot")} for v, m in shots.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="light2")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--out", default="runs/augreg_compare")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shared = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    prepare(shared)
    rows = []
    for seed in args.seeds:
        for recipe in ("plain", "augreg"):
            row = train_and_eval(shared, out, recipe, seed, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
    print(
        f"\nplain vs AugReg ({args.preset} + drop_path {args.drop_path}), {args.steps} steps, EMA {args.ema_decay} "
        f"(warmup), seeds {args.seeds}: digits few-shot, mean ± std over seeds"
    )
    print("| recipe | weights | 1-shot | 5-shot | 10-shot | 25-shot |\n|---|---|---:|---:|---:|---:|")
    for recipe in ("plain", "augreg"):
        for variant in ("raw", "ema"):
            cells = []
            for k in (1, 5, 10, 25):
                vals = [r["fewshot"][variant][f"{k}shot"] for r in rows if r["recipe"] == recipe]
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}")
            print(f"| {recipe} | {variant} | " + " | ".join(cells) + " |")
    secs = [r["train_seconds"] for r in rows]
    print(f"training seconds per run: {statistics.mean(secs):.0f} (min {min(secs):.0f}, max {max(secs):.0f})")


if __name__ == "__main__":
    main()
