"""The plan of a big manifest source, made by Ray tasks: the driver holds O(shards) state
and writes nothing but the plan's small files.

A record's place in the shuffled order is its key: a 64-bit BLAKE2b hash, keyed by the
seed, of its content (URL, labels, size, other fields). Sorting by key is a uniform shuffle
that does not depend on how the manifest is cut into files or byte ranges, how many tasks
ran, or in which order they finished: same inputs and seed, same plan bytes.

1. **scatter**, one task per newline-aligned byte range of a manifest file (a compressed
   file is one range): parse and validate its lines, count rejects by reason with the first
   example, and append each record to the bucket of its key (buckets split the key space in
   equal parts), one scratch file per (bucket, range); a marker per range written last lets
   a rerun reuse finished ranges.
2. **sort**, one task per bucket: resolve labels against the vocabulary (`classes_file`, or
   the names the ranges reported), drop unknown ones, sort by key.
3. **cut**, on the driver: shard boundaries from the bucket counts (with `shard_bytes`,
   from each bucket's size estimates, one bucket in memory at a time).
4. **write**, one task per bucket: the plan files of the shards that start in that bucket.

A line belongs to the range holding its first byte; a range reads past its end to finish
its last line. CSV records must be one line each (no newline inside a quoted field).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from . import failures as F
from .config import PrepConfig, fingerprint
from .plan_format import (
    KEY_DIGITS,
    PLAN_DIR,
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
from .sources import (
    COMPRESSED_EXTENSIONS,
    IGNORED,
    Entry,
    Rejected,
    _csv_rows,
    _jsonl_rows,
    _manifest_entry,
    check_csv_header,
    class_units,
    csv_delimiter,
    manifest_files,
    unit_entries,
)
from .storage import ensure_dir, is_local, join, list_names, open_fs, write_bytes

log = logging.getLogger("data_prep")

WHERE = "\x00"  # stands for `manifest:line` until the driver knows the line number


@dataclass(frozen=True)
class Range:
    """What one scatter task reads: bytes [start, end) of one manifest file (end -1: the
    whole compressed file), or the class folders / per-class tars in `units`."""

    rid: int
    file: int
    path: str
    url: str
    start: int
    end: int
    header: list[str] | None  # CSV fieldnames; None for JSONL
    units: tuple[str, ...] = ()


def worth_ray(cfg: PrepConfig, kind: str) -> bool:
    """Whether the source is big enough for `planning.on_ray_bytes` / `on_ray_folders`."""
    fs, path = open_fs(cfg.source, cfg.storage_options)
    p = cfg.planning
    if kind == "manifest":
        return (
            bool(p.on_ray_bytes)
            and sum(fs.size(name) for name, _ in manifest_files(fs, path, cfg.source)) >= p.on_ray_bytes
        )
    return bool(p.on_ray_folders) and len(class_units(fs, path, kind)[0]) >= p.on_ray_folders


def plan_on_ray(cfg: PrepConfig, kind: str, write: bool = True) -> Plan:
    """`build_plan` in Ray tasks (see the module docstring). Uses the running Ray, else
    starts one (`cfg.ray_address`) and shuts it down after."""
    fs, path = open_fs(cfg.source, cfg.storage_options)
    if kind == "manifest":
        ranges, total = _ranges(fs, path, cfg)
        n_buckets, ignored = max(1, math.ceil(total / cfg.planning.bucket_bytes)), 0
    else:
        ranges, ignored = _unit_ranges(fs, path, cfg, kind)
        n_buckets = max(1, len(ranges))  # about one group of folders' records a bucket
    work = _work_url(cfg, ranges, n_buckets)
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address)
    try:
        scattered, names = _scatter_all(cfg, kind, ranges, n_buckets, work)
        plan = _finish(cfg, kind, ranges, scattered, names, ignored, n_buckets, work, write)
    finally:
        if started:
            ray.shutdown()
    wfs, wpath = open_fs(work, cfg.storage_options)
    wfs.rm(wpath, recursive=True)
    if cfg.planning.scratch is None and is_local(wfs):
        with contextlib.suppress(OSError):  # other plans' scratch still there
            os.rmdir(posixpath.dirname(wpath))
    return plan


# ---------------------------------------------------------------- driver


def _ranges(fs, path: str, cfg: PrepConfig) -> tuple[list[Range], int]:
    """The byte ranges of every manifest file in line order, and the files' total size.
    Raises `ValueError` naming a CSV file whose header lacks a path or label column."""
    ranges: list[Range] = []
    total = 0
    for i, (name, url) in enumerate(manifest_files(fs, path, cfg.source)):
        size = fs.size(name)
        total += size
        delimiter = csv_delimiter(name)
        header = None
        if delimiter:
            with fs.open(name, "rt", encoding="utf-8", errors="replace", compression="infer", newline="") as f:
                header = next(csv.reader(f, delimiter=delimiter), [])
            check_csv_header(header, url)
        if name.lower().endswith(COMPRESSED_EXTENSIONS):
            ranges.append(Range(len(ranges), i, name, url, 0, -1, header))
            continue
        step = cfg.planning.range_bytes
        for start in range(0, size, step):
            ranges.append(Range(len(ranges), i, name, url, start, min(size, start + step), header))
    return ranges, total


def _unit_ranges(fs, path: str, cfg: PrepConfig, kind: str) -> tuple[list[Range], int]:
    """Groups of `planning.folders_per_task` class folders or tars, and the count of other
    entries of the source folder (ignored)."""
    units, ignored = class_units(fs, path, kind)
    step = cfg.planning.folders_per_task
    return [
        Range(i, 0, path, cfg.source, 0, 0, None, tuple(units[lo : lo + step]))
        for i, lo in enumerate(range(0, len(units), step))
    ], ignored


def _work_url(cfg: PrepConfig, ranges: list[Range], n_buckets: int) -> str:
    """A scratch folder private to this plan's settings, range layout and manifest file
    versions, so that a rerun reuses only ranges scattered the same way from the same bytes."""
    fs = open_fs(cfg.source, cfg.storage_options)[0]
    versions = [fs.ukey(p) for p in sorted({r.path for r in ranges if not r.units})]
    layout = json.dumps(
        [fingerprint(cfg), n_buckets, versions, [(r.url, r.start, r.end, r.units) for r in ranges]]
    ).encode()
    base = cfg.planning.scratch or join(cfg.output, PLAN_DIR, "_work")
    return join(base, hashlib.sha256(layout).hexdigest()[:16])


def _bounded(calls: list[Callable[[], ray.ObjectRef]], limit: int) -> Iterator[tuple[int, Any]]:
    """Run `calls` with at most `limit` in flight; yield (index, result) as they finish."""
    pending = list(reversed(range(len(calls))))
    in_flight: dict[ray.ObjectRef, int] = {}
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            i = pending.pop()
            in_flight[calls[i]()] = i
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            yield in_flight.pop(ref), ray.get(ref)


def _limit(cfg: PrepConfig) -> int:
    return cfg.planning.max_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _options(cfg: PrepConfig) -> dict[str, Any]:
    from .placement import placement

    return {"max_retries": cfg.retries, "retry_exceptions": True, **placement(cfg)}


def _scatter_all(
    cfg: PrepConfig, kind: str, ranges: list[Range], n_buckets: int, work: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """Scatter every range not yet scattered; return every range's summary, in range order,
    and the label names of them all (taken out of the summaries: the driver holds one copy
    of the vocabulary, not one per range)."""
    fs, root = open_fs(work, cfg.storage_options)
    done = list_names(fs, join(root, "ranges"))
    summaries: dict[int, dict[str, Any]] = {}
    names: set[str] = set()
    for r in ranges:
        if f"{r.rid:06d}.json" in done:
            summaries[r.rid] = json.loads(fs.cat_file(join(root, "ranges", f"{r.rid:06d}.json")))
            names.update(summaries[r.rid].pop("names"))
    for d in ("ranges", *(f"scatter/{b:05d}" for b in range(n_buckets))):
        ensure_dir(fs, join(root, d))
    todo = [r for r in ranges if r.rid not in summaries]
    if summaries:
        log.info("reusing %d of %d ranges already scattered in %s", len(summaries), len(ranges), work)
    task = _scatter_task.options(**_options(cfg))
    cfg_ref = ray.put(cfg)
    calls = [lambda r=r: task.remote(cfg_ref, kind, r, n_buckets, work) for r in todo]
    start = time.perf_counter()
    records = rejects = 0
    with tqdm(total=len(ranges), initial=len(summaries), unit="range", desc="planning") as bar:
        for i, summary in _bounded(calls, _limit(cfg)):
            names.update(summary.pop("names"))
            summaries[todo[i].rid] = summary
            records += summary["entries"]
            rejects += sum(summary["failures"].values())
            bar.update(1)
            rate = records / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(records_s=f"{rate:,.0f}", rejects=rejects)
    return [summaries[r.rid] for r in ranges], names


def _finish(
    cfg: PrepConfig,
    kind: str,
    ranges: list[Range],
    scattered: list[dict[str, Any]],
    names: set[str],
    ignored: int,
    n_buckets: int,
    work: str,
    write: bool,
) -> Plan:
    """Sort, cut and write, from the ranges' summaries and label names."""
    max_int = -1
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    first_line = _first_lines(ranges, scattered)
    for r, s in zip(ranges, scattered, strict=True):
        max_int = max(max_int, s["max_int"])
        failures.update(s["failures"])
        for reason, (line, text) in s["examples"].items():
            examples.setdefault(reason, text.replace(WHERE, f"{r.url}:{first_line[r.rid] + line}"))
    entries = sum(s["entries"] for s in scattered)
    ignored += sum(s["ignored"] for s in scattered)
    listed = entries + sum(failures.values())
    classes = read_classes(cfg) if cfg.classes_file else derive_classes(names, max_int)
    sorted_ = _sort_all(cfg, ranges, scattered, n_buckets, work, classes)
    kept = sum(s["count"] for s in sorted_)
    unknown = [s for s in sorted_ if s["unknown"]]
    if unknown:
        failures[F.UNKNOWN_LABEL] += sum(s["unknown"] for s in unknown)
        rid, line, text = min(s["example"] for s in unknown)
        examples.setdefault(F.UNKNOWN_LABEL, f"{ranges[rid].url}:{first_line[rid] + line}: {text}")
    if kept == 0:
        raise ValueError(
            f"data-prep source {cfg.source} has no usable samples "
            f"(listed {listed}, failures {dict(failures)}, ignored {ignored})"
        )
    holdout = holdout_size(cfg, kept)
    counts = [s["count"] for s in sorted_]
    cuts = _cuts(cfg, counts, holdout, work)
    splits = _write_all(cfg, cuts, counts, work, write)
    plan = Plan(
        fingerprint=fingerprint(cfg),
        source=cfg.source,
        source_kind=kind,
        classes=classes,
        multi_label=any(s["multi"] for s in sorted_),
        listed=listed,
        ignored=ignored,
        failures=dict(sorted(failures.items())),
        examples=dict(sorted(examples.items())),
        splits=splits,
    )
    if write:
        plan_writer(cfg)(PLAN_FILE, plan.to_json())
    return plan


