"""The files readers trust, written after every shard is done: `classes.txt`, open_clip's
`sizes.json`, timm's `_info.json`, and last, one wids index `{split}_index.json` per split.
Each is written atomically, so a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

from .config import DedupConfig, PrepConfig
from .plan_format import Plan
from .storage import join, open_fs, write_bytes

WIDS_KIND = "wids-shard-index-v1"


def split_index(
    split: str, plan: Plan, stats: list[dict[str, Any]], dedup: DedupConfig | None = None
) -> dict[str, Any]:
    """The wids shard index of one split, from its shards' stats in shard order; with test
    sets in `dedup`, also the near-duplicates found per test set and how many were dropped."""
    failures: Counter = Counter()
    near: Counter = Counter()
    for s in stats:
        failures.update(s["failures"])
        near.update(s.get("near_duplicates", {}))
    shardlist = [
        {"url": s["shard"], "nsamples": s["successes"], "filesize": s["bytes"], "md5sum": s["md5sum"]} for s in stats
    ]
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": split,
        "shardlist": shardlist,
        "num_samples": sum(s["successes"] for s in stats),
        "num_classes": len(plan.classes),
        "classes": plan.classes,
        "multi_label": plan.multi_label,
        "total_bytes": sum(s["bytes"] for s in stats),
        "failures": dict(sorted(failures.items())),
        **(_dedup_record(dedup, stats, near) if dedup is not None and dedup.against else {}),
    }


def _dedup_record(dedup: DedupConfig, stats: list[dict[str, Any]], near: Counter) -> dict[str, Any]:
    return {
        "dedup": {
            "mode": dedup.mode,
            "max_distance": dedup.max_distance,
            "hash": dedup.hash,
            "against": dict(sorted(dedup.against.items())),
            "near_duplicates": dict(sorted(near.items())),
            "dropped": sum(s.get("excluded", 0) for s in stats),
            "listings": [s["dedup_listing"] for s in stats if s.get("dedup_listing")],
        }
    }


def timm_info(name: str, plan: Plan, stats: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """timm's `_info.json` (read by `timm.data.readers.reader_wds`)."""
    return {
        "name": name,
        "num_classes": len(plan.classes),
        "splits": {
            split: {
                "name": split,
                "num_samples": sum(s["successes"] for s in shard_stats),
                "filenames": [s["shard"] for s in shard_stats],
                "shard_lengths": [s["successes"] for s in shard_stats],
            }
            for split, shard_stats in stats.items()
        },
    }


def write_indexes(cfg: PrepConfig, plan: Plan, stats: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Write every index file into `cfg.output`, the split indexes last; return their names.
    `stats` maps each split to its shards' stats in shard order."""
    fs, root = open_fs(cfg.output, cfg.storage_options)
    name = posixpath.basename(root.rstrip("/")) or "dataset"
    files: list[tuple[str, Any]] = [
        ("classes.txt", "".join(c + "\n" for c in plan.classes)),
        ("sizes.json", {s["shard"]: s["successes"] for shard_stats in stats.values() for s in shard_stats}),
        ("_info.json", timm_info(name, plan, stats)),
    ]
    files += [
        (f"{split}_index.json", split_index(split, plan, shard_stats, cfg.dedup))
        for split, shard_stats in stats.items()
    ]
    for filename, content in files:
        data = content if isinstance(content, str) else json.dumps(content, indent=1)
        write_bytes(fs, join(root, filename), data.encode("utf-8"))
    return [f for f, _ in files]
