"""The one way a configuration is composed, for pre-training, data prep and evaluation alike.

A config is a structured schema (a dataclass) with layers merged onto it in order: a base
(e.g. the config saved in a checkpoint), a YAML file with its ``include:`` list merged
underneath it, then ``key=value`` overrides from the command line. Choices are Enums in the
schemas, so OmegaConf rejects an unknown value at merge time; any failure is one
:class:`ConfigError` whose message starts with the key. Nothing here does I/O beyond reading
the YAML files, and nothing starts a worker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file, override or value that cannot work; the message names the key."""


class Choice(StrEnum):
    """Base of the schemas' choices: members compare, hash and print as their value (the
    same as their name), so code and YAML keep using plain strings."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def read_yaml(path: str | os.PathLike, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``include:`` list merged underneath it. Includes are looked up
    next to the including file, then under ``configs/``."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"include cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors of any kind
        raise ConfigError(f"{path}: cannot be read as YAML: {e}") from None
    includes = node.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    parts = []
    for inc in includes:
        found = next((c for c in (path.parent / inc, CONFIGS_DIR / inc) if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: include {inc!r} not found (looked in {path.parent} and {CONFIGS_DIR})")
        parts.append(read_yaml(found, seen + (path,)))
    return OmegaConf.merge(*parts, node) if parts else node


def compose(
    schema: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = (), base: Any = None
) -> DictConfig:
    """``schema`` <- ``base`` <- the YAML at ``path`` <- ``key=value`` overrides, typed and checked
    by OmegaConf (interpolations are left for the caller to resolve). Arguments starting with
    ``--`` are not overrides and are skipped. Raises :class:`ConfigError` naming the key."""
    dotlist = [o for o in overrides if not o.startswith("--")]
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers = [OmegaConf.structured(schema)]
        if base is not None:
            layers.append(base)
        if path:
            layers.append(read_yaml(path))
        cfg = OmegaConf.merge(*layers)
        for item in dotlist:
            key, raw = item.split("=", 1)
            # update() walks list indices too (prep.0.shard_size=64), which a merge cannot.
            OmegaConf.update(cfg, key.strip(), OmegaConf.from_dotlist([f"v={raw}"])["v"], merge=True)
    except OmegaConfBaseException as e:
        raise as_config_error(e) from None
    return cfg


def as_config_error(e: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's error as ours: the key first, in the form an override spells it
    (``prep.0.image.resample``, not ``prep[0].image.resample``), then OmegaConf's first line."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    message = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    if not key:
        return ConfigError(message)
    key = re.sub(r"\[(\d+)\]", r".\1", str(key))
    return ConfigError(f"{key}: {message}")
