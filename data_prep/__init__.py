"""Shard an image corpus (class folders, a JSONL/CSV manifest, or per-class tars) into
webdataset tar shards with per-shard stats and wids/timm/open_clip index files, one Ray task
per shard. Entry points: `python -m data_prep <config.yaml> key=value ...` and
`data_prep.job.run_prep(cfg)`.
"""

from .config import HoldoutConfig, ImageConfig, PrepConfig, load_config

__all__ = ["HoldoutConfig", "ImageConfig", "PrepConfig", "load_config"]
