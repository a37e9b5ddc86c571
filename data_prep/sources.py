"""List a corpus as a stream of entries, in an order that depends only on the corpus.

Three layouts are read from any fsspec URL:
- `folders`: `<root>/<class name>/**/<image>`; the class is the top-level folder.
- `manifest`: a JSONL file (or a folder of them, read in name order as one manifest)
  (`{"path": ..., "label"|"labels": ..., ...}` a line) or a CSV/TSV
  file with a header naming a path column and a `label`/`labels` column (several labels
  separated by `;`). Paths are relative to the manifest's folder unless absolute or URLs.
  An integer label (or a CSV label of digits only) is a class index, a string is a class
  name. Other fields are copied into each sample's `.json`. Files ending in .gz/.bz2/.xz/.zst
  are decompressed while streamed.
- `class_tars`: `<root>/<class name>.tar` holding that class's images (ImageNet-21k's
  layout); entries point at a member's bytes inside its tar, which is never unpacked.
"""

from __future__ import annotations

import csv
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fsspec import AbstractFileSystem

from . import failures as F
from .config import PrepConfig
from .storage import is_local, open_fs, ordered_map, to_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
COMPRESSED_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")
PATH_FIELDS = ("path", "url", "file", "image")
LABEL_FIELDS = ("labels", "label")
IGNORED = "ignored"  # a non-image or hidden file: not a sample, not a failure

Label = int | str


@dataclass
class Entry:
    """One candidate sample, as the source describes it."""

    url: str  # the image file, or the per-class tar holding it
    labels: list[Label]
    size: int | None = None  # bytes, when the listing says
    member: str | None = None  # member name inside a per-class tar
    offset: int | None = None  # where that member's bytes start in the tar
    extra: dict[str, Any] | None = None  # other manifest fields


@dataclass
class Rejected:
    """A listing item that is not a sample: `reason` is a failure name or `IGNORED`."""

    reason: str
    where: str


def detect_kind(cfg: PrepConfig) -> str:
    """The source layout (`folders`, `manifest` or `class_tars`). Raises `ValueError` naming
    the URL when the source is missing or empty, or its layout cannot be told."""
    fs, path = open_fs(cfg.source, cfg.storage_options)
    if not fs.exists(path):
        raise ValueError(f"data-prep source not found: {cfg.source}")
    if fs.isfile(path):
        if fs.size(path) == 0:
            raise ValueError(f"data-prep source is empty: {cfg.source}")
        if cfg.source_kind in ("auto", "manifest") and _is_manifest_name(path):
            return "manifest"
        raise ValueError(f"data-prep source {cfg.source} is a file but not a {'/'.join(MANIFEST_EXTENSIONS)} manifest")
    entries = [e for e in fs.ls(path, detail=True) if not _hidden(e["name"])]
    if not entries:
        raise ValueError(f"data-prep source is empty: {cfg.source}")
    manifests = all(e["type"] != "directory" and _is_manifest_name(e["name"]) for e in entries)
    if cfg.source_kind != "auto":
        if cfg.source_kind == "manifest" and not manifests:
            raise ValueError(f"data-prep source {cfg.source} is a folder, not a manifest or a folder of manifests")
        return cfg.source_kind
    if any(e["type"] == "directory" for e in entries):
        return "folders"
    if any(e["name"].endswith(".tar") for e in entries):
        return "class_tars"
    if manifests:
        return "manifest"
    raise ValueError(
        f"cannot tell the layout of data-prep source {cfg.source}: it holds no "
        "class folders and no .tar files; set source_kind"
    )


def iter_source(cfg: PrepConfig, kind: str) -> Iterator[Entry | Rejected]:
    """Every entry of the source in a fixed order (sorted names, manifest line order)."""
    fs, path = open_fs(cfg.source, cfg.storage_options)
    if kind == "folders":
        return _iter_folders(fs, path, cfg.io_threads)
    if kind == "class_tars":
        return _iter_class_tars(fs, path, cfg.io_threads)
    return (item for name, url in manifest_files(fs, path, cfg.source) for item in _iter_manifest(fs, name, url))


