"""Where a loader worker's CPU goes, stage by stage, before and after issue 20, in one process.

    .venv/bin/python bench/input_breakdown.py [--images 1000] [--rounds 3] [--batch 64] [--size 224]

Makes the JPEGs and the two shard sets that bench_input.py makes (originals, shorter side
256), then measures each stage of `pipeline.data.TrainStream`'s worker in CPU microseconds
per image (user + system, `getrusage`; robust to other processes' load, unlike wall time):

  read       the shard's tar members -> sample dicts: `tarfile` (before) / `iter_tar_samples`
  decode     `decode_train` (inception crop, flip, bilinear resize): the same both times
  labels     `sample_labels` (the sample's JSON)
  batch      images -> a batch tensor plus multi-hot targets: `np.stack` and torch indexing
             (before) / each image written into the batch, targets through numpy
  hand-over  one batch from a dataloader worker to the consumer, worker side: a heap batch
             that the dataloader copies into fresh shared memory (before) / a batch built in
             shared memory (after); the worker's pages are touched as a real batch's are
  normalise  `to_model_input` on the consumer (CPU here; on the GPU in training)

The "before" recipes are the replaced code, kept here verbatim. Rounds alternate before and
after; the table gives medians. The last lines give decode / (sum of worker stages): the
share of the decoder's rate a worker can reach, the target being >= 0.9.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import statistics
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data_prep import make_images  # noqa: E402
from bench_input import AREA, SEED, shard  # noqa: E402

from pipeline.data import (  # noqa: E402
    ShardIndex,
    batch_tensor,
    decode_train,
    iter_tar_samples,
    multi_hot,
    sample_labels,
    to_model_input,
)


def cpu_us() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1e6


def per_item(fn: Callable[[], int]) -> float:
    """CPU microseconds per item of `fn()`, which returns how many items it did."""
    t = cpu_us()
    n = fn()
    return (cpu_us() - t) / n


# ---------------------------------------------------------------- the replaced code


def tarfile_samples(url: str):
    """`iter_tar_samples` before issue 20: Python's `tarfile` in stream mode."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = os.path.basename(member.name).partition(".")
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current


def batch_before(images: list[np.ndarray], labels: list[list[int]], classes: int):
    out = torch.zeros(len(labels), classes)
    for row, ls in enumerate(labels):
        out[row, ls] = 1.0
    return torch.from_numpy(np.stack(images)), out


def batch_after(images: list[np.ndarray], labels: list[list[int]], classes: int, shared: bool = False):
    batch = batch_tensor((len(images), *images[0].shape), torch.uint8, shared)
    pixels = batch.numpy()
    for i, image in enumerate(images):  # in the stream each image is written as it is decoded
        pixels[i] = image
    return batch, multi_hot(labels, classes, batch_tensor((len(labels), classes), torch.float32, shared))


class _Batches(torch.utils.data.IterableDataset):
    """Endless batches of the given images, assembled the `before` or `after` way."""

    def __init__(self, images: list[np.ndarray], labels: list[list[int]], after: bool):
        self.images, self.labels, self.after = images, labels, after

    def __iter__(self):
        while True:
            if self.after:
                yield batch_after(self.images, self.labels, 10, shared=True)
            else:
                yield batch_before(self.images, self.labels, 10)


def handover(images: list[np.ndarray], labels: list[list[int]], after: bool, batches: int = 16) -> float:
    """Worker CPU microseconds per image to build and hand over a batch, less building it
    in-process (measured right after, so that what remains is the hand-over)."""
    loader = torch.utils.data.DataLoader(
        _Batches(images, labels, after), batch_size=None, num_workers=1, prefetch_factor=2
    )
    it = iter(loader)
    next(it)
    worker = psutil.Process().children(recursive=True)[0]
    t0 = sum(worker.cpu_times()[:2])
    for _ in range(batches):
        next(it)
    total = (sum(worker.cpu_times()[:2]) - t0) * 1e6 / (batches * len(images))
    del it, loader
    gc.collect()
    build = per_item(
        lambda: sum(len((batch_after if after else batch_before)(images, labels, 10)[0]) for _ in range(batches))
    )
    return total - build


# ---------------------------------------------------------------- the measurement


def stages(index: str, batch: int, size: int) -> dict[str, tuple[float, float]]:
    """(before, after) CPU microseconds per image of every stage."""
    urls = [url for url, _ in ShardIndex.load(index).shards]
    read_before = per_item(lambda: sum(1 for u in urls for _ in tarfile_samples(u)))
    read_after = per_item(lambda: sum(1 for u in urls for _ in iter_tar_samples(u)))
    samples = [s for u in urls for s in iter_tar_samples(u)]
    decode = per_item(
        lambda: len([decode_train(s["jpg"], size, random.Random(i), AREA, True) for i, s in enumerate(samples)])
    )
    labels = per_item(lambda: len([sample_labels(s) for s in samples]))
    images = [decode_train(s["jpg"], size, random.Random(SEED), AREA, True) for s in samples[:batch]]
    ys = [sample_labels(s) for s in samples[:batch]]
    assembled = {}
    for after, fn in ((False, batch_before), (True, batch_after)):
        assembled[after] = per_item(lambda fn=fn: sum(len(fn(images, ys, 10)[0]) for _ in range(16)))
    x = torch.from_numpy(np.stack(images))
    normalise = per_item(lambda: sum(len(to_model_input(x)) for _ in range(16)))
    return {
        "read": (read_before, read_after),
        "decode": (decode, decode),
        "labels": (labels, labels),
        "batch": (assembled[False], assembled[True]),
        "hand-over": (handover(images, ys, False), handover(images, ys, True)),
        "normalise (consumer)": (normalise, normalise),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="input_breakdown-") as tmp:
        work = Path(tmp)
        make_images(work / "src", args.images)
        indexes = {
            name: shard(work / "src", work / f"shards-{short or 'orig'}", args.images, short)
            for name, short in (("original 500x375", None), ("shorter side 256", 256))
        }
        runs: dict[str, list[dict]] = {name: [] for name in indexes}
        for r in range(args.rounds):
            for name, index in indexes.items():
                runs[name].append(stages(index, args.batch, args.size))
            print(f"round {r} done, 1-min load {os.getloadavg()[0]:.1f}", flush=True)
    print(
        f"\nCPU microseconds per image (user + system), median of {args.rounds} rounds; "
        f"{os.cpu_count()} cores, 1-min load {load:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print("| shards | stage | before | after |")
    print("|---|---|---:|---:|")
    totals = {}
    for name, rounds in runs.items():
        med = {stage: tuple(statistics.median(r[stage][i] for r in rounds) for i in (0, 1)) for stage in rounds[0]}
        for stage, (before, after) in med.items():
            print(f"| {name} | {stage} | {before:.0f} | {after:.0f} |")
        worker = [sum(v[i] for s, v in med.items() if s != "normalise (consumer)") for i in (0, 1)]
        print(f"| {name} | **worker total** | **{worker[0]:.0f}** | **{worker[1]:.0f}** |")
        totals[name] = (med["decode"][0], worker)
    print()
    for name, (decode, worker) in totals.items():
        print(
            f"- {name}: decode / worker total = {decode / worker[0]:.2f}x before, "
            f"{decode / worker[1]:.2f}x after (target >= 0.9)"
        )


if __name__ == "__main__":
    main()
