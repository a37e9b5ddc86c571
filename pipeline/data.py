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

import heapq
import io
import json
import logging
import math
import posixpath
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.augment import randaugment, sample_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardIndex:
    """The index JSON that data_prep writes (wids ``shardlist`` plus classes and totals)."""

    url: str
    shards: tuple[tuple[str, int], ...]  # (absolute url, nsamples)
    classes: tuple[str, ...]
    multi_label: bool

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def load(cls, url: str) -> ShardIndex:
        with fsspec.open(url, "r") as f:
            data = json.load(f)
        base = url.rsplit("/", 1)[0] if "/" in url else "."
        shards = tuple(
            (s["url"] if "://" in s["url"] or s["url"].startswith("/") else posixpath.join(base, s["url"]), int(s["nsamples"]))
            for s in data["shardlist"]
            if int(s["nsamples"]) > 0
        )
        if not shards:
            raise ValueError(f"{url}: the index lists no non-empty shard")
        return cls(url, shards, tuple(data.get("classes", ())), bool(data.get("multi_label", False)))


# ---------------------------------------------------------------- reading samples


_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES less GNU sparse, which we refuse
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: nothing follows


def _tar_number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0o377 else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records (POSIX.1-2008) of a pax header's data."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1].isdigit():
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record of length 0")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_files(f: BinaryIO, url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file of a tar stream, in order.

    The members and names ``tarfile`` gives (ustar, GNU long names, pax ``path``/``size``)
    at a fraction of its per-member Python: a header is one read and four slices. A bad
    header checksum or a truncated member raises ``ValueError`` naming ``url`` and the offset.
    """
    pax_global: dict[str, str] = {}
    pending: dict[str, str] = {}  # pax or GNU long-name fields for the next member
    offset = 0
    while True:
        start, header = offset, f.read(_BLOCK)
        if not header or header == _ZEROS:
            return
        if len(header) < _BLOCK:
            raise ValueError(f"{url}: truncated tar header at byte {start}")
        stored = _tar_number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 256:
            signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
            if stored != signed:
                raise ValueError(f"{url}: bad tar header checksum at byte {start}")
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending else _tar_number(header[124:136])
        skip = 0 if kind in _NO_DATA else size
        data = f.read(skip)
        if len(data) < skip:
            raise ValueError(f"{url}: tar member at byte {start} ends early ({len(data)} of {skip} bytes)")
        f.read(-skip % _BLOCK)
        offset += _BLOCK + skip + (-skip % _BLOCK)
        if kind in (b"x", b"X"):
            pending = {**pax_global, **pending, **_pax_records(data)}
        elif kind == b"g":
            pax_global.update(_pax_records(data))
        elif kind == b"L":
            pending["path"] = _tar_text(data)
        elif kind == b"K":  # a GNU long link name: links are not samples
            continue
        elif kind == b"S" or any(k.startswith("GNU.sparse") for k in pending):
            raise ValueError(f"{url}: sparse tar member at byte {start} is not supported")
        else:
            if "path" in pending:
                name = pending["path"]
            else:
                name, prefix = _tar_text(header[0:100]), _tar_text(header[345:500])
                name = f"{prefix}/{name}" if prefix else name
            pending = {}
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                yield name, data


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Samples of one tar shard in order: ``{"__key__": key, "__url__": url, ext: bytes, ...}``.

    Members of a sample are adjacent and share the key (the basename up to its first dot).
    """
    with fsspec.open(url, "rb") as f:
        current: dict | None = None
        for name, data in iter_tar_files(f, url):
            key, _, ext = posixpath.basename(name).partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current


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
        raise ValueError(f"{index.url}: {index.num_samples} samples cannot feed {num_readers} readers (ranks x workers)")
    units = []
    for url, n in index.shards:
        stride = max(1, math.ceil(n / share - 1e-9))
        units += [Unit(url, n, stride, j) for j in range(stride)]
    return units


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & 0xFFFFFFFFFFFF)


def reader_units(units: list[Unit], reader: int, num_readers: int, seed: int, pass_idx: int) -> list[Unit]:
    """This pass's units of one reader: a seeded permutation dealt to balance sample counts."""
    order = list(range(len(units)))
    _rng(seed, pass_idx, 7919).shuffle(order)
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
            _rng(seed, pass_idx, reader, b0).shuffle(chunk)
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


