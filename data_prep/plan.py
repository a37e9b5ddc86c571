"""A deterministic shard plan: which sample goes, under which key, into which shard.

The source is listed once into a local spool file (under `TMPDIR`; budget about twice the
listing's size in JSON), shuffled with a two-pass external shuffle (each record goes to a
random bucket file, then each bucket is permuted in memory: a uniform shuffle of the whole
corpus with memory bounded by one bucket), the holdout is carved from the head of the
shuffled order, and the rest is cut into shards. Each shard's plan is written
to `<output>/_plan/{split}-{i:06d}.jsonl` as soon as it is full; `_plan/_plan.json` is
written last and marks the plan complete, so a rerun reuses it instead of listing again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import failures as F
from .config import PrepConfig, fingerprint
from .plan_format import (
    KEY_DIGITS,
    PLAN_FILE,
    Plan,
    SplitPlan,
    derive_classes,
    holdout_size,
    plan_writer,
    read_classes,
    resolve_labels,
    shard_name,
)
from .sources import IGNORED, Entry, detect_kind, iter_source

BUCKET_RECORDS = 250_000  # records held in memory while one bucket is permuted
FLUSH_BYTES = 32 << 20  # bucket-file write buffer
RNG_CHUNK = 1 << 16


def build_plan(cfg: PrepConfig, write: bool = True) -> Plan:
    """List, shuffle, split and cut the source into shards. With `write`, stream the shard
    plans to the output and write `_plan.json` last; without, only count (dry run).
    A big source (`planning.on_ray_bytes`, `on_ray_folders`) is planned by Ray tasks
    (`plan_ray`).
    Raises `ValueError` naming the URL when the source is missing, empty or unusable."""
    kind = detect_kind(cfg)
    if cfg.planning.on_ray_bytes or cfg.planning.on_ray_folders:
        from .plan_ray import plan_on_ray, worth_ray

        if worth_ray(cfg, kind):
            return plan_on_ray(cfg, kind, write)
    given = read_classes(cfg) if cfg.classes_file else None
    sink = plan_writer(cfg) if write else (lambda name, data: None)
    with tempfile.TemporaryDirectory(prefix="data_prep-plan-") as tmp:
        spool = os.path.join(tmp, "spool.jsonl")
        listing = _spool(cfg, kind, spool)
        listed = listing.entries + sum(listing.failures.values())
        classes = given if given is not None else derive_classes(listing.names, listing.max_int)
        n_buckets = max(1, math.ceil(listing.entries / BUCKET_RECORDS))
        kept, multi = _bucket(spool, tmp, n_buckets, classes, cfg, listing)
        os.remove(spool)
        if kept == 0:
            raise ValueError(
                f"data-prep source {cfg.source} has no usable samples "
                f"(listed {listed}, "
                f"failures {dict(listing.failures)}, ignored {listing.ignored})"
            )
        holdout = holdout_size(cfg, kept)
        splits = _emit(tmp, n_buckets, cfg, holdout, sink)
    plan = Plan(
        fingerprint=fingerprint(cfg),
        source=cfg.source,
        source_kind=kind,
        classes=classes,
        multi_label=multi,
        listed=listed,
        ignored=listing.ignored,
        failures=dict(sorted(listing.failures.items())),
        examples=dict(sorted(listing.examples.items())),
        splits=splits,
    )
    if write:
        sink(PLAN_FILE, plan.to_json())
    return plan


@dataclass
class _Listing:
    entries: int = 0
    ignored: int = 0
    failures: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    max_int: int = -1

    def fail(self, reason: str, where: str) -> None:
        self.failures[reason] += 1
        self.examples.setdefault(reason, where)


def _spool(cfg: PrepConfig, kind: str, spool: str) -> _Listing:
    """Pass 1: write each entry as a compact JSON array; count what is not a sample."""
    listing = _Listing()
    with open(spool, "w", encoding="utf-8") as out:
        for item in iter_source(cfg, kind):
            if not isinstance(item, Entry):
                if item.reason == IGNORED:
                    listing.ignored += 1
                else:
                    listing.fail(item.reason, item.where)
                continue
            listing.entries += 1
            for label in item.labels:
                if isinstance(label, str):
                    listing.names.add(label)
                else:
                    listing.max_int = max(listing.max_int, label)
            out.write(
                json.dumps(
                    [item.url, item.labels, item.size, item.member, item.offset, item.extra], separators=(",", ":")
                )
            )
            out.write("\n")
    return listing


def _bucket(
    spool: str, tmp: str, n_buckets: int, classes: list[str], cfg: PrepConfig, listing: _Listing
) -> tuple[int, bool]:
    """Pass 2: resolve labels to indices and scatter records over random bucket files as
    `<estimated bytes>\t<plan line without its key>`, so that pass 3 parses no JSON.
    Returns (records kept, whether any has several labels)."""
    index = {name: i for i, name in enumerate(classes)}
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    buffers: list[list[bytes]] = [[] for _ in range(n_buckets)]
    buffered = kept = 0
    multi = False
    with open(spool, "rb") as f:
        while True:
            lines = f.readlines(RNG_CHUNK * 128)
            if not lines:
                break
            targets = rng.integers(0, n_buckets, size=len(lines))
            for line, b in zip(lines, targets.tolist(), strict=True):
                url, raw_labels, size, member, offset, extra = json.loads(line)
                labels = resolve_labels(raw_labels, index, len(classes))
                if labels is None:
                    listing.fail(F.UNKNOWN_LABEL, f"{url}: labels {raw_labels}")
                    continue
                multi = multi or len(labels) > 1
                rec: dict[str, Any] = {"url": url, "labels": labels}
                if size is not None:
                    rec["size"] = size
                if member is not None:
                    rec["member"], rec["offset"] = member, offset
                if extra:
                    rec["extra"] = extra
                estimate = size if size is not None else cfg.assumed_sample_bytes
                body = json.dumps(rec, separators=(",", ":"))[1:]
                data = f"{estimate}\t{body}\n".encode()
                buffers[b].append(data)
                buffered += len(data)
                kept += 1
            if buffered > FLUSH_BYTES:
                _flush(tmp, buffers)
                buffered = 0
    _flush(tmp, buffers)
    return kept, multi


def _flush(tmp: str, buffers: list[list[bytes]]) -> None:
    for b, lines in enumerate(buffers):
        if lines:
            with open(os.path.join(tmp, f"bucket-{b:06d}"), "ab") as f:
                f.write(b"".join(lines))
            lines.clear()


class _Cutter:
    """Cuts one split's shuffled records into shards and hands each full shard to `sink`."""

    def __init__(self, split: str, cfg: PrepConfig, sink: Callable[[str, bytes], None]):
        self.split, self.cfg, self.sink = split, cfg, sink
        self.plan = SplitPlan()
        self.lines: list[bytes] = []
        self.bytes = 0
        self.position = 0

    def add(self, estimate: int, body: bytes) -> None:
        """Append one record: `body` is its plan line without the leading `{` and key."""
        cap = self.cfg.shard_bytes
        if self.lines and (len(self.lines) >= self.cfg.shard_size or (cap is not None and self.bytes + estimate > cap)):
            self.finish()
        self.lines.append(b'{"key":"%0*d",%s' % (KEY_DIGITS, self.position, body))
        self.bytes += estimate
        self.position += 1

    def finish(self) -> None:
        if not self.lines:
            return
        name = shard_name(self.split, self.plan.num_shards)
        self.sink(name + ".jsonl", b"\n".join(self.lines) + b"\n")
        self.plan.shard_counts.append(len(self.lines))
        self.plan.shard_bytes.append(self.bytes)
        self.lines, self.bytes = [], 0


def _emit(
    tmp: str, n_buckets: int, cfg: PrepConfig, holdout: int, sink: Callable[[str, bytes], None]
) -> dict[str, SplitPlan]:
    """Pass 3: permute each bucket, carve the holdout from the head, cut shards."""
    splits: dict[str, SplitPlan] = {}
    cutter: _Cutter | None = None
    position = 0
    for b in range(n_buckets):
        path = os.path.join(tmp, f"bucket-{b:06d}")
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        os.remove(path)
        for j in np.random.default_rng([cfg.seed, b]).permutation(len(lines)).tolist():
            split = cfg.holdout.name if position < holdout else cfg.train_split
            if cutter is None or cutter.split != split:
                if cutter is not None:
                    cutter.finish()
                cutter = _Cutter(split, cfg, sink)
                splits[split] = cutter.plan
            estimate, body = lines[j].split(b"\t", 1)
            cutter.add(int(estimate), body)
            position += 1
    assert cutter is not None
    cutter.finish()
    order = [cfg.train_split, cfg.holdout.name]
    return {name: splits[name] for name in order if name in splits}