def _first_lines(ranges: list[Range], scattered: list[dict[str, Any]]) -> list[int]:
    """The number of lines of its file before each range."""
    out, before, file = [], 0, -1
    for r, s in zip(ranges, scattered, strict=True):
        if r.file != file:
            before, file = 0, r.file
        out.append(before)
        before += s["lines"]
    return out


def _sort_all(
    cfg: PrepConfig, ranges: list[Range], scattered: list[dict[str, Any]], n_buckets: int, work: str, classes: list[str]
) -> list[dict[str, Any]]:
    """Sort every bucket; each bucket's count, unknown labels and whether it is multi-label."""
    fs, root = open_fs(work, cfg.storage_options)
    ensure_dir(fs, join(root, "sorted"))
    holders: list[list[int]] = [[] for _ in range(n_buckets)]
    for r, s in zip(ranges, scattered, strict=True):
        for b in s["buckets"]:
            holders[b].append(r.rid)
    task = _sort_task.options(**_options(cfg))
    index_ref = ray.put({name: i for i, name in enumerate(classes)})
    estimates = cfg.shard_bytes is not None
    calls = [
        lambda b=b: task.remote(work, b, holders[b], index_ref, len(classes), estimates, cfg.storage_options)
        for b in range(n_buckets)
    ]
    out: list[dict[str, Any]] = [{}] * n_buckets
    for b, result in tqdm(_bounded(calls, _limit(cfg)), total=n_buckets, unit="bucket", desc="shuffling"):
        out[b] = result
    return out


