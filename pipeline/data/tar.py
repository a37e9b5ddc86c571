"""Samples read straight from a tar shard on any fsspec URL (no tarfile: it seeks, and
remote streams cannot).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from typing import BinaryIO

import fsspec

log = logging.getLogger(__name__)


_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES less GNU sparse, which we refuse
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: nothing follows


def _tar_number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0o377 else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records (POSIX.1-2008) of a pax header's data."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1].isdigit():
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record of length 0")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_files(f: BinaryIO, url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file of a tar stream, in order.

    The members and names ``tarfile`` gives (ustar, GNU long names, pax ``path``/``size``)
    at a fraction of its per-member Python: a header is one read and four slices. A bad
    header checksum or a truncated member raises ``ValueError`` naming ``url`` and the offset.
    """
    pax_global: dict[str, str] = {}
    pending: dict[str, str] = {}  # pax or GNU long-name fields for the next member
    offset = 0
    while True:
        start, header = offset, f.read(_BLOCK)
        if not header or header == _ZEROS:
            return
        if len(header) < _BLOCK:
            raise ValueError(f"{url}: truncated tar header at byte {start}")
        stored = _tar_number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 256:
            signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
            if stored != signed:
                raise ValueError(f"{url}: bad tar header checksum at byte {start}")
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending else _tar_number(header[124:136])
        skip = 0 if kind in _NO_DATA else size
        data = f.read(skip)
        if len(data) < skip:
            raise ValueError(f"{url}: tar member at byte {start} ends early ({len(data)} of {skip} bytes)")
        f.read(-skip % _BLOCK)
        offset += _BLOCK + skip + (-skip % _BLOCK)
        if kind in (b"x", b"X"):
            pending = {**pax_global, **pending, **_pax_records(data)}
        elif kind == b"g":
            pax_global.update(_pax_records(data))
        elif kind == b"L":
            pending["path"] = _tar_text(data)
        elif kind == b"K":  # a GNU long link name: links are not samples
            continue
        elif kind == b"S" or any(k.startswith("GNU.sparse") for k in pending):
            raise ValueError(f"{url}: sparse tar member at byte {start} is not supported")
        else:
            if "path" in pending:
                name = pending["path"]
            else:
                name, prefix = _tar_text(header[0:100]), _tar_text(header[345:500])
                name = f"{prefix}/{name}" if prefix else name
            pending = {}
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                yield name, data


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Samples of one tar shard in order: ``{"__key__": key, "__url__": url, ext: bytes, ...}``.

    Members of a sample are adjacent and share the key (the basename up to its first dot).
    """
    with fsspec.open(url, "rb") as f:
        current: dict | None = None
        for name, data in iter_tar_files(f, url):
            key, _, ext = posixpath.basename(name).partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
