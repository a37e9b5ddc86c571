"""Run a data-prep job on Ray: plan (or reuse the plan), one task per unfinished shard with a
bounded number in flight, then the index files.

A rerun of the same config on the same output resumes: shards whose `_stats.json` exists are
skipped, the others are redone from the saved plan, and the result is byte-identical to an
uninterrupted run (apart from the timings inside `_stats.json`).

Too many bad samples stop the job as soon as that is certain or overwhelmingly likely
(`data_prep.failures.FailureWatch`), not after the last shard: a shard task whose first
`shard_give_up_after` samples all fail gives up and reports them, and the driver checks the
rule after every shard and stops scheduling; finished shards are kept for a resume.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from .config import ConfigError, PrepConfig, validate, with_absolute_paths
from .dedup import NearDuplicateIndex, crop_boxes
from .disk import DiskFull, one_line
from .failures import FailureWatch, failed_in
from .index import write_indexes
from .placement import placement
from .plan import build_plan
from .plan_format import PLAN_DIR, Plan, load_plan, shard_name
from .shard import write_shard
from .storage import join, list_names, open_fs, ordered_map, remove_stale_temps
from .testsets import Unit, hash_units, list_test_set

log = logging.getLogger("data_prep")


class FailureFractionExceeded(RuntimeError):
    """More samples failed (or are bound to fail) than `max_failure_fraction` allows;
    finished shards and their stats are kept, the index files are not written."""


HASH_CHUNK = 64  # test images per hashing task (each hashed at up to 226 crops)


@ray.remote(num_cpus=1)
def _shard_task(
    cfg: PrepConfig, split: str, index: int, give_up_after: int, test_sets: NearDuplicateIndex | None
) -> dict[str, Any]:
    return write_shard(cfg, split, index, give_up_after, test_sets)


@ray.remote(num_cpus=1)
def _hash_task(
    units: list[Unit], storage_options: dict[str, Any], crop: float, shift: float, steps: int, max_pixels: int
) -> tuple[list[int], list[str], np.ndarray, list[str]]:
    return hash_units(units, storage_options, crop, shift, steps, max_pixels)


def run_prep(cfg: PrepConfig) -> dict[str, Any]:
    """Shard `cfg.source` into `cfg.output` and return the summary (samples, failures by
    reason, shards per split, seconds, images per second, ...).

    Uses the running Ray if `ray.is_initialized()`, else `ray.init(address=cfg.ray_address)`
    (None: `RAY_ADDRESS` or a new local instance), and shuts down only a Ray it started.
    Raises `ValueError` for a bad config or a missing/empty source before any task starts,
    `FailureFractionExceeded` when too many samples fail (as soon as that is certain or
    overwhelmingly likely, see `FailureWatch`), `RuntimeError` when a shard task fails after
    its retries.
    """
    validate(cfg)
    cfg = with_absolute_paths(cfg)
    for url in (cfg.source, cfg.output):
        if "memory" in _protocols(cfg, url):
            raise ValueError(
                f"{url}: memory:// is private to one process and invisible to "
                "Ray workers; use a local path or an object store"
            )
    start = time.perf_counter()
    test_units = [
        u
        for i, (name, url) in enumerate(cfg.dedup.against.items())
        for u in list_test_set(i, name, url, cfg.storage_options)
    ]
    plan = load_plan(cfg) or build_plan(cfg)
    _check_failures(cfg, plan, dict(plan.failures), plan.examples)
    fs, root = open_fs(cfg.output, cfg.storage_options)
    removed = remove_stale_temps(fs, root) + remove_stale_temps(fs, join(root, PLAN_DIR))
    if removed:
        log.info("removed %d partial files left by an interrupted run", removed)
    done = list_names(fs, root)
    todo = [(s, i) for s, i in plan.shards() if shard_name(s, i) + "_stats.json" not in done]
    earlier = _read_stats(cfg, sorted(set(plan.shards()) - set(todo)))
    watch = FailureWatch(
        listed=plan.listed,
        max_fraction=cfg.max_failure_fraction,
        remaining=sum(sp.num_samples for sp in plan.splits.values()),
        certain=Counter(plan.failures),
        examples=dict(plan.examples),
    )
    for key, shard_stats in earlier.items():
        watch.finished(key, shard_stats)
    new_stats, shard_seconds = _run_shards(cfg, plan, todo, watch, test_units, earlier) if todo else ({}, 0.0)
    stats = _by_split(plan, {**earlier, **new_stats})
    summary = _summary(cfg, plan, stats, todo, new_stats, start, shard_seconds)
    _check_failures(cfg, plan, summary["failures"], summary["examples"])
    write_indexes(cfg, plan, stats)
    log.info("data prep done: %s", json.dumps(summary))
    return summary


def _protocols(cfg: PrepConfig, url: str) -> tuple[str, ...]:
    protocol = open_fs(url, cfg.storage_options)[0].protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _run_shards(
    cfg: PrepConfig,
    plan: Plan,
    todo: list[tuple[str, int]],
    watch: FailureWatch,
    test_units: list[Unit],
    earlier: dict[tuple[str, int], dict[str, Any]],
) -> tuple[dict[tuple[str, int], dict[str, Any]], float]:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=cfg.ray_address)
    try:
        test_sets = _test_set_index(cfg, test_units) if test_units else None
        if test_sets is not None:
            _check_same_test_sets(cfg, test_sets, earlier)
        return _submit_all(cfg, plan, todo, watch, ray.put(test_sets))
    finally:
        if started_ray:
            ray.shutdown()


def _test_set_index(cfg: PrepConfig, units: list[Unit]) -> NearDuplicateIndex:
    """Hash every test image at every crop box in Ray tasks, once, and index the hashes."""
    start = time.perf_counter()
    d = cfg.dedup
    chunks: list[list[Unit]] = []
    for unit in units:
        if unit.tar or not chunks or chunks[-1][-1].tar or len(chunks[-1]) >= HASH_CHUNK:
            chunks.append([])
        chunks[-1].append(unit)
    task = _hash_task.options(max_retries=cfg.retries, **placement(cfg))
    refs = [
        task.remote(chunk, cfg.storage_options, d.crop, d.crop_shift, d.crop_steps, cfg.image.max_pixels)
        for chunk in chunks
    ]
    sets: list[int] = []
    ids: list[str] = []
    hashes: list[np.ndarray] = []
    errors: list[str] = []
    for ref in tqdm(refs, unit="chunk", desc="hashing test sets"):
        s, i, h, e = ray.get(ref)
        sets += s
        ids += i
        hashes.append(h)
        errors += e
    if errors:
        log.warning("%d test images could not be read and are not compared against, e.g. %s", len(errors), errors[0])
    if not ids:
        raise ValueError(f"no image of the dedup test sets could be read, e.g. {errors[:1]}")
    boxes = crop_boxes(d.crop, d.crop_shift, d.crop_steps)
    index = NearDuplicateIndex(list(d.against), ids, np.array(sets), np.concatenate(hashes), boxes, d.max_distance)
    log.info(
        "hashed %d test images of %d sets at %d crops in %.1f s (index %s, %d bands)",
        len(ids),
        len(d.against),
        len(boxes),
        time.perf_counter() - start,
        index.digest,
        len(index.tables),
    )
    return index


def _check_same_test_sets(
    cfg: PrepConfig, test_sets: NearDuplicateIndex, earlier: dict[tuple[str, int], dict[str, Any]]
) -> None:
    """Finished shards were de-duplicated against the same test-set hashes, or the resumed
    output would mix two test sets."""
    for key, stats in earlier.items():
        if stats.get("dedup_digest") != test_sets.digest:
            raise ConfigError(
                f"invalid data-prep config: dedup.against: the test sets' hashes "
                f"({test_sets.digest}) differ from those shard {shard_name(*key)} of "
                f"{cfg.output} was de-duplicated against ({stats.get('dedup_digest')}): "
                "the test images changed; use a fresh output folder"
            )


def _submit_all(
    cfg: PrepConfig, plan: Plan, todo: list[tuple[str, int]], watch: FailureWatch, test_sets_ref: ray.ObjectRef
) -> tuple[dict[tuple[str, int], dict[str, Any]], float]:
    """One task per shard, at most `max_in_flight` at once (`ray.wait` backpressure); raises
    `FailureFractionExceeded`, cancelling the tasks in flight, as soon as `watch` says so."""
    max_in_flight = cfg.max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = _shard_task.options(max_retries=cfg.retries, retry_exceptions=True, **placement(cfg))
    cfg_ref = ray.put(cfg)
    pending = deque((key, _give_up_after(cfg, watch)) for key in todo)
    in_flight: dict[ray.ObjectRef, tuple[str, int]] = {}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    failed = 0
    total = sum(plan.splits[s].shard_counts[i] for s, i in todo)
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="data_prep", smoothing=0.1) as bar:
        while pending or in_flight:
            _check_watch(cfg, plan, watch, in_flight)
            while pending and len(in_flight) < max_in_flight:
                (split, index), give_up = pending.popleft()
                in_flight[task.remote(cfg_ref, split, index, give_up, test_sets_ref)] = (split, index)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                split, index = in_flight.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:
                    _cancel(in_flight)
                    if isinstance(e, DiskFull):  # also a Ray task's error caused by one: its line, not its traceback
                        raise DiskFull(one_line(e)) from None
                    raise RuntimeError(
                        f"data-prep shard {shard_name(split, index)} failed after {cfg.retries} retries: {e}"
                    ) from e
                if stats.get("gave_up"):
                    watch.gave_up((split, index), stats)
                    pending.appendleft(((split, index), 0))  # redone in full unless we stop
                    continue
                watch.finished((split, index), stats)
                results[(split, index)] = stats
                failed += failed_in(stats)
                bar.update(stats["count"])
                bar.set_postfix(shards=f"{len(results)}/{len(todo)}", failed=failed)
    return results, time.perf_counter() - start


def _give_up_after(cfg: PrepConfig, watch: FailureWatch) -> int:
    """`cfg.shard_give_up_after`, or 0 where that many failed samples could not stop the job
    (e.g. `max_failure_fraction` near 1): a give-up would then only cost a redo."""
    n = cfg.shard_give_up_after
    return n if n and watch.verdict(extra_seen=n, extra_failed=n) else 0


def _check_watch(
    cfg: PrepConfig, plan: Plan, watch: FailureWatch, in_flight: dict[ray.ObjectRef, tuple[str, int]]
) -> None:
    verdict = watch.verdict()
    if verdict:
        _cancel(in_flight)
        raise FailureFractionExceeded(watch.message(cfg.source, verdict, len(plan.shards())))


def _cancel(in_flight: dict[ray.ObjectRef, tuple[str, int]]) -> None:
    """Cancel the shard tasks in flight; a cancelled task leaves no tar and no stats."""
    for ref in in_flight:
        ray.cancel(ref)


def _read_stats(cfg: PrepConfig, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The `_stats.json` of shards finished by earlier runs."""
    fs, root = open_fs(cfg.output, cfg.storage_options)

    def read(key: tuple[str, int]) -> dict[str, Any]:
        return json.loads(fs.cat_file(join(root, shard_name(*key) + "_stats.json")))

    return dict(zip(keys, ordered_map(read, keys, cfg.io_threads), strict=True))