@dataclass(frozen=True)
class Cut:
    """One shard: its name, first key, and [start, end) in the global shuffled order."""

    split: str
    index: int
    key: int
    start: int
    end: int


def _cuts(cfg: PrepConfig, counts: list[int], holdout: int, work: str) -> list[Cut]:
    """Shard boundaries: the holdout from the head of the order, then the train split, each
    cut into shards of `shard_size` (fewer when `shard_bytes` is reached), as in-process."""
    splits = [(cfg.holdout.name, holdout), (cfg.train_split, sum(counts) - holdout)]
    chunks = _estimates(cfg, counts, work) if cfg.shard_bytes is not None else None
    buf = np.zeros(0, np.int64)
    cuts: list[Cut] = []
    offset = 0
    for split, n in splits:
        pos = index = 0
        while pos < n:
            k = min(cfg.shard_size, n - pos)
            if chunks is not None:
                while len(buf) < k:
                    buf = np.concatenate([buf, next(chunks)])
                cum = np.cumsum(buf[:k])
                k = max(1, int(np.searchsorted(cum, cfg.shard_bytes, side="right")))
                buf = buf[k:]
            cuts.append(Cut(split, index, pos, offset + pos, offset + pos + k))
            pos += k
            index += 1
        offset += n
    return cuts


