"""The shard index that data_prep writes (its ``shardlist``, classes and totals)."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec

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
            (
                s["url"] if "://" in s["url"] or s["url"].startswith("/") else posixpath.join(base, s["url"]),
                int(s["nsamples"]),
            )
            for s in data["shardlist"]
            if int(s["nsamples"]) > 0
        )
        if not shards:
            raise ValueError(f"{url}: the index lists no non-empty shard")
        return cls(url, shards, tuple(data.get("classes", ())), bool(data.get("multi_label", False)))
