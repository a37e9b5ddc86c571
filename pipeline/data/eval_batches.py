"""Evaluation sets: every sample of a split in index order, centre-cropped, in batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline.data.decode import decode_eval, sample_labels, to_model_input
from pipeline.data.index import ShardIndex
from pipeline.data.tar import iter_tar_samples

log = logging.getLogger(__name__)


def iter_eval_batches(
    index_url: str,
    image_size: int,
    batch_size: int,
    crop_ratio: float = 0.875,
    keep: Callable[[str], bool] | None = None,
    raw: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of a split in index order (those whose key ``keep`` accepts):
    ``(images, first label)``, images in [-1, 1] NCHW, or uint8 NHWC when ``raw``.

    Corrupt samples are skipped with a warning.
    """

    def batch(images: list[np.ndarray], labels: list[int]):
        x = torch.from_numpy(np.stack(images))
        return (x if raw else to_model_input(x)), torch.tensor(labels)

    images: list[np.ndarray] = []
    labels: list[int] = []
    for url, _ in ShardIndex.load(index_url).shards:
        for sample in iter_tar_samples(url):
            if keep is not None and not keep(sample["__key__"]):
                continue
            try:
                images.append(decode_eval(sample["jpg"], image_size, crop_ratio))
                labels.append(sample_labels(sample)[0])
            except Exception as e:
                log.warning("skipping eval sample %s of %s (%s)", sample.get("__key__"), url, e)
                continue
            if len(images) == batch_size:
                yield batch(images, labels)
                images, labels = [], []
    if images:
        yield batch(images, labels)
