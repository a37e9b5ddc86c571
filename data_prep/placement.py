"""Where data_prep's Ray tasks run: a path local to this host pins them to this node."""

from __future__ import annotations

import logging
from typing import Any

import ray

from .config import PrepConfig

log = logging.getLogger("data_prep")


def placement(cfg: PrepConfig) -> dict[str, Any]:
    """A local source, output or test-set path is a path on this host only: on a cluster of
    several hosts its tasks run here (object-store URLs run anywhere)."""
    urls = (cfg.source, cfg.output, *cfg.dedup.against.values())
    local = [url for url in urls if "://" not in url or url.startswith("file://")]
    if not local or len([n for n in ray.nodes() if n.get("Alive")]) < 2:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    log.info("%s is local to this host: shard tasks run on this node", local[0])
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
