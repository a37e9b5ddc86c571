"""The downstream test sets that de-duplication compares the corpus against: listed
(`list_test_set`: a folder of images, a JSONL/CSV manifest, or data_prep's shards) and
hashed at every crop box (`hash_units`, run by the job as Ray tasks)."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dedup import DECODE_SIDE, crop_boxes, hash_crops
from .failures import SampleError
from .process import decode_rgb
from .sources import Entry, _is_manifest_name, _iter_manifest, is_image_name
from .storage import open_fs, to_url


@dataclass
class Unit:
    """Part of a test set to hash: one image file (`id` = its path in the set), or one of our
    shard tars (`tar`: every `.jpg` member, `id` = `<tar name>/<key>`)."""

    test_set: int
    url: str
    id: str
    tar: bool = False


def list_test_set(set_index: int, name: str, url: str, storage_options: dict[str, Any]) -> list[Unit]:
    """The units of test set `name` at `url`: a folder of images (class folders or not), a
    JSONL/CSV manifest as `source` reads it, or a `*_index.json` of data_prep's shards.
    Raises `ValueError` naming `dedup.against.<name>` when it is missing or holds no images."""
    key = f"dedup.against.{name}"
    fs, path = open_fs(url, storage_options)
    if not fs.exists(path):
        raise ValueError(f"invalid data-prep config: {key}={url!r}: not found")
    units: list[Unit] = []
    if fs.isfile(path) and path.endswith("index.json"):
        index = json.loads(fs.cat_file(path))
        base = posixpath.dirname(path)
        for shard in index.get("shardlist", []):
            shard_path = shard["url"] if "://" in shard["url"] else posixpath.join(base, shard["url"])
            units.append(Unit(set_index, to_url(fs, shard_path), posixpath.basename(shard["url"]), tar=True))
    elif fs.isfile(path) and _is_manifest_name(path):
        for item in _iter_manifest(fs, path, url):
            if isinstance(item, Entry):
                units.append(Unit(set_index, item.url, item.url))
    elif fs.isdir(path):
        root = path.rstrip("/") + "/"
        for found in sorted(fs.find(path)):
            relative = found[len(root) :]
            if is_image_name(found) and not any(p.startswith(".") for p in relative.split("/")):
                units.append(Unit(set_index, to_url(fs, found), relative))
    else:
        raise ValueError(
            f"invalid data-prep config: {key}={url!r}: not a folder of images, "
            "a JSONL/CSV manifest or a *_index.json of shards"
        )
    if not units:
        raise ValueError(f"invalid data-prep config: {key}={url!r}: holds no images")
    return units


def hash_units(
    units: list[Unit], storage_options: dict[str, Any], crop: float, shift: float, steps: int, max_pixels: int
) -> tuple[list[int], list[str], np.ndarray, list[str]]:
    """Hash every image of `units` at every crop box: (test-set indices, ids, a uint64 array
    of (image, box) hashes, and one line per image that could not be read or decoded)."""
    boxes = crop_boxes(crop, shift, steps)
    sets, ids, hashes, errors = [], [], [], []
    for unit, image_id, data in _read_units(units, storage_options):
        try:
            if isinstance(data, Exception):
                raise data
            img = decode_rgb(data, max_pixels, DECODE_SIDE)
        except (SampleError, OSError) as e:
            errors.append(f"{unit.url} {image_id}: {e}")
            continue
        sets.append(unit.test_set)
        ids.append(image_id)
        hashes.append(hash_crops(img, boxes))
    return sets, ids, np.array(hashes, np.uint64).reshape(len(ids), len(boxes)), errors


def _read_units(units: list[Unit], storage_options: dict[str, Any]) -> Iterator[tuple[Unit, str, bytes | Exception]]:
    for unit in units:
        fs, path = open_fs(unit.url, storage_options)
        try:
            if not unit.tar:
                yield unit, unit.id, fs.cat_file(path)
                continue
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith(".jpg"):
                        key = posixpath.basename(member.name).split(".", 1)[0]
                        yield unit, f"{unit.id}/{key}", tf.extractfile(member).read()
        except OSError as e:
            yield unit, unit.id, e