def _estimates(cfg: PrepConfig, counts: list[int], work: str) -> Iterator[np.ndarray]:
    fs, root = open_fs(work, cfg.storage_options)
    for b, n in enumerate(counts):
        if n:
            yield np.frombuffer(fs.cat_file(join(root, "sorted", f"{b:05d}.est")), np.int64)


def _write_all(cfg: PrepConfig, cuts: list[Cut], counts: list[int], work: str, write: bool) -> dict[str, SplitPlan]:
    """Write each shard's plan from the task of the bucket it starts in."""
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    by_bucket: dict[int, list[Cut]] = {}
    for cut in cuts:
        b = int(np.searchsorted(starts, cut.start, side="right")) - 1
        while counts[b] == 0:
            b += 1
        by_bucket.setdefault(b, []).append(cut)
    if write:
        fs, root = open_fs(cfg.output, cfg.storage_options)
        ensure_dir(fs, join(root, PLAN_DIR))
    task = _write_task.options(**_options(cfg))
    buckets = sorted(by_bucket)
    calls = [lambda b=b: task.remote(cfg, work, b, starts, by_bucket[b], write) for b in buckets]
    sizes: dict[tuple[str, int], tuple[int, int]] = {}
    for _, result in tqdm(_bounded(calls, _limit(cfg)), total=len(calls), unit="bucket", desc="writing plans"):
        sizes.update(result)
    splits: dict[str, SplitPlan] = {}
    for cut in cuts:
        sp = splits.setdefault(cut.split, SplitPlan())
        count, nbytes = sizes[(cut.split, cut.index)]
        sp.shard_counts.append(count)
        sp.shard_bytes.append(nbytes)
    return {name: splits[name] for name in (cfg.train_split, cfg.holdout.name) if name in splits}


# ---------------------------------------------------------------- tasks


@ray.remote(num_cpus=1)
def _scatter_task(cfg: PrepConfig, kind: str, r: Range, n_buckets: int, work: str) -> dict[str, Any]:
    return scatter_range(cfg, kind, r, n_buckets, work)


