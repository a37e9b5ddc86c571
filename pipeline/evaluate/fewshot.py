"""Few-shot linear evaluation: big_vision's ``evaluators/fewshot_lsr.py`` protocol.

Frozen pre-logits features; for each k in ``shots`` and each seed, k training images per
class; features standardised with that k-shot set's mean and std; a constant column
appended as a nearly unregularised bias; closed-form ridge regression to {-1, +1}
one-vs-all targets (l2 = 2**10); argmax prediction; top-1 accuracy on a held-out split.
As in big_vision, seed s draws one permutation of every class's examples and the k-shot
set is its first k, so the sets for growing k are nested. The solve runs in float64.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig

if TYPE_CHECKING:
    from pipeline.evaluate.runner import Result

log = logging.getLogger(__name__)

# big_vision's value: large, so the bias weight is barely touched by the l2 penalty.
BIAS_CONSTANT = 100.0
STD_EPS = 1e-5


def extract_features(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logits features (N, D) float32 and labels (N,) int64 of every ``(images, labels)``.

    Runs ``model.forward_features`` in eval mode without gradients, on ``device`` (default:
    where the model's parameters are), under bf16 autocast when ``dtype`` is bfloat16 and
    the device supports it. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    feats, labels = [], []
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, dtype):
            for images, y in batches:
                out = model.forward_features(images.to(device, non_blocking=True))
                feats.append(out.float().cpu().numpy())
                labels.append(torch.as_tensor(y).cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not feats:
        return np.zeros((0, getattr(model, "num_features", 0)), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats).astype(np.float32, copy=False), np.concatenate(labels)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype != torch.bfloat16:
        return contextlib.nullcontext()
    supported = torch.amp.is_autocast_available(device.type) and (
        device.type != "cuda" or torch.cuda.is_bf16_supported()
    )
    if not supported:
        log.warning("bf16 autocast is not available on %s; extracting features in float32", device)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def ridge_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    l2: float = 2.0**10,
) -> np.ndarray:
    """Class predictions (M,) for ``test_x`` of a ridge fit on all of ``(train_x, train_y)``.

    Standardises with the training set's statistics only, appends the bias column, solves
    for {-1, +1} one-vs-all targets in float64 and takes the argmax.
    """
    x = np.asarray(train_x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + STD_EPS
    x = _with_bias((x - mean) / std)
    t = _with_bias((np.asarray(test_x, np.float64) - mean) / std)
    y = -np.ones((len(x), num_classes))
    y[np.arange(len(x)), np.asarray(train_y)] = 1.0
    n, d = x.shape
    # Solve in whichever of the D x D or N x N systems is smaller (same solution).
    if n >= d:
        w = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
    else:
        w = x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)
    return np.argmax(t @ w, axis=1)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def shot_indices(train_y: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of the ``shots``-per-class training set of ``seed`` (big_vision's draw)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(train_y == c)) for c in range(num_classes)]
    return np.concatenate([idx[:shots] for idx in per_class])


def fewshot_predictions(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    shots: int,
    seed: int = 0,
    l2: float = 2.0**10,
    num_classes: int | None = None,
) -> np.ndarray:
    """Test predictions of the ``shots``-per-class ridge probe drawn with ``seed``."""
    train_y = np.asarray(train_y)
    num_classes = num_classes or int(train_y.max()) + 1
    idx = shot_indices(train_y, shots, seed, num_classes)
    return ridge_predict(train_x[idx], train_y[idx], test_x, num_classes, l2)


def ridge_fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: int = 3,
    l2: float = 2.0**10,
    num_classes: int | None = None,
) -> dict[int, dict]:
    """Top-1 accuracy of the few-shot ridge probe for each k in ``shots`` over ``seeds`` draws.

    Returns ``{k: {"mean", "std", "per_seed": [...], "short_classes": [...]}}``; a class
    with fewer than k training examples contributes all it has and is listed in
    ``short_classes``. Deterministic for given inputs.
    """
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(
            f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
            f"test {len(test_x)} vs {len(test_y)}"
        )
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    counts = np.bincount(train_y, minlength=num_classes)
    results = {}
    for k in shots:
        short = np.flatnonzero(counts < k).tolist()
        if short:
            log.warning("%d-shot: classes %s have fewer than %d training examples", k, short, k)
        accs = []
        for seed in range(seeds):
            preds = fewshot_predictions(train_x, train_y, test_x, k, seed, l2, num_classes)
            accs.append(float(np.mean(preds == test_y)))
        results[k] = {
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "per_seed": accs,
            "short_classes": short,
        }
    return results


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def best_shot_confusion(
    results: dict[int, dict],
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    l2: float = 2.0**10,
    num_classes: int | None = None,
) -> tuple[int, np.ndarray]:
    """The k with the best mean accuracy in ``results`` and its seed-0 confusion matrix."""
    best = max(results, key=lambda k: results[k]["mean"])
    num_classes = num_classes or int(max(np.max(train_y), np.max(test_y))) + 1
    preds = fewshot_predictions(train_x, train_y, test_x, best, 0, l2, num_classes)
    return best, confusion_matrix(test_y, preds, num_classes)


PROTOCOL = "fewshot_linear"


def evaluate(fs: DictConfig, weights) -> Result:
    """The evaluator (``eval.fewshot``): features of ``fs.train`` and ``fs.test`` under
    ``weights`` (``pipeline.evaluate.runner.Weights``), ridge few-shot for every k and seed."""
    from pipeline.data import iter_eval_batches
    from pipeline.evaluate.record import metric_prefix
    from pipeline.evaluate.runner import Result

    model, image_size = weights.model()
    t0 = time.time()
    train_x, train_y = extract_features(model, iter_eval_batches(fs.train, image_size, fs.batch_size, fs.crop_ratio))
    test_x, test_y = extract_features(model, iter_eval_batches(fs.test, image_size, fs.batch_size, fs.crop_ratio))
    res = ridge_fewshot(train_x, train_y, test_x, test_y, shots=tuple(fs.shots), seeds=fs.seeds, l2=fs.l2)
    seconds = time.time() - t0
    log.info(
        "fewshot %s at %s: %s (%.1fs)",
        fs.name,
        weights.label,
        {k: round(v["mean"], 4) for k, v in res.items()},
        seconds,
    )
    k, cm = best_shot_confusion(res, train_x, train_y, test_x, test_y, l2=fs.l2)
    metrics = {"seconds": seconds}
    for shots, r in res.items():
        metrics[f"{shots}shot"] = r["mean"]
        metrics[f"{shots}shot_std"] = r["std"]
    params = {
        "shots": list(fs.shots),
        "seeds": fs.seeds,
        "l2": fs.l2,
        "train": fs.train,
        "test": fs.test,
        "train_samples": len(train_y),
        "test_samples": len(test_y),
        "feature_dim": int(train_x.shape[1]),
    }
    prefix = metric_prefix("fewshot", fs.name, weights.variant)
    return Result(
        metrics,
        params,
        {f"{prefix}/{s}shot": r["mean"] for s, r in res.items()},
        cm,
        f"{fs.name} {k}-shot (seed 0) at {weights.label}",
        summary=res,
    )