def manifest_files(fs: AbstractFileSystem, path: str, url: str) -> list[tuple[str, str]]:
    """(path, URL) of each manifest file of a manifest source, in the order their lines are
    listed: the file itself, or a folder's manifest files sorted by name (the parts of one
    big manifest)."""
    if fs.isfile(path):
        return [(path, url)]
    names = sorted(p for p in fs.ls(path, detail=False) if not _hidden(p) and _is_manifest_name(p))
    return [(p, to_url(fs, p)) for p in names]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(name)


def _hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def _is_manifest_name(path: str) -> bool:
    name = path.lower()
    for ext in COMPRESSED_EXTENSIONS:
        name = name.removesuffix(ext)
    return name.endswith(MANIFEST_EXTENSIONS)


def _iter_folders(fs: AbstractFileSystem, root: str, threads: int) -> Iterator[Entry | Rejected]:
    listing = sorted(fs.ls(root, detail=True), key=lambda e: e["name"])
    class_dirs = [e["name"] for e in listing if e["type"] == "directory" and not _hidden(e["name"])]
    for e in listing:
        if e["type"] != "directory":
            yield Rejected(IGNORED, to_url(fs, e["name"]))
    listings = ordered_map(partial(_find, fs), class_dirs, threads)
    for class_dir, files in zip(class_dirs, listings, strict=True):
        yield from folder_entries(fs, class_dir, files)


def class_units(fs: AbstractFileSystem, root: str, kind: str) -> tuple[list[str], int]:
    """The class folders (`folders`) or per-class tars (`class_tars`) under `root`, sorted,
    and how many other entries it holds (ignored)."""
    listing = fs.ls(root, detail=True)
    if kind == "folders":
        units = [e["name"] for e in listing if e["type"] == "directory" and not _hidden(e["name"])]
        return sorted(units), sum(e["type"] != "directory" for e in listing)
    names = [e["name"] for e in listing if not _hidden(e["name"])]
    units = [p for p in names if p.endswith(".tar")]
    return sorted(units), len(names) - len(units)


def unit_entries(fs: AbstractFileSystem, unit: str, kind: str) -> Iterator[Entry | Rejected]:
    """The entries of one class folder or per-class tar, in a fixed order."""
    if kind == "folders":
        return folder_entries(fs, unit, _find(fs, unit))
    return iter(_list_tar(fs, unit))


def folder_entries(fs: AbstractFileSystem, class_dir: str, files: dict[str, dict]) -> Iterator[Entry | Rejected]:
    """The entries of one class folder from its recursive listing, in name order."""
    label = posixpath.basename(class_dir.rstrip("/"))
    for name in sorted(files):
        relative = name[len(class_dir) :]
        if not is_image_name(name) or any(p.startswith(".") for p in relative.split("/")):
            yield Rejected(IGNORED, to_url(fs, name))
            continue
        yield Entry(to_url(fs, name), [label], size=files[name].get("size"))


def _find(fs: AbstractFileSystem, folder: str) -> dict[str, dict]:
    return fs.find(folder, detail=True)


def _iter_class_tars(fs: AbstractFileSystem, root: str, threads: int) -> Iterator[Entry | Rejected]:
    names = sorted(p for p in fs.ls(root, detail=False) if not _hidden(p))
    tars = [p for p in names if p.endswith(".tar")]
    for p in names:
        if not p.endswith(".tar"):
            yield Rejected(IGNORED, to_url(fs, p))
    for members in ordered_map(partial(_list_tar, fs), tars, threads):
        yield from members


def _list_tar(fs: AbstractFileSystem, path: str) -> list[Entry | Rejected]:
    """The image members of one per-class tar, read from its headers alone."""
    url = to_url(fs, path)
    label = posixpath.basename(path)[: -len(".tar")]
    out: list[Entry | Rejected] = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if not is_image_name(m.name):
                    out.append(Rejected(IGNORED, f"{url}:{m.name}"))
                    continue
                out.append(Entry(url, [label], size=m.size, member=m.name, offset=m.offset_data))
    except (tarfile.TarError, OSError) as e:
        # Members listed before the damage are kept; the rest of this tar counts once.
        out.append(Rejected(F.READ_ERROR, f"{url}: {type(e).__name__}: {e}"))
    return out