# ---------------------------------------------------------------- decoding and transforms


def sample_labels(sample: dict) -> list[int]:
    if "json" in sample:
        labels = json.loads(sample["json"]).get("labels")
        if labels:
            return [int(x) for x in labels]
    return [int(sample["cls"])]


def inception_crop_box(width: int, height: int, rng: random.Random, area: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random crop of ``area`` fraction and aspect ratio in [3/4, 4/3] (Inception style)."""
    for _ in range(10):
        target = width * height * rng.uniform(*area)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def decode_train(data: bytes, size: int, rng: random.Random, area: tuple[float, float], flip: bool) -> np.ndarray:
    """Decode, inception-crop, flip and resize to ``size``: HWC uint8.

    The crop is chosen on the header's size first so that large JPEGs decode at a reduced
    scale (``draft``) whenever the crop still has at least ``size`` pixels per side.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        box = inception_crop_box(width, height, rng, area)
        scale = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        if scale >= 2 and img.format == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8, the largest not past `scale`; the returned box
            # is the original extent in drafted pixels (exactly 1/k: the last block is partial).
            drafted = img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
            if drafted is not None:
                k = width / drafted[1][2]
                box = tuple(c / k for c in box)
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((size, size), Image.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def decode_eval(data: bytes, size: int, crop_ratio: float) -> np.ndarray:
    """Resize the shorter side to ``size / crop_ratio``, then centre-crop ``size``: HWC uint8."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (eval_resize(size, crop_ratio),) * 2)  # a JPEG decodes at a reduced scale
        return eval_crop(img, size, crop_ratio)


def eval_resize(size: int, crop_ratio: float) -> int:
    """The shorter side an eval image is resized to before its centre crop of ``size``."""
    return max(size, round(size / crop_ratio))


def eval_crop(img: Image.Image, size: int, crop_ratio: float) -> np.ndarray:
    """A decoded image as evaluation sees it: shorter side resized (bilinear) to
    :func:`eval_resize`, centre crop ``size``; HWC uint8 RGB. The served model uses it too.

    The longer side is truncated, not rounded, as torchvision's ``Resize(int)`` and
    transformers' image processors do, so an exported model's processor gives these pixels."""
    resize = eval_resize(size, crop_ratio)
    img = img.convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    other = int(resize * long / short)
    img = img.resize((resize, other) if w <= h else (other, resize), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC -> NCHW in [-1, 1] (done on the device, so workers ship bytes, not floats)."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def multi_hot(labels: list[list[int]], num_classes: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(len(labels), num_classes)`` float rows with a 1 at each label, written into ``out`` if given."""
    out = torch.zeros(len(labels), num_classes) if out is None else out.zero_()
    rows = out.numpy()  # numpy indexing: a tenth of torch's per-call cost, 64 calls a batch
    for row, ls in enumerate(labels):
        rows[row, ls] = 1.0
    return out


# ---------------------------------------------------------------- the training stream


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
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
    log.warning("skipping sample %s of %s (%s); %d skipped so far", sample.get("__key__"), sample.get("__url__"), error, skipped)


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
            images = _batch_tensor((spec.batch_size, spec.image_size, spec.image_size, 3), torch.uint8, shared)
            pixels = images.numpy()  # each image is written into the batch as soon as it is decoded
            labels, keys = [], []
            pos, skipped = _take(spec, stream, spec.batch_size, pixels, labels, keys,
                                 lambda p: _rng(spec.seed, reader, p[0], p[1]), skipped)
            targets = _batch_tensor((spec.batch_size, spec.num_classes), torch.float32, shared)
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
        if state and ((state.get("world_size"), state.get("num_workers")) != (spec.world_size, spec.num_workers)
                      or state.get("streams")):  # saved in the canonical order
            log.warning("data stream saved with world %s x workers %s, now %s x %s: starting the next pass fresh",
                        state.get("world_size"), state.get("num_workers"), spec.world_size, spec.num_workers)
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


# ---------------------------------------------------------------- the canonical order


def default_streams(global_batch: int, micro_batch: int) -> int:
    """``data.streams`` when not set: a function of the batch sizes alone, never of the world
    size or the loader workers, so that every run of a config reads the same order.

    Each stream gives ``micro_batch / gcd(micro_batch, 8)`` samples a step, so a rank has at
    least ``gcd(micro_batch, 8)`` streams per micro-batch for its loader workers to share, and
    the count is a multiple of global / micro, which every possible world size divides.
    """
    return global_batch // (micro_batch // math.gcd(micro_batch, 8))


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
            images = _batch_tensor((len(mine) * per, spec.image_size, spec.image_size, 3), torch.uint8, shared)
            pixels = images.numpy()
            labels, keys = [], []
            for c in mine:
                positions[c], skipped = _take(spec, readers[c], len(keys) + per, pixels, labels, keys,
                                              lambda p, c=c: _rng(spec.seed, 0x5EED, c, p[0], p[1]), skipped)
            targets = _batch_tensor((len(keys), spec.num_classes), torch.float32, shared)
            yield {"images": images, "targets": multi_hot(labels, spec.num_classes, targets), "keys": keys,
                   "streams": mine, "positions": [positions[c] for c in mine], "worker": worker, "skipped": skipped}


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
        if streams <= 0 or streams % world or spec.global_batch % streams or (spec.global_batch // world) % spec.batch_size:
            raise ValueError(f"{streams} canonical streams cannot feed a global batch of {spec.global_batch} on {world} ranks "
                             f"in micro-batches of {spec.batch_size} (streams must divide the global batch, and the world "
                             "size the streams)")
        self.spec = spec
        state = state or {}
        self.positions = {c: (0, 0) for c in rank_streams(streams, spec.rank, world)}
        if state and state.get("streams") != streams:
            nxt = 1 + max((p[0] for p in _saved_positions(state)), default=-1)
            log.warning("data stream saved %s, now %d canonical streams: starting pass %d fresh",
                        f"with {state['streams']} canonical streams" if state.get("streams") else "in reader order", streams, nxt)
            self.positions = {c: (nxt, 0) for c in self.positions}
        elif state:
            saved = {int(c): tuple(p) for c, p in state["positions"].items()}
            self.positions = {c: saved.get(c, (0, 0)) for c in self.positions}
        self.batches = int(state.get("batches", 0)) if state.get("world_size") == world else 0
        self._steps_at = (_saved_steps(state, spec), self.batches)
        self.per_step = spec.per_step  # micro-batches a step
        self.workers = max(1, spec.num_workers)
        self.loader = torch.utils.data.DataLoader(
            _StepDataset(spec, dict(self.positions)), batch_size=None, num_workers=spec.num_workers,
            persistent_workers=False, prefetch_factor=2 if spec.num_workers else None,
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
        images = torch.cat([chunk["images"][i * per:(i + 1) * per] for _, chunk, i in rows])
        targets = torch.cat([chunk["targets"][i * per:(i + 1) * per] for _, chunk, i in rows])
        keys = [k for _, chunk, i in rows for k in chunk["keys"][i * per:(i + 1) * per]]
        for chunk in chunks:
            self._skipped[int(chunk["worker"])] = int(chunk["skipped"])
            for c, pos in zip(chunk["streams"], chunk["positions"], strict=True):
                self._pending[int(c)] = tuple(int(x) for x in pos)
        m = self.spec.batch_size
        self._queue = [{"images": images[k * m:(k + 1) * m], "targets": targets[k * m:(k + 1) * m],
                        "keys": keys[k * m:(k + 1) * m]} for k in range(self.per_step)]

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


def _saved_steps(state: dict, spec: StreamSpec) -> int:
    """The training steps of data a saved stream had delivered: its own count, or (a state saved
    before streams counted steps) its batches when saved at this world size, else 0."""
    if "steps" in state:
        return int(state["steps"])
    return int(state.get("batches", 0)) // spec.per_step if state.get("world_size") == spec.world_size else 0


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
    return {"batches": 0, **steps, "positions": positions, "world_size": first.get("world_size"),
            "num_workers": first.get("num_workers"), **({"streams": first["streams"]} if first.get("streams") else {})}


def train_stream(spec: StreamSpec, state: dict | None = None) -> TrainStream | CanonicalStream:
    """The stream ``spec`` asks for: canonical when it names streams, else one per reader."""
    return CanonicalStream(spec, state) if spec.streams else TrainStream(spec, state)


# ---------------------------------------------------------------- evaluation sets


def iter_eval_batches(
    index_url: str, image_size: int, batch_size: int, crop_ratio: float = 0.875,
    keep: Callable[[str], bool] | None = None, raw: bool = False,
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
