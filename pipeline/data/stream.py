"""Streaming input pipeline over webdataset shards, driven by the shard index.

Every rank runs ``num_workers`` dataloader processes; each (rank, worker) pair is one
*reader*. A reader's stream is endless and deterministic in (seed, pass):

* per pass the shard list is permuted by seed and dealt round-robin to the readers. When
  there are fewer shards than readers, each shard is split into strided sub-shards first,
  so no reader is ever empty;
* the reader's samples are read as encoded bytes in blocks of ``shuffle_block``, each block
  permuted by seed, and only then decoded (the shuffle holds bytes, not pixels);
* every batch carries the reader's position (pass, samples consumed), so a checkpoint can
  record where each reader stands and a resumed run continues with exactly the samples
  the uninterrupted run would have seen next.

Because streams never run dry and the trainer counts steps, every rank yields the same
number of batches and no rank can hang at an epoch end.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.augment import randaugment, sample_rng
from pipeline.data.decode import decode_train, multi_hot, sample_labels
from pipeline.data.index import ShardIndex
from pipeline.data.readers import make_units, reader_stream, seeded_rng

log = logging.getLogger(__name__)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared``: a dataloader worker's batch
    then reaches the main process as a handle, not copied into shared memory on the way
    (what torch's ``default_collate`` does in a worker, with the storage call it uses)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


@dataclass
class StreamSpec:
    index_url: str
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    image_size: int
    num_classes: int
    seed: int
    shuffle_block: int
    crop_area: tuple[float, float]
    flip: bool
    skip_key: Callable[[str], bool] | None = None  # samples whose key it accepts are passed over (a dev carve)
    randaug_layers: int = 0  # RandAugment after crop and flip, seeded by (seed, sample key, pass)
    randaug_magnitude: float = 0.0
    streams: int = 0  # canonical streams (``data.order=canonical``); 0: one stream per reader
    global_batch: int = 0  # samples per training step over all ranks (canonical order)

    @property
    def per_step(self) -> int:
        """This rank's micro-batches a training step (1 when the spec names no global batch)."""
        return max(1, self.global_batch // (self.world_size * self.batch_size)) if self.global_batch else 1


def _train_sample(spec: StreamSpec, sample: dict, rng: random.Random, pass_idx: int) -> tuple[np.ndarray, list[int]]:
    """One training image (crop, flip, RandAugment) and its labels; raises on a corrupt sample."""
    image = decode_train(sample["jpg"], spec.image_size, rng, spec.crop_area, spec.flip)
    if spec.randaug_layers:
        aug_rng = sample_rng(spec.seed, sample["__key__"], pass_idx)
        image = randaugment(image, spec.randaug_layers, spec.randaug_magnitude, aug_rng)
    return image, sample_labels(sample)


def _log_skip(sample: dict, error: Exception, skipped: int) -> None:
    log.warning(
        "skipping sample %s of %s (%s); %d skipped so far", sample.get("__key__"), sample.get("__url__"), error, skipped
    )


def _take(spec: StreamSpec, stream, upto: int, pixels: np.ndarray, labels: list, keys: list, rng_of, skipped: int):
    """Decode the next samples of ``stream`` into batch rows ``len(keys)..upto-1`` (crop and flip
    seeded by ``rng_of(position)``); a corrupt sample is skipped and counted, never raised.
    Returns the stream's position after the last sample read and the skip count."""
    pos = None
    while len(keys) < upto:
        sample, pos = next(stream)
        if spec.skip_key is not None and spec.skip_key(sample["__key__"]):
            continue
        try:
            image, label = _train_sample(spec, sample, rng_of(pos), pos[0])
        except Exception as e:  # a corrupt sample must never crash a rank
            skipped += 1
            _log_skip(sample, e, skipped)
            continue
        pixels[len(keys)] = image
        labels.append(label)
        keys.append(sample["__key__"])
    return pos, skipped


class _ReaderDataset(torch.utils.data.IterableDataset):
    """Batches of one rank: each dataloader worker serves one logical reader."""

    def __init__(self, spec: StreamSpec, positions: dict[int, tuple[int, int]], rotation: int):
        self.spec, self.positions, self.rotation = spec, positions, rotation

    def __iter__(self):
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        workers = max(1, spec.num_workers)
        # The dataloader asks workers in turn starting at 0; rotating logical readers makes a
        # resumed run ask the reader whose turn it was when the checkpoint was taken.
        logical = ((info.id if info else 0) + self.rotation) % workers
        reader = spec.rank * workers + logical
        num_readers = spec.world_size * workers
        index = ShardIndex.load(spec.index_url)
        units = make_units(index, num_readers)
        start = tuple(self.positions.get(logical, (0, 0)))
        stream = reader_stream(units, reader, num_readers, spec.seed, spec.shuffle_block, start)
        skipped = 0
        shared = info is not None
        while True:
            images = batch_tensor((spec.batch_size, spec.image_size, spec.image_size, 3), torch.uint8, shared)
            pixels = images.numpy()  # each image is written into the batch as soon as it is decoded
            labels, keys = [], []
            pos, skipped = _take(
                spec,
                stream,
                spec.batch_size,
                pixels,
                labels,
                keys,
                lambda p: seeded_rng(spec.seed, reader, p[0], p[1]),
                skipped,
            )
            targets = batch_tensor((spec.batch_size, spec.num_classes), torch.float32, shared)
            yield {
                "images": images,
                "targets": multi_hot(labels, spec.num_classes, targets),
                "keys": keys,
                "reader": logical,
                "position": pos,
                "skipped": skipped,
            }


class _StepCount:
    """``steps``: training steps of data a stream has delivered since the run began, in any world
    size (a rank's micro-batch count ``batches`` is not: it restarts at a resize, and a step holds
    more or fewer). ``_steps_at`` is (steps, batches) when the stream was made."""

    spec: StreamSpec
    batches: int
    _steps_at: tuple[int, int]

    @property
    def steps(self) -> int:
        steps, batches = self._steps_at
        return steps + (self.batches - batches) // self.spec.per_step


class TrainStream(_StepCount):
    """Endless batches for one rank, with a resumable position.

    ``state_dict()`` records batches consumed and each reader's position after the last
    batch it delivered; ``TrainStream(spec, state)`` continues from there exactly.
    """

    def __init__(self, spec: StreamSpec, state: dict | None = None):
        self.spec = spec
        state = state or {}
        steps = _saved_steps(state, spec)
        if state and (
            (state.get("world_size"), state.get("num_workers")) != (spec.world_size, spec.num_workers)
            or state.get("streams")
        ):  # saved in the canonical order
            log.warning(
                "data stream saved with world %s x workers %s, now %s x %s: starting the next pass fresh",
                state.get("world_size"),
                state.get("num_workers"),
                spec.world_size,
                spec.num_workers,
            )
            nxt = 1 + max((p[0] for p in state.get("positions", {}).values()), default=-1)
            state = {"batches": 0, "positions": {w: (nxt, 0) for w in range(max(1, spec.num_workers))}}
        self.batches = int(state.get("batches", 0))
        self._steps_at = (steps, self.batches)
        self.positions = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
        workers = max(1, spec.num_workers)
        dataset = _ReaderDataset(spec, dict(self.positions), self.batches % workers)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=spec.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if spec.num_workers else None,
        )
        self._iter = iter(self.loader)
        self.skipped = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        self.batches += 1
        self.positions[int(batch["reader"])] = tuple(int(x) for x in batch["position"])
        self.skipped = int(batch["skipped"])
        return batch

    def state_dict(self) -> dict:
        return {
            "batches": self.batches,
            "steps": self.steps,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "world_size": self.spec.world_size,
            "num_workers": self.spec.num_workers,
        }


def _saved_steps(state: dict, spec: StreamSpec) -> int:
    """The training steps of data a saved stream had delivered: its own count, or (a state saved
    before streams counted steps) its batches when saved at this world size, else 0."""
    if "steps" in state:
        return int(state["steps"])
    return int(state.get("batches", 0)) // spec.per_step if state.get("world_size") == spec.world_size else 0