def scatter_range(cfg: PrepConfig, kind: str, r: Range, n_buckets: int, work: str) -> dict[str, Any]:
    """Parse or list one range, write its records to their buckets' scratch files, then its
    marker; return the marker's summary (lines, entries, ignored, failures, first example of
    each reason with its line in the range, label names, largest index label, buckets)."""
    fs, path = open_fs(cfg.source, cfg.storage_options)
    key = str(cfg.seed).encode()
    buckets: dict[int, list[bytes]] = {}
    failures: Counter = Counter()
    examples: dict[str, tuple[int, str]] = {}
    names: set[str] = set()
    max_int = -1
    entries = ignored = 0
    lines = _LineCounter()
    items = (
        enumerate((e for unit in r.units for e in unit_entries(fs, unit, kind)), 1)
        if r.units
        else _range_items(fs, r, posixpath.dirname(r.path), lines)
    )
    for local, item in items:
        if not isinstance(item, Entry):
            if item.reason == IGNORED:
                ignored += 1
            else:
                failures[item.reason] += 1
                examples.setdefault(item.reason, (local, item.where))
            continue
        entries += 1
        for label in item.labels:
            if type(label) is str:
                names.add(label)
            else:
                max_int = max(max_int, label)
        content = _content(item)
        digest = hashlib.blake2b(content, digest_size=8, key=key).hexdigest().encode()
        b = int(digest[:8], 16) * n_buckets >> 32
        estimate = item.size if item.size is not None else cfg.assumed_sample_bytes
        buckets.setdefault(b, []).append(b"%s\t%d\t%d:%d\t%s\n" % (digest, estimate, r.rid, local, content))
    wfs, root = open_fs(work, cfg.storage_options)
    for b, recs in buckets.items():
        write_bytes(wfs, join(root, "scatter", f"{b:05d}", f"{r.rid:06d}"), b"".join(recs))
    summary = {
        "lines": lines.n,
        "entries": entries,
        "ignored": ignored,
        "failures": dict(failures),
        "examples": examples,
        "names": sorted(names),
        "max_int": max_int,
        "buckets": sorted(buckets),
    }
    write_bytes(wfs, join(root, "ranges", f"{r.rid:06d}.json"), json.dumps(summary).encode())
    return json.loads(json.dumps(summary))  # as a rerun reads it back


def _content(item: Entry) -> bytes:
    """The record as three tab-separated fields: its labels as listed, its URL as JSON, and
    the plan line's fields after the labels (`,"size":...}`), cut where the sort task puts the
    resolved labels; formatted as the in-process planner's `json.dumps` formats them."""
    tail: dict[str, Any] = {}
    if item.size is not None:
        tail["size"] = item.size
    if item.member is not None:
        tail["member"], tail["offset"] = item.member, item.offset
    if item.extra:
        tail["extra"] = item.extra
    rest = "," + _COMPACT.encode(tail)[1:] if tail else "}"
    labels = item.labels
    if all(type(label) is str for label in labels):  # the usual case, without the encoder's call layers
        labels = "[" + ",".join(map(_string, labels)) + "]"
    else:
        labels = _COMPACT.encode(labels)
    return f"{labels}\t{_string(item.url)}\t{rest}".encode()


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps(.., separators=) makes one a call
_string = json.encoder.encode_basestring_ascii  # a str as JSON (C), as _COMPACT writes it


class _LineCounter:
    """How many lines `_range_lines` has read: the line numbers of rejects are made global
    from each range's count once every range before it is known."""

    n = 0


def _range_items(fs, r: Range, base: str, lines: _LineCounter) -> Iterator[tuple[int, Any]]:
    """(line in the range, Entry or Rejected) of each record of the range."""
    text = (raw.decode("utf-8", errors="replace") for raw in _range_lines(fs, r, lines))
    skip = 0
    if r.header is not None and r.start == 0:
        next(text, None)  # the header
        skip = 1
    delimiter = csv_delimiter(r.path)
    rows = _csv_rows(text, r.url, delimiter, r.header) if delimiter else _jsonl_rows(text)
    for line, row in rows:
        if isinstance(row, str):
            yield line + skip, Rejected(F.BAD_MANIFEST_LINE, f"{WHERE}: {row}")
            continue
        yield line + skip, _manifest_entry(fs, base, row, WHERE)


