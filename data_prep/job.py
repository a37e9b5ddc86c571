"""Run a data-prep job on Ray: plan (or reuse the plan), one task per unfinished shard with a
bounded number in flight, then the index files.

A rerun of the same config on the same output resumes: shards whose `_stats.json` exists are
skipped, the others are redone from the saved plan, and the result is byte-identical to an
uninterrupted run (apart from the timings inside `_stats.json`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from typing import Any

import ray
from tqdm import tqdm

from .config import PrepConfig, validate, with_absolute_paths
from .index import write_indexes
from .plan import PLAN_DIR, Plan, build_plan, load_plan, shard_name
from .shard import write_shard
from .storage import join, list_names, open_fs, ordered_map, remove_stale_temps

log = logging.getLogger("data_prep")


class FailureFractionExceeded(RuntimeError):
    """More samples failed than `max_failure_fraction` allows; shards and stats are kept,
    the index files are not written."""


@ray.remote(num_cpus=1)
def _shard_task(cfg: PrepConfig, split: str, index: int) -> dict[str, Any]:
    return write_shard(cfg, split, index)


def run_prep(cfg: PrepConfig) -> dict[str, Any]:
    """Shard `cfg.source` into `cfg.output` and return the summary (samples, failures by
    reason, shards per split, seconds, images per second, ...).

    Uses the running Ray if `ray.is_initialized()`, else `ray.init(address=cfg.ray_address)`
    (None: `RAY_ADDRESS` or a new local instance), and shuts down only a Ray it started.
    Raises `ValueError` for a bad config or a missing/empty source before any task starts,
    `FailureFractionExceeded` when too many samples fail, `RuntimeError` when a shard task
    fails after its retries.
    """
    validate(cfg)
    cfg = with_absolute_paths(cfg)
    for url in (cfg.source, cfg.output):
        if "memory" in _protocols(cfg, url):
            raise ValueError(f"{url}: memory:// is private to one process and invisible to "
                             "Ray workers; use a local path or an object store")
    start = time.perf_counter()
    plan = load_plan(cfg) or build_plan(cfg)
    _check_failures(cfg, plan, dict(plan.failures), plan.examples)
    fs, root = open_fs(cfg.output, cfg.storage_options)
    removed = remove_stale_temps(fs, root) + remove_stale_temps(fs, join(root, PLAN_DIR))
    if removed:
        log.info("removed %d partial files left by an interrupted run", removed)
    done = list_names(fs, root)
    todo = [(s, i) for s, i in plan.shards() if shard_name(s, i) + "_stats.json" not in done]
    new_stats, shard_seconds = _run_shards(cfg, plan, todo) if todo else ({}, 0.0)
    stats = _collect_stats(cfg, plan, new_stats)
    summary = _summary(cfg, plan, stats, todo, new_stats, start, shard_seconds)
    _check_failures(cfg, plan, summary["failures"], summary["examples"])
    write_indexes(cfg, plan, stats)
    log.info("data prep done: %s", json.dumps(summary))
    return summary


def _protocols(cfg: PrepConfig, url: str) -> tuple[str, ...]:
    protocol = open_fs(url, cfg.storage_options)[0].protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _run_shards(cfg: PrepConfig, plan: Plan, todo: list[tuple[str, int]]
                ) -> tuple[dict[tuple[str, int], dict[str, Any]], float]:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=cfg.ray_address)
    try:
        return _submit_all(cfg, plan, todo)
    finally:
        if started_ray:
            ray.shutdown()


def _submit_all(cfg: PrepConfig, plan: Plan, todo: list[tuple[str, int]]
                ) -> tuple[dict[tuple[str, int], dict[str, Any]], float]:
    """One task per shard, at most `max_in_flight` at once (`ray.wait` backpressure)."""
    max_in_flight = cfg.max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = _shard_task.options(max_retries=cfg.retries, retry_exceptions=True)
    cfg_ref = ray.put(cfg)
    pending = deque(todo)
    in_flight: dict[ray.ObjectRef, tuple[str, int]] = {}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    failed = 0
    total = sum(plan.splits[s].shard_counts[i] for s, i in todo)
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="data_prep", smoothing=0.1) as bar:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                split, index = pending.popleft()
                in_flight[task.remote(cfg_ref, split, index)] = (split, index)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                split, index = in_flight.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:
                    for other in in_flight:
                        ray.cancel(other)
                    raise RuntimeError(f"data-prep shard {shard_name(split, index)} failed "
                                       f"after {cfg.retries} retries: {e}") from e
                results[(split, index)] = stats
                failed += stats["count"] - stats["successes"]
                bar.update(stats["count"])
                bar.set_postfix(shards=f"{len(results)}/{len(todo)}", failed=failed)
    return results, time.perf_counter() - start


def _collect_stats(cfg: PrepConfig, plan: Plan, new: dict[tuple[str, int], dict[str, Any]]
                   ) -> dict[str, list[dict[str, Any]]]:
    """Every shard's stats, per split in shard order: this run's, and earlier runs' read back."""
    fs, root = open_fs(cfg.output, cfg.storage_options)
    old = [key for key in plan.shards() if key not in new]

    def read(key: tuple[str, int]) -> dict[str, Any]:
        return json.loads(fs.cat_file(join(root, shard_name(*key) + "_stats.json")))

    everything = dict(new)
    everything.update(zip(old, ordered_map(read, old, cfg.io_threads), strict=True))
    return {split: [everything[(split, i)] for i in range(sp.num_shards)]
            for split, sp in plan.splits.items()}


def _summary(cfg: PrepConfig, plan: Plan, stats: dict[str, list[dict[str, Any]]],
             todo: list, new: dict, start: float, shard_seconds: float) -> dict[str, Any]:
    failures: Counter = Counter(plan.failures)
    examples = dict(plan.examples)
    for shard_stats in stats.values():
        for s in shard_stats:
            failures.update(s["failures"])
            for reason, example in s["examples"].items():
                examples.setdefault(reason, example)
    samples = {split: sum(s["successes"] for s in ss) for split, ss in stats.items()}
    made_now = sum(s["successes"] for s in new.values())
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
    }


def _check_failures(cfg: PrepConfig, plan: Plan, failures: dict[str, int],
                    examples: dict[str, str]) -> None:
    failed = sum(failures.values())
    fraction = failed / plan.listed if plan.listed else 0.0
    if fraction > cfg.max_failure_fraction:
        detail = "; ".join(f"{r}: {n} (e.g. {examples.get(r, '?')})" for r, n in failures.items())
        raise FailureFractionExceeded(
            f"data prep of {cfg.source}: {failed} of {plan.listed} samples failed "
            f"({fraction:.1%}), more than max_failure_fraction={cfg.max_failure_fraction}: "
            f"{detail}")
