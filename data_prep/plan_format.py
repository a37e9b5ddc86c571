"""The plan's files and the rules both planners share (``plan`` in-process, ``plan_ray`` on Ray).

``<output>/_plan/{split}-{i:06d}.jsonl`` holds one shard's records in key order;
``_plan/_plan.json`` (a :class:`Plan`) is written last and marks the plan complete. Shards,
indexes and the job read a plan through this module; neither planner imports the other's code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import ConfigError, PrepConfig, fingerprint
from .storage import ensure_dir, join, open_fs, write_bytes

PLAN_DIR = "_plan"


PLAN_FILE = "_plan.json"


KEY_DIGITS = 9


def shard_name(split: str, index: int) -> str:
    """`train-000042`: the stem of a shard's tar, stats and plan files."""
    return f"{split}-{index:06d}"


@dataclass
class SplitPlan:
    """The shards of one split: samples planned and source bytes estimated, per shard."""

    shard_counts: list[int] = field(default_factory=list)
    shard_bytes: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)

    @property
    def num_shards(self) -> int:
        return len(self.shard_counts)


@dataclass
class Plan:
    """What `_plan/_plan.json` records; everything the driver needs after planning."""

    fingerprint: str
    source: str
    source_kind: str
    classes: list[str]
    multi_label: bool
    listed: int  # candidate samples found, including those failed while planning
    ignored: int  # non-image and hidden files, not counted as samples
    failures: dict[str, int]  # failures found while planning
    examples: dict[str, str]  # the first failure of each reason
    splits: dict[str, SplitPlan]  # the train split first, then the holdout

    def shards(self) -> list[tuple[str, int]]:
        """Every (split, shard index) of the plan."""
        return [(s, i) for s, sp in self.splits.items() for i in range(sp.num_shards)]

    def summary(self) -> dict[str, Any]:
        """The plan in numbers, as `--dry-run` prints it."""
        return {
            "source": self.source,
            "source_kind": self.source_kind,
            "listed": self.listed,
            "ignored": self.ignored,
            "plan_failures": dict(self.failures),
            "num_classes": len(self.classes),
            "multi_label": self.multi_label,
            "splits": {
                name: {"samples": sp.num_samples, "shards": sp.num_shards, "bytes_estimate": sum(sp.shard_bytes)}
                for name, sp in self.splits.items()
            },
        }

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        d["splits"] = {k: SplitPlan(**v) for k, v in d["splits"].items()}
        return cls(**d)


def load_plan(cfg: PrepConfig) -> Plan | None:
    """The complete plan already in the output, or None. Raises `ConfigError` when that plan
    was made with settings that change the output."""
    fs, root = open_fs(cfg.output, cfg.storage_options)
    path = join(root, PLAN_DIR, PLAN_FILE)
    fs.invalidate_cache(join(root, PLAN_DIR))
    if not fs.exists(path):
        return None
    plan = Plan.from_json(fs.cat_file(path))
    if plan.fingerprint != fingerprint(cfg):
        raise ConfigError(
            f"output {cfg.output} holds a plan made with other settings (fingerprint "
            f"{plan.fingerprint}, this config {fingerprint(cfg)}): use a fresh output folder "
            f"or delete that one"
        )
    return plan


def read_shard_plan(cfg: PrepConfig, split: str, index: int) -> list[dict[str, Any]]:
    """The planned records of one shard, in key order."""
    fs, root = open_fs(cfg.output, cfg.storage_options)
    data = fs.cat_file(join(root, PLAN_DIR, shard_name(split, index) + ".jsonl"))
    return [json.loads(line) for line in data.splitlines()]


def read_classes(cfg: PrepConfig) -> list[str]:
    """The class names of `classes_file`, one a line, line number = index."""
    assert cfg.classes_file
    fs, path = open_fs(cfg.classes_file, cfg.storage_options)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"classes_file not found: {cfg.classes_file}") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"classes_file is empty: {cfg.classes_file}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"classes_file {cfg.classes_file} line {i + 1} is blank")
        if name in seen:
            raise ValueError(
                f"classes_file {cfg.classes_file} names {name!r} twice (lines {seen[name] + 1} and {i + 1})"
            )
        seen[name] = i
    return names


def holdout_size(cfg: PrepConfig, total: int) -> int:
    """How many of `total` shuffled samples go to the holdout split."""
    n = cfg.holdout.count or round(cfg.holdout.fraction * total)
    if n >= total:
        raise ConfigError(
            f"invalid data-prep config: holdout of {n} samples leaves nothing to "
            f"train on: the source has {total} usable samples"
        )
    return n


def derive_classes(names: set[str], max_int: int) -> list[str]:
    """Without a classes file: the sorted label names, or "0".."max" when all are indices."""
    if names:
        return sorted(names)
    return [str(i) for i in range(max_int + 1)]


def resolve_labels(labels: list, index: dict[str, int], n: int) -> list[int] | None:
    out: list[int] = []
    for label in labels:
        i = label if isinstance(label, int) else index.get(label)
        if i is None or not 0 <= i < n:
            return None
        if i not in out:
            out.append(i)
    return out


def plan_writer(cfg: PrepConfig) -> Callable[[str, bytes], None]:
    fs, root = open_fs(cfg.output, cfg.storage_options)
    folder = join(root, PLAN_DIR)
    ensure_dir(fs, folder)

    def sink(name: str, data: bytes) -> None:
        write_bytes(fs, join(folder, name), data)

    return sink
