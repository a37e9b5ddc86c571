"""Input pipeline throughput: our training stream against its own decoder, webdataset's
pipeline and a class-folder reader, on the same images and the same cores.

    .venv/bin/python bench/bench_input.py [--images 1000] [--rounds 3] [--batch 64] [--size 224]

Makes `--images` photo-like JPEGs (500x375 / 375x500, quality 90, as bench_data_prep does)
in class folders and shards them with data_prep twice: originals kept (`keep_original`) and
shorter side 256. Each shard set is also unpacked back into class folders, so every reader
decodes the very same bytes. The baseline row is the decoder alone:

  0. decode_train: `pipeline.data.decode_train` in a loop in this process over the same
     bytes, the same crop, no reading, batching or hand-over: what a loader worker could
     deliver per CPU-second if the decode were all it did.

Then, for 1 and 2 loader worker processes, it times:

  1. ours: `pipeline.data.TrainStream` (shards -> shuffle block -> decode_train -> batch);
  2. webdataset: `wds.WebDataset(resampled=True)` -> `.shuffle(1000)` -> `.map` with our
     `decode_train` -> `.batched`, through a torch DataLoader;
  3. class folders: a map-style dataset reading one file per sample with our `decode_train`,
     shuffled, batched by a torch DataLoader.

All three do the identical work per image (decode, inception crop with area (0.05, 1) and
aspect [3/4, 4/3], flip, bilinear resize to `--size`, uint8 batch) and the consumer
normalises every batch with `to_model_input` (on the GPU in training, here on the CPU).
A run takes one untimed batch (worker start, buffer fill), then times `--images` images in
steady state. One warm-up round, then `--rounds` rounds, the pipelines' order rotating.
The decoder loop runs once per round and shard set, among the pipelines, so it sees the
same load. Prints a table ending with the ratios (targets: ours >= 0.9x decode_train and
>= 1.0x webdataset per worker CPU-second, 2 workers >= 1.8x one; the class-folder ratio is
printed for reference), and, per shard set, how many crops let
`decode_train` decode at reduced scale (`Image.draft`) and what that buys per CPU-second
over a full-size decode of the same crops, in this process.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data_prep import make_images  # noqa: E402

from data_prep.config import ImageConfig, PrepConfig  # noqa: E402
from data_prep.index import write_indexes  # noqa: E402
from data_prep.plan import build_plan  # noqa: E402
from data_prep.shard import write_shard  # noqa: E402
from pipeline.data import (  # noqa: E402
    ShardIndex,
    StreamSpec,
    TrainStream,
    decode_train,
    inception_crop_box,
    sample_labels,
    seeded_rng,
    to_model_input,
)

AREA = (0.05, 1.0)  # the experiment configs' crop_min_area (big_vision's inception crop)
SEED = 0
BLOCK = 1000  # shuffle buffer of ours and of webdataset's pipeline
PIPELINES = ("ours", "webdataset", "class folders")
DECODER = "decode_train"  # the baseline row: the decoder alone, in this process


class Run(NamedTuple):
    wall: float  # images per wall-clock second
    worker_cpu: float  # images per CPU-second of the loader workers (of this process for the decoder)
    main_cpu: float  # CPU-seconds of the consumer (normalising) per wall second; nan for the decoder


# ---------------------------------------------------------------- the data


def shard(src: Path, out: Path, n: int, shorter: int | None) -> str:
    """Shard `src` with data_prep in this process; returns the train index path."""
    image = ImageConfig(resize_mode="shorter", size=shorter, quality=90) if shorter else ImageConfig()
    cfg = PrepConfig(source=str(src), output=str(out), shard_size=max(1, n // 8), image=image)
    plan = build_plan(cfg)
    stats = {split: [] for split in plan.splits}
    for split, i in plan.shards():
        stats[split].append(write_shard(cfg, split, i))
    write_indexes(cfg, plan, stats)
    return str(out / "train_index.json")


def unpack(index: str, dest: Path) -> list[tuple[str, int]]:
    """Write every sample's JPEG bytes to `dest/<class>/<key>.jpg`; returns (path, label)."""
    files = []
    for url, _ in ShardIndex.load(index).shards:
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                key, _, ext = name.partition(".")
                if ext != "jpg":
                    continue
                label = int(tar.extractfile(members[f"{key}.cls"]).read())
                path = dest / f"c{label:02d}" / f"{key}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(m).read())
                files.append((str(path), label))
    return sorted(files)


def draft_share(files: list[tuple[str, int]], size: int) -> float:
    """The fraction of samples whose crop lets `decode_train` decode at 1/2 scale or less."""
    hits = 0
    for i, (path, _) in enumerate(files):
        with Image.open(path) as img:
            x0, y0, x1, y1 = inception_crop_box(*img.size, random.Random(i), AREA)
        hits += min(x1 - x0, y1 - y0) >= 2 * size
    return hits / len(files)


