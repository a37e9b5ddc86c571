"""fsspec helpers: one way to open a URL, and writes that appear whole or not at all.

On a local disk a file is written under a temporary name in its folder and renamed; on an
object store it is uploaded once (a PUT, or a multipart upload that only shows on completion),
so a killed job never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"
T = TypeVar("T")
R = TypeVar("R")


def open_fs(url: str, storage_options: Mapping[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The filesystem and bare path for `url`. `storage_options` maps a protocol (`s3`,
    `gcs`, ...) to the keyword arguments of its filesystem."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return fsspec.core.url_to_fs(url, **dict(storage_options.get(protocol, {})))


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL a reader passes back to fsspec: a plain path on local disk."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def ensure_dir(fs: AbstractFileSystem, path: str) -> None:
    """Create a folder where folders exist; object stores need none."""
    if is_local(fs):
        fs.makedirs(path, exist_ok=True)


@contextmanager
def staged_file(fs: AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only when the block exits cleanly."""
    if is_local(fs):
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with tempfile.NamedTemporaryFile(prefix="data_prep-") as f:
            yield f
            f.flush()
            fs.put_file(f.name, path)


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole small file atomically."""
    if is_local(fs):
        with staged_file(fs, path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


def list_names(fs: AbstractFileSystem, folder: str) -> set[str]:
    """Base names of the files in `folder` now (not a cached listing); empty when it does not
    exist."""
    fs.invalidate_cache(folder)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()


def remove_stale_temps(fs: AbstractFileSystem, folder: str) -> int:
    """Delete temporary files a killed run left in a local `folder`; return how many."""
    if not is_local(fs):
        return 0
    stale = [n for n in list_names(fs, folder) if TMP_MARK in n]
    for name in stale:
        fs.rm_file(join(folder, name))
    return len(stale)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """`map(fn, items)` with up to `threads` calls in flight (for I/O-bound `fn`), results
    in input order, and at most 2x`threads` results held; `threads` <= 1 runs inline."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
