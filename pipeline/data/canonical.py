"""The canonical order: ``data.streams`` streams of whole steps, dealt to ranks, so that a
step's samples are the same for any world size and worker count (a resize follows the
loss curve of a fixed-size run).
"""

from __future__ import annotations

import logging

import torch

from pipeline.data.decode import multi_hot
from pipeline.data.index import ShardIndex
from pipeline.data.readers import make_units, reader_stream, seeded_rng
from pipeline.data.stream import (
    StreamSpec,
    TrainStream,
    _saved_steps,
    _StepCount,
    _take,
    batch_tensor,
)

log = logging.getLogger(__name__)


def rank_streams(streams: int, rank: int, world_size: int) -> list[int]:
    """The canonical streams rank ``rank`` of ``world_size`` reads: ``c = rank (mod world)``."""
    return list(range(rank, streams, world_size))


class _StepDataset(torch.utils.data.IterableDataset):
    """One rank's share of every training step, in canonical streams.

    Each dataloader worker owns whole streams (the rank's streams dealt in turn) and yields one
    chunk per step: ``global_batch / streams`` decoded samples of each stream it owns. The
    dataloader takes one chunk from each worker in turn, so a step's chunks arrive together.
    """

    def __init__(self, spec: StreamSpec, positions: dict[int, tuple[int, int]]):
        self.spec, self.positions = spec, positions

    def __iter__(self):
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = rank_streams(spec.streams, spec.rank, spec.world_size)[worker::workers]
        per = spec.global_batch // spec.streams
        units = make_units(ShardIndex.load(spec.index_url), spec.streams)
        positions = {c: tuple(self.positions.get(c, (0, 0))) for c in mine}
        readers = {c: reader_stream(units, c, spec.streams, spec.seed, spec.shuffle_block, positions[c]) for c in mine}
        shared = info is not None and bool(mine)
        skipped = 0
        while True:
            images = batch_tensor((len(mine) * per, spec.image_size, spec.image_size, 3), torch.uint8, shared)
            pixels = images.numpy()
            labels, keys = [], []
            for c in mine:
                positions[c], skipped = _take(
                    spec,
                    readers[c],
                    len(keys) + per,
                    pixels,
                    labels,
                    keys,
                    lambda p, c=c: seeded_rng(spec.seed, 0x5EED, c, p[0], p[1]),
                    skipped,
                )
            targets = batch_tensor((len(keys), spec.num_classes), torch.float32, shared)
            yield {
                "images": images,
                "targets": multi_hot(labels, spec.num_classes, targets),
                "keys": keys,
                "streams": mine,
                "positions": [positions[c] for c in mine],
                "worker": worker,
                "skipped": skipped,
            }