def _range_lines(fs, r: Range, lines: _LineCounter) -> Iterator[bytes]:
    """The lines whose first byte lies in the range, each read to its end."""
    if r.end < 0:
        with fs.open(r.path, "rb", compression="infer") as f:
            for line in f:
                lines.n += 1
                yield line
        return
    with fs.open(r.path, "rb") as f:
        pos = r.start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the rest of a line that started before the range
        while pos < r.end:
            line = f.readline()
            if not line:
                break
            lines.n += 1
            pos += len(line)
            yield line


def sort_bucket(
    work: str,
    b: int,
    rids: list[int],
    index: dict[str, int],
    n_classes: int,
    estimates: bool,
    storage_options: dict[str, Any],
) -> dict[str, Any]:
    """Resolve the labels of bucket `b`'s records, sort them by key and write them as
    `<estimated bytes>\\t<plan line without its key>` (and, with `estimates`, the estimates
    as int64). Returns the count kept, whether any is multi-label, the unknown-label count
    and the first of those (range, line in range, text)."""
    fs, root = open_fs(work, storage_options)
    out: list[bytes] = []
    unknown = 0
    example = None
    multi = False
    for rid in rids:
        for line in fs.cat_file(join(root, "scatter", f"{b:05d}", f"{rid:06d}")).splitlines():
            digest, estimate, where, raw, url, rest = line.split(b"\t", 5)
            labels = resolve_labels(_labels_of(raw), index, n_classes)
            if labels is None:
                unknown += 1
                r, local = (int(x) for x in where.split(b":"))
                candidate = (r, local, f"{json.loads(url)}: labels {json.loads(raw)}")
                example = candidate if example is None else min(example, candidate)
                continue
            multi = multi or len(labels) > 1
            out.append(
                b'%s\t%s\t"url":%s,"labels":[%s]%s'
                % (digest, estimate, url, b",".join(b"%d" % i for i in labels), rest)
            )
    out.sort()  # by key; equal keys only for equal records
    write_bytes(fs, join(root, "sorted", f"{b:05d}"), b"".join(line[17:] + b"\n" for line in out))
    if estimates:
        write_bytes(
            fs,
            join(root, "sorted", f"{b:05d}.est"),
            np.array([int(line[17 : line.index(b"\t", 17)]) for line in out], np.int64).tobytes(),
        )
    return {"count": len(out), "multi": multi, "unknown": unknown, "example": example}


def _labels_of(raw: bytes) -> list:
    """A record's labels as `_content` wrote them: names without escapes split as they are
    (a quote or backslash in a name is escaped, so it takes the JSON path), else JSON."""
    if raw.startswith(b'["') and b"\\" not in raw:
        return raw[2:-2].decode().split('","')
    return json.loads(raw.decode())


@ray.remote(num_cpus=1)
def _write_task(
    cfg: PrepConfig, work: str, b: int, starts: list[int], cuts: list[Cut], write: bool
) -> dict[tuple[str, int], tuple[int, int]]:
    return write_cuts(cfg, work, b, starts, cuts, write)


def write_cuts(
    cfg: PrepConfig, work: str, b: int, starts: list[int], cuts: list[Cut], write: bool
) -> dict[tuple[str, int], tuple[int, int]]:
    """Write the plans of `cuts` (shards starting in bucket `b`, reading on into the next
    buckets for the last); return each one's (samples, estimated bytes)."""
    fs, root = open_fs(work, cfg.storage_options)
    sink = plan_writer(cfg) if write else (lambda name, data: None)
    lines: list[bytes] = []
    first = starts[b]  # global position of lines[0]
    nxt = b
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for cut in cuts:
        while first + len(lines) < cut.end:
            lines += fs.cat_file(join(root, "sorted", f"{nxt:05d}")).splitlines()
            nxt += 1
        rows = [line.split(b"\t", 1) for line in lines[cut.start - first : cut.end - first]]
        data = b"".join(b'{"key":"%0*d",%s\n' % (KEY_DIGITS, cut.key + j, body) for j, (_, body) in enumerate(rows))
        sink(shard_name(cut.split, cut.index) + ".jsonl", data)
        out[(cut.split, cut.index)] = (len(rows), sum(int(est) for est, _ in rows))
    return out


_sort_task = ray.remote(num_cpus=1)(sort_bucket)  # sort_bucket as a Ray task of one CPU