def _iter_manifest(fs: AbstractFileSystem, path: str, url: str) -> Iterator[Entry | Rejected]:
    base = posixpath.dirname(path)
    with fs.open(path, "rt", encoding="utf-8", errors="replace", compression="infer", newline="") as f:
        delimiter = csv_delimiter(path)
        rows = _csv_rows(f, url, delimiter) if delimiter else _jsonl_rows(f)
        for line_no, row in rows:
            where = f"{url}:{line_no}"
            if isinstance(row, str):
                yield Rejected(F.BAD_MANIFEST_LINE, f"{where}: {row}")
                continue
            yield _manifest_entry(fs, base, row, where)


def _jsonl_rows(f) -> Iterator[tuple[int, dict | str]]:
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, f"bad JSON: {e}"
            continue
        yield line_no, row if isinstance(row, dict) else "not a JSON object"


def _csv_rows(f, url: str, delimiter: str, fieldnames: list[str] | None = None) -> Iterator[tuple[int, dict | str]]:
    """The rows of a CSV file, or (with `fieldnames`, the header read elsewhere) of lines
    after its header; line numbers count from the first line of `f`."""
    reader = csv.DictReader(f, delimiter=delimiter, fieldnames=fieldnames)
    check_csv_header(reader.fieldnames or [], url)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield reader.line_num, f"bad CSV: {e}"
            continue
        if None in row or None in row.values():
            yield reader.line_num, "wrong number of fields"
            continue
        labels = [s.strip() for s in (row.pop("labels", None) or row.pop("label", "")).split(";")]
        row.pop("label", None)
        row["labels"] = [int(s) if s.isdigit() else s for s in labels if s]
        yield reader.line_num, row


def check_csv_header(header: list[str], url: str) -> None:
    """Raise `ValueError` naming `url` when a CSV header has no path or no label column."""
    if not any(k in header for k in PATH_FIELDS) or not any(k in header for k in LABEL_FIELDS):
        raise ValueError(
            f"manifest {url} needs a header with a path column ({', '.join(PATH_FIELDS)}) "
            f"and a label column ({', '.join(LABEL_FIELDS)}); it has {header}"
        )


def csv_delimiter(path: str) -> str | None:
    """`,` or a tab for a CSV/TSV manifest path, None for JSONL."""
    name = path.lower()
    for ext in COMPRESSED_EXTENSIONS:
        name = name.removesuffix(ext)
    return ("\t" if name.endswith(".tsv") else ",") if name.endswith((".csv", ".tsv")) else None


def _manifest_entry(fs: AbstractFileSystem, base: str, row: dict, where: str) -> Entry | Rejected:
    path_key = next((k for k in PATH_FIELDS if isinstance(row.get(k), str) and row[k]), None)
    if path_key is None:
        return Rejected(F.BAD_MANIFEST_LINE, f"{where}: no path field ({', '.join(PATH_FIELDS)})")
    raw = row["labels"] if "labels" in row else row.get("label")
    labels = raw if isinstance(raw, list) else [raw]
    if not labels or not all(isinstance(x, (int, str)) and not isinstance(x, bool) and x != "" for x in labels):
        return Rejected(F.BAD_MANIFEST_LINE, f"{where}: no usable label ({raw!r})")
    extra = {k: v for k, v in row.items() if k != path_key and k not in LABEL_FIELDS}
    size = row.get("size") if isinstance(row.get("size"), int) else None
    return Entry(_resolve(fs, base, row[path_key]), labels, size=size, extra=extra or None)


def _resolve(fs: AbstractFileSystem, base: str, path: str) -> str:
    """A manifest path as a URL: absolute paths and URLs as given, others under `base`."""
    if "://" in path or path.startswith("/"):
        return path
    joined = posixpath.normpath(posixpath.join(base, path))
    return joined if is_local(fs) else fs.unstrip_protocol(joined)