class CanonicalStream(_StepCount):
    """Endless micro-batches for one rank in the canonical order (``data.order=canonical``).

    The samples are read in ``spec.streams`` canonical streams, each an endless deterministic
    stream in (seed, pass) as a reader's is (:func:`reader_stream`), and every training step
    takes the next ``global_batch / streams`` samples of every stream. Which samples make up
    global step s is therefore a function of (seed, s) alone: the world size decides only which
    rank trains on them (rank r takes the streams ``c = r (mod world)``, in order, cut into its
    micro-batches) and the loader workers only who decodes them. A checkpoint records each
    stream's position; a run resumed at another world size or worker count goes on with exactly
    the samples an uninterrupted run would have taken next.
    """

    def __init__(self, spec: StreamSpec, state: dict | None = None):
        streams, world = spec.streams, spec.world_size
        if (
            streams <= 0
            or streams % world
            or spec.global_batch % streams
            or (spec.global_batch // world) % spec.batch_size
        ):
            raise ValueError(
                f"{streams} canonical streams cannot feed a global batch of {spec.global_batch} on {world} ranks "
                f"in micro-batches of {spec.batch_size} (streams must divide the global batch, and the world "
                "size the streams)"
            )
        self.spec = spec
        state = state or {}
        self.positions = {c: (0, 0) for c in rank_streams(streams, spec.rank, world)}
        if state and state.get("streams") != streams:
            nxt = 1 + max((p[0] for p in _saved_positions(state)), default=-1)
            log.warning(
                "data stream saved %s, now %d canonical streams: starting pass %d fresh",
                f"with {state['streams']} canonical streams" if state.get("streams") else "in reader order",
                streams,
                nxt,
            )
            self.positions = {c: (nxt, 0) for c in self.positions}
        elif state:
            saved = {int(c): tuple(p) for c, p in state["positions"].items()}
            self.positions = {c: saved.get(c, (0, 0)) for c in self.positions}
        self.batches = int(state.get("batches", 0)) if state.get("world_size") == world else 0
        self._steps_at = (_saved_steps(state, spec), self.batches)
        self.per_step = spec.per_step  # micro-batches a step
        self.workers = max(1, spec.num_workers)
        self.loader = torch.utils.data.DataLoader(
            _StepDataset(spec, dict(self.positions)),
            batch_size=None,
            num_workers=spec.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if spec.num_workers else None,
        )
        self._iter = iter(self.loader)
        self._queue: list[dict] = []
        self._pending: dict[int, tuple[int, int]] = {}
        self._skipped = [0] * self.workers
        self.skipped = 0

    def __iter__(self):
        return self

    def _next_step(self) -> None:
        """The rank's whole next step from one chunk per worker, rows in stream order, cut into micro-batches."""
        chunks = [next(self._iter) for _ in range(self.workers)]
        per = self.spec.global_batch // self.spec.streams
        rows = sorted((c, chunk, i) for chunk in chunks for i, c in enumerate(chunk["streams"]))
        images = torch.cat([chunk["images"][i * per : (i + 1) * per] for _, chunk, i in rows])
        targets = torch.cat([chunk["targets"][i * per : (i + 1) * per] for _, chunk, i in rows])
        keys = [k for _, chunk, i in rows for k in chunk["keys"][i * per : (i + 1) * per]]
        for chunk in chunks:
            self._skipped[int(chunk["worker"])] = int(chunk["skipped"])
            for c, pos in zip(chunk["streams"], chunk["positions"], strict=True):
                self._pending[int(c)] = tuple(int(x) for x in pos)
        m = self.spec.batch_size
        self._queue = [
            {
                "images": images[k * m : (k + 1) * m],
                "targets": targets[k * m : (k + 1) * m],
                "keys": keys[k * m : (k + 1) * m],
            }
            for k in range(self.per_step)
        ]

    def __next__(self) -> dict:
        if not self._queue:
            self._next_step()
        batch = self._queue.pop(0)
        self.batches += 1
        if not self._queue:  # the step is whole: its positions are the stream's state
            self.positions.update(self._pending)
        self.skipped = sum(self._skipped)
        return {**batch, "skipped": self.skipped}

    def state_dict(self) -> dict:
        """Where each of this rank's streams stands after the last whole step it delivered."""
        return {
            "batches": self.batches,
            "steps": self.steps,
            "streams": self.spec.streams,
            "positions": {str(c): list(p) for c, p in self.positions.items()},
            "world_size": self.spec.world_size,
            "num_workers": self.spec.num_workers,
        }


def _saved_positions(state: dict) -> list[tuple[int, int]]:
    return [tuple(p) for p in state.get("positions", {}).values()]


def merge_states(states: list[dict]) -> dict:
    """One data-stream state from every rank's (a resume at another world size reads them all).

    Canonical streams merge by stream id, so each rank of the new size finds its own streams;
    reader positions are kept for the next-pass rule of :class:`TrainStream`.
    """
    states = [s for s in states if s]
    if not states:
        return {}
    first = states[0]
    if first.get("streams"):
        positions = {c: p for s in states for c, p in s.get("positions", {}).items()}
    else:
        positions = {str(i): list(p) for i, p in enumerate(p for s in states for p in _saved_positions(s))}
    steps = {"steps": max(int(s["steps"]) for s in states)} if all("steps" in s for s in states) else {}
    return {
        "batches": 0,
        **steps,
        "positions": positions,
        "world_size": first.get("world_size"),
        "num_workers": first.get("num_workers"),
        **({"streams": first["streams"]} if first.get("streams") else {}),
    }


def train_stream(spec: StreamSpec, state: dict | None = None) -> TrainStream | CanonicalStream:
    """The stream ``spec`` asks for: canonical when it names streams, else one per reader."""
    return CanonicalStream(spec, state) if spec.streams else TrainStream(spec, state)