def decode_full_size(data: bytes, size: int, rng: random.Random) -> np.ndarray:
    """`decode_train` without the reduced-scale decode: what a torchvision-style reader does."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR, box=inception_crop_box(*img.size, rng, AREA))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def draft_gain(files: list[tuple[str, int]], size: int, repeats: int = 2) -> float:
    """Images per CPU-second of `decode_train` over the full-size decode, in this process."""
    datas = [Path(p).read_bytes() for p, _ in files]
    cpu = {}
    for name, fn in (("full", decode_full_size), ("draft", lambda d, s, r: decode_train(d, s, r, AREA, True))) * 2:
        t = time.process_time()
        for _ in range(repeats):
            for i, data in enumerate(datas):
                fn(data, size, seeded_rng(SEED, i))
        cpu[name] = time.process_time() - t  # the second pass of each counts (the first warms up)
    return cpu["full"] / cpu["draft"]


# ---------------------------------------------------------------- the three pipelines


def ours(index: str, workers: int, batch: int, size: int) -> Iterable[torch.Tensor]:
    spec = StreamSpec(
        index_url=index,
        rank=0,
        world_size=1,
        num_workers=workers,
        batch_size=batch,
        image_size=size,
        num_classes=10,
        seed=SEED,
        shuffle_block=BLOCK,
        crop_area=AREA,
        flip=True,
    )
    return (b["images"] for b in TrainStream(spec))


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples, strict=True)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


class _WdsTransform:
    """webdataset sample -> (HWC uint8, label) with our decode, seeded per key like ours."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        rng = seeded_rng(SEED, int(sample["__key__"]))
        return decode_train(sample["jpg"], self.size, rng, AREA, True), sample_labels(sample)[0]


def webdataset(index: str, workers: int, batch: int, size: int) -> Iterable[torch.Tensor]:
    urls = [url for url, _ in ShardIndex.load(index).shards]
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=SEED)
        .shuffle(BLOCK)
        .map(_WdsTransform(size))
        .batched(batch, collation_fn=_collate)
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    return (images for images, _ in loader)


