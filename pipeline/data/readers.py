"""What each reader of the training stream reads: shards (or strided sub-shards) dealt to
readers per pass by seed, read in shuffled blocks of encoded bytes.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.data.index import ShardIndex
from pipeline.data.tar import iter_tar_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """A shard, or every ``stride``-th sample of it starting at ``offset``."""

    url: str
    nsamples: int
    stride: int = 1
    offset: int = 0

    @property
    def size(self) -> int:
        return len(range(self.offset, self.nsamples, self.stride))

    def samples(self, skip: int = 0) -> Iterator[dict]:
        taken = 0
        for i, sample in enumerate(iter_tar_samples(self.url)):
            if i % self.stride != self.offset:
                continue
            if taken >= skip:
                yield sample
            taken += 1


def make_units(index: ShardIndex, num_readers: int) -> list[Unit]:
    """Shards, with any shard larger than a reader's share split into strided sub-shards.

    Splitting shard ``s`` into ``ceil(n_s / share)`` parts gives at least ``num_readers``
    non-empty units in all, so every reader gets data however few or uneven the shards.
    Shards no larger than the share are read whole (no wasted I/O at scale).
    """
    share = index.num_samples / num_readers
    if share < 1:
        raise ValueError(
            f"{index.url}: {index.num_samples} samples cannot feed {num_readers} readers (ranks x workers)"
        )
    units = []
    for url, n in index.shards:
        stride = max(1, math.ceil(n / share - 1e-9))
        units += [Unit(url, n, stride, j) for j in range(stride)]
    return units


def seeded_rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & 0xFFFFFFFFFFFF)


def reader_units(units: list[Unit], reader: int, num_readers: int, seed: int, pass_idx: int) -> list[Unit]:
    """This pass's units of one reader: a seeded permutation dealt to balance sample counts."""
    order = list(range(len(units)))
    seeded_rng(seed, pass_idx, 7919).shuffle(order)
    heap = [(0, r) for r in range(num_readers)]  # (samples so far, reader): least loaded first
    owner = {}
    for i in sorted(order, key=lambda i: -units[i].size):  # stable: ties keep the permuted order
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + units[i].size, r))
    return [units[i] for i in order if owner[i] == reader]


def reader_stream(
    units: list[Unit], reader: int, num_readers: int, seed: int, block: int, start: tuple[int, int] = (0, 0)
) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Endless ``(encoded sample, (pass, consumed after it))`` for one reader from ``start``."""
    pass_idx, consumed = start
    while True:
        mine = reader_units(units, reader, num_readers, seed, pass_idx)
        total = sum(u.size for u in mine)
        if total == 0:
            raise RuntimeError(f"reader {reader} of {num_readers} got no samples")
        block_start = (consumed // block) * block
        source = _samples_from(mine, block_start)
        for b0 in range(block_start, total, block):
            chunk = [next(source) for _ in range(min(block, total - b0))]
            seeded_rng(seed, pass_idx, reader, b0).shuffle(chunk)
            for i in range(max(0, consumed - b0), len(chunk)):
                yield chunk[i], (pass_idx, b0 + i + 1)
        pass_idx, consumed = pass_idx + 1, 0


def _samples_from(units: list[Unit], skip: int) -> Iterator[dict]:
    for unit in units:
        if skip >= unit.size:
            skip -= unit.size
            continue
        yield from unit.samples(skip)
        skip = 0
