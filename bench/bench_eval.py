"""Transfer evaluation: feature extraction, the few-shot ridge solve, the fine-tuning step.

    .venv/bin/python bench/bench_eval.py [--rounds 3] [--quick]

Each part runs the candidate and a baseline side by side in this process on the same
data, interleaved for ``--rounds`` after a warm-up, and reports medians:
  1. feature extraction (``fewshot.extract_features``, fp32 and bf16 autocast) against the
     bare ``model.forward_features`` loop under ``no_grad``: vit_demo at 32 px, vit_b16 at
     224 px, images/s;
  2. the few-shot ridge probe for 1000 classes x 768-d random features: our float64
     closed form (``ridge_predict``: the D x D primal system when N >= D) against the N x N
     dual form of the same solve and scikit-learn's ``Ridge(solver="cholesky")`` on the same
     standardised features, at 1, 5 and 25 shots (the dual is skipped where its N x N
     float64 matrix would exceed 1 GB); predictions are checked to agree;
  3. the fine-tuning step (``finetune.build_engine``: a 1-rank DeepSpeed engine, SGD
     momentum, clip 1) against the same model, optimizer, clipping and schedule in a plain
     PyTorch loop: vit_demo at 48 px, batch 32, images/s.
It ends with a table of the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.evaluate.fewshot import BIAS_CONSTANT, STD_EPS, extract_features, ridge_predict  # noqa: E402
from pipeline.model import create_model  # noqa: E402

L2 = 2.0**10


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each fn, run in turn for ``rounds`` after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- 1. feature extraction


def bench_features(rounds: int, quick: bool) -> list[tuple[str, float, float]]:
    rows = []
    cases = [("vit_demo", 32, 128, 2 if quick else 4), ("vit_b16", 224, 4, 1)]
    for name, size, batch, nbatches in cases:
        torch.manual_seed(0)
        model = create_model(name, num_classes=1000).eval()
        batches = [
            (torch.rand(batch, 3, size, size) * 2 - 1, torch.zeros(batch, dtype=torch.long)) for _ in range(nbatches)
        ]
        n = batch * nbatches

        def bare(model=model, batches=batches):
            with torch.no_grad():
                return [model.forward_features(x).numpy() for x, _ in batches]

        t = interleaved(
            {
                "bare": bare,
                "fp32": lambda model=model, batches=batches: extract_features(model, batches),
                "bf16": lambda model=model, batches=batches: extract_features(model, batches, dtype=torch.bfloat16),
            },
            rounds,
        )
        for k in ("fp32", "bf16"):
            rows.append((f"{name} {size}px extract_features {k}", n / t[k], n / t["bare"]))
        print(
            f"features {name} {size}px: bare {n / t['bare']:.1f} img/s, fp32 {n / t['fp32']:.1f}, bf16 "
            f"{n / t['bf16']:.1f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------- 2. the ridge solve


def _standardise(train_x, test_x):
    mean, std = train_x.mean(0, keepdims=True), train_x.std(0, keepdims=True) + STD_EPS
    bias = lambda z: np.concatenate([z, np.full((len(z), 1), BIAS_CONSTANT)], axis=1)  # noqa: E731
    return bias((train_x - mean) / std), bias((test_x - mean) / std)


def dual_predict(train_x, train_y, test_x, num_classes):
    """The same ridge solution through the N x N system: w = X^T (X X^T + l2 I)^-1 Y."""
    x, t = _standardise(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
    y = -np.ones((len(x), num_classes))
    y[np.arange(len(x)), train_y] = 1.0
    w = x.T @ np.linalg.solve(x @ x.T + L2 * np.eye(len(x)), y)
    return np.argmax(t @ w, axis=1)


def sklearn_predict(train_x, train_y, test_x, num_classes):
    from sklearn.linear_model import Ridge

    x, t = _standardise(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
    y = -np.ones((len(x), num_classes))
    y[np.arange(len(x)), train_y] = 1.0
    return np.argmax(Ridge(alpha=L2, fit_intercept=False, solver="cholesky").fit(x, y).predict(t), axis=1)


def bench_ridge(rounds: int, quick: bool) -> list[tuple[str, float, float, float | None]]:
    classes, dim, n_test = 1000, 768, 5000
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    test_y = rng.integers(0, classes, n_test)
    test_x = centres[test_y] + 3 * rng.normal(size=(n_test, dim)).astype(np.float32)
    rows = []
    for shots in (1, 5) if quick else (1, 5, 25):
        train_y = np.repeat(np.arange(classes), shots)
        train_x = centres[train_y] + 3 * rng.normal(size=(len(train_y), dim)).astype(np.float32)
        data = (train_x, train_y, test_x, classes)
        fns = {"ours": lambda d=data: ridge_predict(*d, L2), "sklearn": lambda d=data: sklearn_predict(*d)}
        n = len(train_y)
        if n * n * 8 <= 2**30:
            fns["dual"] = lambda d=data: dual_predict(*d)
        t = interleaved(fns, max(1, rounds - 1) if shots == 25 else rounds)
        ours = ridge_predict(train_x, train_y, test_x, classes, L2)
        agree = np.mean(ours == sklearn_predict(train_x, train_y, test_x, classes))
        assert agree > 0.999, f"{shots}-shot: our predictions agree with sklearn's on only {agree:.4f}"
        acc = np.mean(ours == test_y)
        form = "primal D x D" if n >= dim + 1 else "dual N x N"
        print(
            f"ridge {shots}-shot (N={n}, solver picks {form}): ours {t['ours']:.2f}s, dual "
            f"{t.get('dual', float('nan')):.2f}s, sklearn {t['sklearn']:.2f}s; top-1 {acc:.3f}, agree {agree:.4f}",
            flush=True,
        )
        rows.append(
            (f"{shots}-shot x {classes} classes x {dim}-d (N={n}, {form})", t["ours"], t["sklearn"], t.get("dual"))
        )
    return rows


# ---------------------------------------------------------------- 3. the fine-tuning step


def bench_finetune_step(rounds: int, quick: bool) -> tuple[float, float]:
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from pipeline.config import FineTuneConfig
    from pipeline.engine import dist_setup, warmup_decay
    from pipeline.evaluate.finetune import build_engine

    dist_setup(standalone=True)
    batch, size, steps = 32, 48, 2 if quick else 3
    ft = OmegaConf.merge(
        OmegaConf.structured(FineTuneConfig),
        {"steps": 1000, "warmup_steps": 10, "batch_size": batch, "precision": "fp32", "image_size": size},
    )
    x, y = torch.rand(batch, 3, size, size) * 2 - 1, torch.randint(0, 10, (batch,))

    def model():
        torch.manual_seed(0)
        m = create_model("vit_demo", num_classes=0, img_size=size)
        m.reset_head(10)
        return m

    engine = build_engine(model(), ft, 0.01)
    plain = model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_decay(s, 10, 1000))

    def ds_steps():
        for _ in range(steps):
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()

    def plain_steps():
        for _ in range(steps):
            loss = F.cross_entropy(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt.step()
            sched.step()

    t = interleaved({"deepspeed": ds_steps, "plain": plain_steps}, rounds)
    ips = {k: steps * batch / v for k, v in t.items()}
    print(
        f"fine-tune step vit_demo {size}px batch {batch}: DeepSpeed {ips['deepspeed']:.1f} img/s, plain "
        f"{ips['plain']:.1f}",
        flush=True,
    )
    return ips["deepspeed"], ips["plain"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer batches and shots (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    feats = bench_features(args.rounds, args.quick)
    ridge = bench_ridge(args.rounds, args.quick)
    ds, plain = bench_finetune_step(args.rounds, args.quick)

    print("\n| part | candidate | baseline | ratio (candidate / baseline) |")
    print("|---|---|---|---|")
    for name, cand, base in feats:
        print(f"| {name} | {cand:.1f} img/s | bare forward_features {base:.1f} img/s | {cand / base:.2f}x |")
    for name, ours, skl, dual in ridge:
        print(f"| ridge {name} | ours {ours:.2f} s | sklearn Ridge {skl:.2f} s | {skl / ours:.2f}x faster |")
        if dual is not None:
            print(f"| ridge {name} | ours {ours:.2f} s | dual N x N {dual:.2f} s | {dual / ours:.2f}x faster |")
    print(
        f"| fine-tune step vit_demo 48px b32 | DeepSpeed engine {ds:.1f} img/s | plain PyTorch loop {plain:.1f} "
        f"img/s | {ds / plain:.2f}x |"
    )
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
