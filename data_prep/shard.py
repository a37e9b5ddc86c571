"""Write one shard: read its planned samples, process each, and write a byte-deterministic
webdataset tar, then its `_stats.json`. This is the body of one Ray task, and runs just as
well in-process (tests on `memory://`, benchmarks).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, BinaryIO

from fsspec import AbstractFileSystem
from fsspec.core import split_protocol

from . import failures as F
from .config import PrepConfig
from .dedup import Match, NearDuplicateIndex, to_hex
from .disk import reporting_full
from .failures import SampleError
from .plan_format import read_shard_plan, shard_name
from .process import Processed, process_image
from .storage import join, open_fs, ordered_map, staged_file, write_bytes

# Fixed tar header fields: the same samples give the same bytes on any machine, any day.
TAR_MTIME = 0
TAR_USER = "bigdata"
TAR_MODE = 0o444
READ_CHUNK = 8
LOOKUP_BATCH = 64  # samples whose hashes are looked up in the test sets' index at once


class _GiveUp(Exception):
    """The shard's first samples all failed: stop, and let the tar's staging discard it."""


def write_shard(
    cfg: PrepConfig, split: str, index: int, give_up_after: int = 0, test_sets: NearDuplicateIndex | None = None
) -> dict[str, Any]:
    """Make `{split}-{index:06d}.tar` and then its `_stats.json` in `cfg.output`; return the
    stats: count, successes, failures by reason, bytes, md5sum, seconds, ... (all but the
    timings `seconds` and `cpu_seconds` are the same on every run).

    With `test_sets` (the index of `cfg.dedup.against`), a sample within
    `cfg.dedup.max_distance` bits of a test image is dropped (`dedup.mode` exclude) or kept
    (list); either way it is listed in `{split}-{index:06d}_dedup.jsonl` (written before the
    stats, only when the shard has any) and counted per test set in `near_duplicates`.

    With `give_up_after` > 0, a shard whose first `give_up_after` samples all fail stops
    there and writes nothing (no tar, no stats, so a rerun redoes it); the stats returned
    then count only those samples and carry `"gave_up": True`. The driver uses this to stop
    a job over a wrong image root within seconds instead of a whole shard's time.
    A full disk or quota (``data_prep.disk``) ends it with a one-line ``DiskFull`` naming the
    shard; the tar's staging leaves nothing under its name."""
    tar = f"{cfg.output.rstrip('/')}/{shard_name(split, index)}.tar"
    with reporting_full(tar, then="the shard was not written (finished shards are kept); free space there, then rerun"):
        return _write_shard(cfg, split, index, give_up_after, test_sets)


def _write_shard(
    cfg: PrepConfig, split: str, index: int, give_up_after: int = 0, test_sets: NearDuplicateIndex | None = None
) -> dict[str, Any]:
    """:func:`write_shard` itself."""
    start, cpu_start = time.perf_counter(), time.process_time()
    name = shard_name(split, index)
    records = read_shard_plan(cfg, split, index)
    fs, root = open_fs(cfg.output, cfg.storage_options)
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    converted: Counter = Counter()
    kept_original = successes = 0
    gave_up = False
    with_hash = cfg.dedup.hash != "none"
    exclude = cfg.dedup.mode == "exclude"
    near: Counter = Counter()
    listing: list[bytes] = []
    try:
        with staged_file(fs, join(root, name + ".tar")) as f:
            out = _HashingWriter(f)
            writer = TarShard(out)
            samples = _processed(cfg, records, with_hash, test_sets)
            for seen, (rec, img, match) in enumerate(samples, 1):
                if isinstance(img, SampleError):
                    failures[img.reason] += 1
                    examples.setdefault(img.reason, f"{sample_source(rec)}: {img.detail}")
                    if seen == give_up_after and sum(failures.values()) == seen:
                        raise _GiveUp from None
                    continue
                if match is not None:
                    near[match.test_set] += 1
                    listing.append(_listing_line(rec, img.phash, match, exclude))
                    if exclude:
                        continue
                writer.write(_sample(rec, img.data, img.width, img.height, img.phash))
                successes += 1
                kept_original += img.kept_original
                if img.mode != "RGB":
                    converted[img.mode] += 1
            writer.close()
    except _GiveUp:
        gave_up = True
    stats = {
        "shard": name + ".tar",
        "split": split,
        "count": give_up_after if gave_up else len(records),
        "successes": successes,
        "failures": dict(sorted(failures.items())),
        "examples": dict(sorted(examples.items())),
        "kept_original": kept_original,
        "converted_modes": dict(sorted(converted.items())),
        "bytes": out.size,
        "md5sum": out.md5.hexdigest(),
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
    }
    if test_sets is not None:
        stats["near_duplicates"] = dict(sorted(near.items()))
        stats["excluded"] = sum(near.values()) if exclude else 0
        stats["dedup_digest"] = test_sets.digest
        stats["dedup_listing"] = name + "_dedup.jsonl" if listing else None
    if gave_up:
        return {**stats, "bytes": 0, "md5sum": "", "gave_up": True}
    if listing:
        write_bytes(fs, join(root, name + "_dedup.jsonl"), b"".join(listing))
    write_bytes(fs, join(root, name + "_stats.json"), json.dumps(stats, indent=1).encode())
    return stats


