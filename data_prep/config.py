"""The one typed configuration of a data-prep job.

`PrepConfig` is an OmegaConf structured config: `load_config` composes it the way every
config of the project is composed (`data_prep.compose`: a YAML file with its includes, then
`key=value` overrides; choices are Enums checked at merge time), and `validate` checks the
values once, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .compose import Choice, ConfigError, as_config_error, compose

__all__ = ["ConfigError", "PrepConfig", "load_config", "validate"]


class SourceKind(Choice):
    auto = "auto"  # a manifest by its name, else class folders, else per-class tars
    folders = "folders"
    manifest = "manifest"
    class_tars = "class_tars"


class ResizeMode(Choice):
    none = "none"
    shorter = "shorter"  # `size` bounds the shorter side
    longer = "longer"


class Resample(Choice):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"
    box = "box"
    hamming = "hamming"


class DedupMode(Choice):
    exclude = "exclude"
    list = "list"


class HashKind(Choice):
    phash = "phash"
    none = "none"


@dataclass
class HoldoutConfig:
    """A split carved from the head of the shuffled order (big_vision holds out i21k's first
    51,200). `count` wins over `fraction`; both 0 means no holdout split."""

    name: str = "val"
    count: int = 0
    fraction: float = 0.0


@dataclass
class ImageConfig:
    """What each image becomes inside a shard."""

    resize_mode: ResizeMode = ResizeMode.none  # which side `size` bounds
    size: int = 0
    quality: int = 95
    keep_original: bool = True  # keep the source bytes of an RGB JPEG that needs no change
    max_pixels: int = 89_478_485  # width*height above this is a `too_many_pixels` failure
    resample: Resample = Resample.bicubic


@dataclass
class DedupConfig:
    """De-duplication against downstream test sets (the paper's section 4.1): each sample's
    perceptual hash goes into its `.json`; a sample within `max_distance` bits of a test image
    (or of one of its crops) is dropped (`exclude`) or only listed (`list`)."""

    against: dict[str, str] = field(
        default_factory=dict
    )  # test-set name -> URL (class folders, image folder, manifest, or a *_index.json of our shards)
    mode: DedupMode = DedupMode.exclude
    max_distance: int = 6  # Hamming distance in bits between 64-bit pHashes
    hash: HashKind = HashKind.phash  # none: no hash in the .json (needs `against` empty)
    crop: float = 0.075  # test images are also hashed cropped by crop +- crop_shift per side,
    crop_shift: float = 0.025  # in crop_steps steps each way ((2*crop_steps+1)**2 crops), so
    crop_steps: int = 3  # that slightly cropped copies are caught; crop 0: whole images only


@dataclass
class PlanningConfig:
    """Where the plan is made. A manifest source of at least `on_ray_bytes` bytes, or a
    source of at least `on_ray_folders` class folders or tars, is planned by Ray tasks
    (newline-aligned byte ranges of `range_bytes`, or groups of `folders_per_task` folders,
    scattered to buckets under `scratch`); a smaller one in this process. Only the choice of
    path changes the plan: ranges, buckets and tasks do not."""

    on_ray_bytes: int = 256 << 20  # manifests this big or bigger plan on Ray; 0 = never
    on_ray_folders: int = 5000  # as many class folders/tars or more plan on Ray; 0 = never
    range_bytes: int = 64 << 20  # manifest bytes per planning task
    folders_per_task: int = 100  # class folders/tars listed per planning task (and bucket)
    bucket_bytes: int = 128 << 20  # manifest bytes per shuffle bucket
    max_tasks: int = 0  # planning tasks in flight; 0 = the cluster's CPUs
    scratch: str | None = None  # URL for the buckets; None = <output>/_plan/_work


@dataclass
class PrepConfig:
    """A sharding job: where the corpus is, where shards go, and how they are made."""

    source: str  # folder of class folders | JSONL/CSV manifest | folder of <class>.tar
    output: str
    source_kind: SourceKind = SourceKind.auto
    classes_file: str | None = None  # one class name a line; line number = index
    seed: int = 0
    shard_size: int = 10000  # samples per shard
    shard_bytes: int | None = None  # cap on a shard's estimated source bytes
    assumed_sample_bytes: int = 110_000  # estimate for entries whose size the source omits
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    planning: PlanningConfig = field(default_factory=PlanningConfig)
    max_failure_fraction: float = 0.1  # more failed samples than this fails the job, early if sure
    shard_give_up_after: int = 100  # a shard whose first this-many samples all fail stops; 0 = never
    max_in_flight: int = 0  # shard tasks at once; 0 = 2x the cluster's CPUs
    retries: int = 2
    io_threads: int = 8  # reads in flight inside one shard task
    ray_address: str | None = None
    train_split: str = "train"
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec kwargs


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> PrepConfig:
    """Merge the YAML at `path` (if any) and `key=value` overrides onto `PrepConfig`,
    validate, and return it. Raises `ConfigError` naming the offending key."""
    conf = compose(PrepConfig, path, overrides)
    try:
        cfg = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:  # a mandatory key left unset
        raise as_config_error(e) from None
    assert isinstance(cfg, PrepConfig)
    validate(cfg)
    return cfg


def validate(cfg: PrepConfig) -> None:
    """Raise `ConfigError` naming the first key whose value cannot work."""

    def bad(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"invalid data-prep config: {key}={value!r}: {why}")

    if not cfg.source:
        bad("source", cfg.source, "must name a folder, manifest or folder of tars")
    if not cfg.output:
        bad("output", cfg.output, "must name an output folder")
    if cfg.shard_size < 1:
        bad("shard_size", cfg.shard_size, "must be >= 1")
    if cfg.shard_bytes is not None and cfg.shard_bytes < 1:
        bad("shard_bytes", cfg.shard_bytes, "must be >= 1 or null")
    if cfg.assumed_sample_bytes < 1:
        bad("assumed_sample_bytes", cfg.assumed_sample_bytes, "must be >= 1")
    if cfg.holdout.count < 0:
        bad("holdout.count", cfg.holdout.count, "must be >= 0")
    if not 0.0 <= cfg.holdout.fraction < 1.0:
        bad("holdout.fraction", cfg.holdout.fraction, "must be in [0, 1)")
    for key, name in (("holdout.name", cfg.holdout.name), ("train_split", cfg.train_split)):
        if not name or any(c in name for c in "/.\\ ") or name.startswith("_"):
            bad(key, name, "split names must be plain words (no '/', '.', spaces, leading '_')")
    if cfg.holdout.name == cfg.train_split:
        bad("holdout.name", cfg.holdout.name, "must differ from train_split")
    img = cfg.image
    if img.resize_mode != "none" and img.size < 1:
        bad("image.size", img.size, f"must be >= 1 with resize_mode={img.resize_mode}")
    if not 1 <= img.quality <= 100:
        bad("image.quality", img.quality, "must be in [1, 100]")
    if img.max_pixels < 1:
        bad("image.max_pixels", img.max_pixels, "must be >= 1")
    _validate_dedup(cfg.dedup, bad)
    if not 0.0 <= cfg.max_failure_fraction <= 1.0:
        bad("max_failure_fraction", cfg.max_failure_fraction, "must be in [0, 1]")
    if cfg.shard_give_up_after < 0:
        bad("shard_give_up_after", cfg.shard_give_up_after, "must be >= 0")
    if cfg.max_in_flight < 0:
        bad("max_in_flight", cfg.max_in_flight, "must be >= 0")
    if cfg.retries < 0:
        bad("retries", cfg.retries, "must be >= 0")
    if cfg.io_threads < 0:
        bad("io_threads", cfg.io_threads, "must be >= 0")
    p = cfg.planning
    for key, value in (
        ("on_ray_bytes", p.on_ray_bytes),
        ("on_ray_folders", p.on_ray_folders),
        ("max_tasks", p.max_tasks),
    ):
        if value < 0:
            bad(f"planning.{key}", value, "must be >= 0")
    for key, value in (
        ("range_bytes", p.range_bytes),
        ("bucket_bytes", p.bucket_bytes),
        ("folders_per_task", p.folders_per_task),
    ):
        if value < 1:
            bad(f"planning.{key}", value, "must be >= 1")


def _validate_dedup(d: DedupConfig, bad: Any) -> None:
    if not 0 <= d.max_distance <= 32:
        bad("dedup.max_distance", d.max_distance, "must be in [0, 32] bits of 64")
    if not 0.0 <= d.crop < 0.25:
        bad("dedup.crop", d.crop, "must be in [0, 0.25): a fraction of each side")
    if not 0.0 <= d.crop_shift <= d.crop:
        bad("dedup.crop_shift", d.crop_shift, f"must be in [0, dedup.crop={d.crop}]")
    if not 1 <= d.crop_steps <= 7:
        bad("dedup.crop_steps", d.crop_steps, "must be in [1, 7]")
    for name, url in d.against.items():
        if not name or any(c in name for c in "/.\\ :") or name.startswith("_"):
            bad(f"dedup.against.{name}", url, "test-set names must be plain words")
        if not isinstance(url, str) or not url:
            bad(f"dedup.against.{name}", url, "must be the URL of a test set")
    if d.against and d.hash == "none":
        bad("dedup.hash", d.hash, "de-duplication against test sets needs a hash")


def with_absolute_paths(cfg: PrepConfig) -> PrepConfig:
    """`cfg` with local relative paths made absolute against this process's folder, so that
    Ray workers started elsewhere read and write the same files (URLs are left as they are)."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else os.path.abspath(path)

    dedup = replace(cfg.dedup, against={k: absolute(v) for k, v in cfg.dedup.against.items()})
    planning = replace(cfg.planning, scratch=absolute(cfg.planning.scratch))
    return replace(
        cfg,
        source=absolute(cfg.source),
        output=absolute(cfg.output),
        classes_file=absolute(cfg.classes_file),
        dedup=dedup,
        planning=planning,
    )


def fingerprint(cfg: PrepConfig) -> str:
    """A hash of every setting that changes the output bytes. A rerun resumes an output only
    when this matches the one its plan was made with."""
    keys = (
        "source",
        "source_kind",
        "classes_file",
        "seed",
        "shard_size",
        "shard_bytes",
        "assumed_sample_bytes",
        "holdout",
        "image",
        "train_split",
        "dedup",
    )
    d = asdict(cfg)
    blob = json.dumps({k: d[k] for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
