"""Checkpoints mirrored to object storage (``ray.storage_path`` = s3://, gs://, ... any
non-local fsspec URL), so that a worker group restarted on other nodes resumes.

Layout: ``<storage_path>/<name>/checkpoints/<tag>/...`` mirrors the local tag dir, with the
``COMPLETE`` marker uploaded last: a remote tag without it is ignored, as locally.
Uploads: every node's local rank 0 puts the files its node has (each rank's shards on
node-local disks; on a shared filesystem the same files twice, harmlessly), then, after a
barrier, global rank 0 puts the marker. Downloads: every node's local rank 0 gets the latest
remote complete checkpoint when its own checkpoint dir has no complete one as new.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline import checkpoint

log = logging.getLogger("pipeline.storage")


def is_remote(url: str | None) -> bool:
    """Whether ``url`` names a non-local fsspec filesystem (s3://, gs://, memory://, ...)."""
    if not url or "://" not in url:
        return False
    return url.split("://", 1)[0] not in ("file", "local")


def remote_ckpt_dir(cfg) -> str | None:
    """``<storage_path>/<name>/checkpoints`` when checkpoints are mirrored, else None."""
    if not is_remote(cfg.ray.storage_path):
        return None
    return f"{cfg.ray.storage_path.rstrip('/')}/{cfg.name}/checkpoints"


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def remote_complete_tags(remote_dir: str) -> list[str]:
    """Tags with a ``COMPLETE`` marker under ``remote_dir``, oldest first."""
    fs, root = _fs(remote_dir)
    try:
        fs.invalidate_cache()
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    tags = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        try:
            checkpoint.step_of(name)
        except ValueError:
            continue
        if fs.exists(f"{root}/{name}/{checkpoint.MARKER}"):
            tags.append(name)
    return sorted(tags, key=checkpoint.step_of)


def upload(local_ckpt_dir: str, tag: str, remote_dir: str, marker: bool) -> None:
    """Put the local ``<tag>`` dir's files (all but the marker) under ``remote_dir/<tag>``;
    with ``marker``, put only the marker (call it after every node's files are up)."""
    fs, root = _fs(remote_dir)
    src = Path(local_ckpt_dir) / tag
    dst = f"{root}/{tag}"
    if marker:
        fs.put_file(str(src / checkpoint.MARKER), f"{dst}/{checkpoint.MARKER}")
        log.info("checkpoint %s uploaded to %s/%s", tag, remote_dir, tag)
        return
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.name != checkpoint.MARKER and not path.name.endswith(".tmp"):
            fs.put_file(str(path), f"{dst}/{path.relative_to(src).as_posix()}")


def download_latest(remote_dir: str, local_ckpt_dir: str) -> str | None:
    """Get the latest remote complete checkpoint unless one as new is complete locally.

    Files land in a temporary dir, then move into place, marker last. Returns the tag fetched.
    """
    tags = remote_complete_tags(remote_dir)
    if not tags:
        return None
    tag = tags[-1]
    local = checkpoint.latest_tag(local_ckpt_dir)
    if local is not None and checkpoint.step_of(local) >= checkpoint.step_of(tag):
        return None
    fs, root = _fs(remote_dir)
    dst = Path(local_ckpt_dir) / tag
    tmp = Path(local_ckpt_dir) / f".download-{tag}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for path in fs.find(f"{root}/{tag}"):
        rel = path[len(f"{root}/{tag}") :].lstrip("/")
        if rel == checkpoint.MARKER:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(tmp / rel))
    if dst.exists():  # an incomplete local copy of the same tag
        import shutil

        shutil.rmtree(dst)
    os.replace(tmp, dst)
    (dst / checkpoint.MARKER).write_text("")
    log.info("checkpoint %s downloaded from %s", tag, remote_dir)
    return tag