class ClassFolders(torch.utils.data.Dataset):
    """One JPEG file per sample, our decode and transforms (torchvision ImageFolder's shape)."""

    def __init__(self, files: list[tuple[str, int]], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.files[i]
        with open(path, "rb") as f:
            data = f.read()
        return decode_train(data, self.size, seeded_rng(SEED, i), AREA, True), label


def class_folders(files: list[tuple[str, int]], workers: int, batch: int, size: int) -> Iterable[torch.Tensor]:
    dataset = ClassFolders(files, size)
    sampler = torch.utils.data.RandomSampler(
        dataset, num_samples=4 * len(dataset), generator=torch.Generator().manual_seed(SEED)
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    return (images for images, _ in loader)


def decoder(files: list[tuple[str, int]], images: int, size: int) -> Run:
    """`decode_train` alone in this process over the shard set's bytes (read first, untimed),
    the same crop and flip draws as the pipelines, until `images` images."""
    datas = [Path(p).read_bytes() for p, _ in files]
    t, cpu, seen = time.perf_counter(), time.process_time(), 0
    while seen < images:
        for i, data in enumerate(datas[: images - seen]):
            decode_train(data, size, seeded_rng(SEED, i), AREA, True)
        seen += min(len(datas), images - seen)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return Run(seen / wall, seen / cpu, float("nan"))


def timed(make: Callable[[], Iterable[torch.Tensor]], images: int) -> Run:
    """Steady-state rate: one untimed batch, then at least `images` images."""
    me = psutil.Process()
    stream = iter(make())
    batch = next(stream)
    workers = me.children(recursive=True)
    cpu0 = [sum(w.cpu_times()[:2]) for w in workers]
    t, main0, seen = time.perf_counter(), time.process_time(), 0
    while seen < images:
        batch = next(stream)
        to_model_input(batch)
        seen += len(batch)
    wall, main = time.perf_counter() - t, time.process_time() - main0
    worker = sum(sum(w.cpu_times()[:2]) for w in workers) - sum(cpu0)
    del stream, batch
    gc.collect()  # shut the loader's workers down before the next run starts its own
    return Run(seen / wall, seen / worker, main / wall)


# ---------------------------------------------------------------- the benchmark


def bench(work: Path, n: int, rounds: int, batch: int, size: int) -> dict:
    t = time.perf_counter()
    paths = make_images(work / "src", n)
    kb = sum(p.stat().st_size for p in paths) / n / 1e3
    formats = {}
    for name, shorter in (("original 500x375", None), ("shorter side 256", 256)):
        index = shard(work / "src", work / f"shards-{shorter or 'orig'}", n, shorter)
        files = unpack(index, work / f"folders-{shorter or 'orig'}")
        kb_fmt = sum(os.path.getsize(p) for p, _ in files) / len(files) / 1e3
        formats[name] = (index, files, kb_fmt, draft_share(files, size), draft_gain(files, size))
    print(
        f"made {n} JPEGs ({kb:.0f} KB each), sharded and unpacked twice in {time.perf_counter() - t:.0f}s", flush=True
    )

    def makers(index: str, files: list, workers: int) -> dict[str, Callable[[], Iterable[torch.Tensor]]]:
        return {
            "ours": lambda: ours(index, workers, batch, size),
            "webdataset": lambda: webdataset(index, workers, batch, size),
            "class folders": lambda: class_folders(files, workers, batch, size),
        }

    results: dict[tuple[str, int, str], list[Run]] = {}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for fmt, (index, files, *_) in formats.items():
            run = decoder(files, n, size)
            if r:
                results.setdefault((fmt, 1, DECODER), []).append(run)
            for workers in (1, 2):
                fns = makers(index, files, workers)
                names = PIPELINES[r % 3 :] + PIPELINES[: r % 3]
                for name in names:
                    run = timed(fns[name], n)
                    if r:
                        results.setdefault((fmt, workers, name), []).append(run)
        print(f"round {r}{' (warm-up)' if r == 0 else ''} done, 1-min load {os.getloadavg()[0]:.1f}", flush=True)
    return {"formats": formats, "results": results, "kb": kb}


def report(out: dict, args: argparse.Namespace, load_before: float) -> None:
    med = statistics.median
    res = out["results"]
    print()
    print(
        f"{args.images} JPEGs 500x375 / 375x500 q90 ({out['kb']:.0f} KB) -> inception crop area "
        f"{AREA}, flip, bilinear {args.size}px, batch {args.batch}, normalised by the consumer; "
        f"median of {args.rounds} rounds after a warm-up; {os.cpu_count()} CPU cores "
        f"({platform.machine()}); 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print()
    print(
        "| shards | KB/image | draft hits | workers | pipeline | images/s (wall) | images/s per worker "
        "| images per worker CPU-s | consumer CPU share |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for fmt, (_, _, kb, hits, _) in out["formats"].items():
        runs = res[(fmt, 1, DECODER)]
        wall = med(r.wall for r in runs)
        print(
            f"| {fmt} | {kb:.0f} | {hits:.0%} | in-process | {DECODER} (baseline) | {wall:.1f} | "
            f"{wall:.1f} | {med(r.worker_cpu for r in runs):.1f} | - |"
        )
        for workers in (1, 2):
            for name in PIPELINES:
                runs = res[(fmt, workers, name)]
                wall = med(r.wall for r in runs)
                print(
                    f"| {fmt} | {kb:.0f} | {hits:.0%} | {workers} | {name} | {wall:.1f} | "
                    f"{wall / workers:.1f} | {med(r.worker_cpu for r in runs):.1f} | "
                    f"{med(r.main_cpu for r in runs):.0%} |"
                )
    print()

    def ratio(a: tuple, b: tuple, field: str = "wall") -> float:
        return med(getattr(x, field) / getattr(y, field) for x, y in zip(res[a], res[b], strict=True))

    for fmt, (*_, hits, gain) in out["formats"].items():
        print(
            f"- {fmt}: reduced-scale decoding fires on {hits:.0%} of crops at {args.size}px; "
            f"decode_train / full-size decode, in-process: {gain:.2f}x per CPU-second"
        )
        for workers in (1, 2):
            print(
                f"- {fmt}, {workers} worker(s): ours / {DECODER} "
                f"{ratio((fmt, workers, 'ours'), (fmt, 1, DECODER), 'worker_cpu'):.2f}x per worker "
                f"CPU-s (target >= 0.9); webdataset / {DECODER} "
                f"{ratio((fmt, workers, 'webdataset'), (fmt, 1, DECODER), 'worker_cpu'):.2f}x"
            )
            print(
                f"- {fmt}, {workers} worker(s): ours / webdataset "
                f"{ratio((fmt, workers, 'ours'), (fmt, workers, 'webdataset')):.2f}x wall, "
                f"{ratio((fmt, workers, 'ours'), (fmt, workers, 'webdataset'), 'worker_cpu'):.2f}x per "
                f"worker CPU-s (target >= 1.0); ours / class folders "
                f"{ratio((fmt, workers, 'ours'), (fmt, workers, 'class folders')):.2f}x wall, "
                f"{ratio((fmt, workers, 'ours'), (fmt, workers, 'class folders'), 'worker_cpu'):.2f}x "
                f"per worker CPU-s"
            )
        scaling = ", ".join(f"{name} {ratio((fmt, 2, name), (fmt, 1, name)):.2f}x" for name in PIPELINES)
        per_cpu = ", ".join(f"{name} {ratio((fmt, 2, name), (fmt, 1, name), 'worker_cpu'):.2f}x" for name in PIPELINES)
        print(
            f"- {fmt}, 2 workers / 1 worker: wall {scaling} (target >= 1.8 on 2 idle cores); "
            f"per worker CPU-s {per_cpu} (what a second worker costs per image)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images generated, and timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="output resolution")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the consumer must not take the workers' cores
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_input-") as tmp:
        out = bench(Path(tmp), args.images, args.rounds, args.batch, args.size)
    report(out, args, load_before)


if __name__ == "__main__":
    main()
