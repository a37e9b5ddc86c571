"""A k-nearest-neighbour probe: an evaluator that lives outside the pipeline, named by module
path in a config (``eval.extra: [{evaluator: tests.support.knn_probe, name: digits, train: ..., test:
...}]``) and nowhere else. Frozen pre-logits features, L2-normalised; each test image gets the
majority label of its ``k`` most cosine-similar training images; top-1 on the test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

PROTOCOL = "knn"


@dataclass
class Config:
    name: str = "???"
    train: str = "???"  # index URL of the neighbours
    test: str = "???"  # index URL of the split top-1 is reported on
    k: int = 5
    batch_size: int = 256
    crop_ratio: float = 1.0


def check(spec: DictConfig) -> None:
    from pipeline.config import ConfigError

    if spec.k <= 0:
        raise ConfigError(f"eval.extra[{spec.name}].k: must be positive, got {spec.k}")


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    nearest = np.argsort(-unit(test_x) @ unit(train_x).T, axis=1)[:, :k]
    votes = np.zeros((len(test_x), num_classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[nearest]), 1)
    return votes.argmax(1)


def evaluate(spec: DictConfig, weights):
    from pipeline.data import iter_eval_batches
    from pipeline.evaluate.fewshot import confusion_matrix, extract_features
    from pipeline.evaluate.record import metric_prefix
    from pipeline.evaluate.runner import Result

    model, image_size = weights.model()
    t0 = time.time()
    train_x, train_y = extract_features(
        model, iter_eval_batches(spec.train, image_size, spec.batch_size, spec.crop_ratio)
    )
    test_x, test_y = extract_features(model, iter_eval_batches(spec.test, image_size, spec.batch_size, spec.crop_ratio))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(train_x, train_y, test_x, spec.k, num_classes)
    top1 = float(np.mean(pred == test_y))
    prefix = metric_prefix("knn_probe", spec.name, weights.variant)
    return Result(
        {"top1": top1, "seconds": time.time() - t0},
        {"k": spec.k, "train": spec.train, "test": spec.test},
        {f"{prefix}/top1": top1},
        confusion_matrix(test_y, pred, num_classes),
        f"{spec.name} {spec.k}-NN at {weights.label}",
        summary={"top1": top1},
    )