def _processed(
    cfg: PrepConfig, records: list[dict[str, Any]], with_hash: bool, test_sets: NearDuplicateIndex | None
) -> Iterator[tuple[dict[str, Any], Processed | SampleError, Match | None]]:
    """Every record, in order, with its processed image (or the `SampleError` that skips it)
    and the test image it is a near-duplicate of, if any. Lookups go `LOOKUP_BATCH` samples
    at a time: one lookup of many hashes costs about what one of a single hash does."""
    batch: list[tuple[dict[str, Any], Processed | SampleError]] = []
    for i, (rec, data) in enumerate(_read_all(cfg, records), 1):
        try:
            if isinstance(data, SampleError):
                raise data
            batch.append((rec, process_image(data, cfg.image, with_hash)))
        except SampleError as e:
            batch.append((rec, e))
        if len(batch) == LOOKUP_BATCH or i == len(records):
            found = [j for j, (_, img) in enumerate(batch) if isinstance(img, Processed)]
            matches: list[Match | None] = [None] * len(batch)
            if test_sets is not None and found:
                hashes = [batch[j][1].phash for j in found]  # type: ignore[union-attr]
                for j, match in zip(found, test_sets.matches(hashes), strict=True):
                    matches[j] = match
            yield from ((rec, img, match) for (rec, img), match in zip(batch, matches, strict=True))
            batch = []


def _read_all(cfg: PrepConfig, records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bytes | SampleError]]:
    """Every record with its bytes, in order, read ahead by `cfg.io_threads` threads. Reads go
    to the threads in chunks: one hand-off per sample costs more than a local read."""
    reader = SampleReader(cfg.storage_options)
    chunks = [records[i : i + READ_CHUNK] for i in range(0, len(records), READ_CHUNK)]
    for chunk in ordered_map(lambda c: [reader(rec) for rec in c], chunks, cfg.io_threads):
        yield from chunk


class SampleReader:
    """Reads a planned record's encoded bytes, reusing one filesystem per protocol."""

    def __init__(self, storage_options: dict[str, Any]):
        self.storage_options = storage_options
        self.filesystems: dict[str, AbstractFileSystem] = {}

    def __call__(self, rec: dict[str, Any]) -> tuple[dict[str, Any], bytes | SampleError]:
        """The record and its bytes, or the `SampleError` reading them gave."""
        url = rec["url"]
        try:
            protocol = split_protocol(url)[0] or "file"
            fs = self.filesystems.get(protocol)
            if fs is None:
                fs = self.filesystems[protocol] = open_fs(url, self.storage_options)[0]
            path = fs._strip_protocol(url)
            if "member" in rec:
                start = rec["offset"]
                return rec, fs.cat_file(path, start=start, end=start + rec["size"])
            return rec, fs.cat_file(path)
        except FileNotFoundError as e:
            return rec, SampleError(F.MISSING_FILE, str(e))
        except Exception as e:  # noqa: BLE001 - permissions, a folder, network: this sample only
            return rec, SampleError(F.READ_ERROR, f"{type(e).__name__}: {e}")


def sample_source(rec: dict[str, Any]) -> str:
    """The fsspec URL of a sample's source: a file, or `tar://member::tar_url`."""
    if "member" in rec:
        return f"tar://{rec['member']}::{rec['url']}"
    return rec["url"]


def _listing_line(rec: dict[str, Any], h: int, match: Match, excluded: bool) -> bytes:
    line = {
        "key": rec["key"],
        "source": sample_source(rec),
        "phash": to_hex(h),
        "test_set": match.test_set,
        "test_id": match.test_id,
        "distance": match.distance,
        "kind": match.kind,
        "excluded": excluded,
    }
    return json.dumps(line).encode("utf-8") + b"\n"


def _sample(rec: dict[str, Any], jpeg: bytes, width: int, height: int, h: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": rec["labels"], "source": sample_source(rec), "width": width, "height": height}
    if h is not None:
        meta["phash"] = to_hex(h)
    for k, v in (rec.get("extra") or {}).items():
        meta.setdefault(k, v)
    return {
        "__key__": rec["key"],
        "jpg": jpeg,
        "cls": str(rec["labels"][0]).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


class TarShard:
    """A webdataset tar written with the standard library: each sample's files as members
    ``<key>.<extension>``, extensions in sorted order, with fixed header fields. The bytes are
    those of webdataset's ``TarWriter(encoder=False, mtime=TAR_MTIME, user=TAR_USER,
    group=TAR_USER, mode=TAR_MODE)`` (tests/test_data_prep.py compares them), which this does
    not use because importing webdataset imports torch: a second of CPU in every shard task."""

    def __init__(self, f: BinaryIO):
        self.tar = tarfile.open(fileobj=f, mode="w|")

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uname = info.gname = TAR_USER
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


class _HashingWriter:
    """A write-only stream that forwards to `f` while counting bytes and hashing them."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
