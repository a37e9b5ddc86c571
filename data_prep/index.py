"""The files readers trust, written after every shard is done: `classes.txt`, open_clip's
`sizes.json`, timm's `_info.json`, and last, one wids index `{split}_index.json` per split.
Each is written atomically, so a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

from .config import PrepConfig
from .plan import Plan
from .storage import join, open_fs, write_bytes

WIDS_KIND = "wids-shard-index-v1"


def split_index(split: str, plan: Plan, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The wids shard index of one split, from its shards' stats in shard order."""
    failures: Counter = Counter()
    for s in stats:
        failures.update(s["failures"])
    shardlist = [{"url": s["shard"], "nsamples": s["successes"], "filesize": s["bytes"],
                  "md5sum": s["md5sum"]} for s in stats]
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
        ("sizes.json", {s["shard"]: s["successes"] for shard_stats in stats.values()
                        for s in shard_stats}),
        ("_info.json", timm_info(name, plan, stats)),
    ]
    files += [(f"{split}_index.json", split_index(split, plan, shard_stats))
              for split, shard_stats in stats.items()]
    for filename, content in files:
        data = content if isinstance(content, str) else json.dumps(content, indent=1)
        write_bytes(fs, join(root, filename), data.encode("utf-8"))
    return [f for f, _ in files]