def _by_split(plan: Plan, stats: dict[tuple[str, int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every shard's stats, per split in shard order."""
    return {split: [stats[(split, i)] for i in range(sp.num_shards)] for split, sp in plan.splits.items()}


def _summary(
    cfg: PrepConfig,
    plan: Plan,
    stats: dict[str, list[dict[str, Any]]],
    todo: list,
    new: dict,
    start: float,
    shard_seconds: float,
) -> dict[str, Any]:
    failures: Counter = Counter(plan.failures)
    examples = dict(plan.examples)
    for shard_stats in stats.values():
        for s in shard_stats:
            failures.update(s["failures"])
            for reason, example in s["examples"].items():
                examples.setdefault(reason, example)
    samples = {split: sum(s["successes"] for s in ss) for split, ss in stats.items()}
    made_now = sum(s["successes"] for s in new.values())
    near: Counter = Counter()
    for shard_stats in stats.values():
        for s in shard_stats:
            near.update(s.get("near_duplicates", {}))
    dedup = (
        {
            "near_duplicates": dict(sorted(near.items())),
            "dropped_near_duplicates": sum(s.get("excluded", 0) for ss in stats.values() for s in ss),
        }
        if cfg.dedup.against
        else {}
    )
    return {
        "output": cfg.output,
        "listed": plan.listed,
        "samples": sum(samples.values()),
        "samples_per_split": samples,
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "examples": dict(sorted(examples.items())),
        "shards": {split: sp.num_shards for split, sp in plan.splits.items()},
        "shards_run": len(todo),
        "shards_skipped": len(plan.shards()) - len(todo),
        "num_classes": len(plan.classes),
        "multi_label": plan.multi_label,
        "seconds": round(time.perf_counter() - start, 3),
        "images_per_second": round(made_now / shard_seconds, 1) if shard_seconds else 0.0,
        **dedup,
    }


def _check_failures(cfg: PrepConfig, plan: Plan, failures: dict[str, int], examples: dict[str, str]) -> None:
    failed = sum(failures.values())
    fraction = failed / plan.listed if plan.listed else 0.0
    if fraction > cfg.max_failure_fraction:
        detail = "; ".join(f"{r}: {n} (e.g. {examples.get(r, '?')})" for r, n in failures.items())
        raise FailureFractionExceeded(
            f"data prep of {cfg.source}: {failed} of {plan.listed} samples failed "
            f"({fraction:.1%}), more than max_failure_fraction={cfg.max_failure_fraction}: "
            f"{detail}"
        )
