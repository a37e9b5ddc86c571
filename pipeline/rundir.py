"""The run directory: the one system of record of a pre-training run, over fsspec.

The same code serves a local path (one host, or a shared filesystem) and an object store
(``s3://``, ``gs://``, ...): nothing of a run depends on a path only one host can see.
Where it lives: ``<ray.storage_path>/<name>`` when a storage path is set, else
``output_dir`` (see :func:`run_dir_url`); ``output_dir`` itself is always a host-local
scratch directory (DeepSpeed writes its checkpoint files there before they are published).

Layout::

    <run>/checkpoints/step_00000100/...        DeepSpeed's files, rank_<r>.pt, meta.json, config.yaml
    <run>/checkpoints/step_00000100/COMPLETE   written last: a tag without it does not exist
    <run>/checkpoints/_corrupt/step_00000100/  a tag whose files failed its manifest, set aside on
                                               resume (its marker removed), CORRUPT.json says which file and why
    <run>/evals/step_00000100/<eval>.json      one evaluator's result on that checkpoint, written once
    <run>/evals/step_00000100/<eval>.mlflow    the MLflow child run that shows it (once it does)
    <run>/evals/claims/<tag>__<eval>           who is evaluating it now (a lease, pipeline.lease)
    <run>/LEASE                                the driver that owns the run (pipeline.lease)
    <run>/STOP                                 a graceful-stop request (workers checkpoint and exit)
    <run>/mlflow_run_id                        the MLflow run of this run (a rerun continues it)
    <run>/config.yaml, <run>/summary.json      the resolved config; the last summary

Why checkpoints are ours and not Ray Train's (``ray.train.report(checkpoint=...)`` carries
only a pointer to a tag, see ``pipeline.train``): the same checkpoints must be written and
resumed under ``torchrun``/``deepspeed`` without Ray, and read by an evaluator on any host
(``python -m pipeline.evaluate watch``) without Ray's internal snapshot files; Ray names its
checkpoints ``checkpoint_<time>`` and records completion only in the driver's snapshot, so
another reader cannot tell a complete checkpoint from a partial upload. A per-tag marker
written last gives every reader that answer with one ``exists``. Ray still restarts the
worker group, keeps ``num_to_keep`` pointers and hands the driver the final step and loss in
the ``Result`` of ``fit()``.

Object stores have no rename: a file appears whole on its one PUT, which is what the marker
and the records rely on. Local files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STOP = "STOP"
LEASE = "LEASE"
CHECKPOINTS = "checkpoints"
CORRUPT = "_corrupt"  # under checkpoints/: not a tag name, so no listing sees what is set aside
CORRUPT_NOTE = "CORRUPT.json"
SUMMARY = "summary.json"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(m.group(1))


def is_local(url: str) -> bool:
    """Whether ``url`` is a path on this host's filesystem (a plain path or ``file://``)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def run_dir_url(output_dir: str, storage_path: str | None, name: str) -> str:
    """Where a run's records live: ``<storage_path>/<name>`` when set, else ``output_dir``."""
    if storage_path:
        return f"{storage_path.rstrip('/')}/{name}"
    return output_dir


class Checkpoints:
    """A directory of checkpoint tags (any fsspec URL): listing, publishing, fetching."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(local_path(self.url) if is_local(self.url) else self.url)
        self.local = is_local(self.url)

    def tag_url(self, tag: str) -> str:
        return f"{self.url}/{tag}"

    def complete_tags(self) -> list[str]:
        """Tags with their marker, oldest first; a tag being written is not listed."""
        self.fs.invalidate_cache()
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        tags = [n for n in names if _TAG.match(n) and self.fs.exists(f"{self.root}/{n}/{MARKER}")]
        return sorted(tags, key=step_of)

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def is_complete(self, tag: str) -> bool:
        return self.fs.exists(f"{self.root}/{tag}/{MARKER}")

    def read_text(self, tag: str, name: str) -> str:
        with self.fs.open(f"{self.root}/{tag}/{name}", "r") as f:
            return f.read()

    def publish(self, local_tag_dir: str | os.PathLike, tag: str, marker: bool) -> None:
        """Put a local tag dir's files here (all but the marker); with ``marker``, only the
        marker (call it once every host's files are up)."""
        src = Path(local_tag_dir)
        dst = f"{self.root}/{tag}"
        if marker:
            self.fs.pipe_file(f"{dst}/{MARKER}", b"")
            return
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name != MARKER and not path.name.endswith(".tmp"):
                target = f"{dst}/{path.relative_to(src).as_posix()}"
                self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                self.fs.put_file(str(path), target)

    def fetch(self, tag: str, local_dir: str | os.PathLike) -> Path:
        """Copy complete checkpoint ``tag`` into ``local_dir/<tag>`` (marker last); returns it.

        A local copy that already has every file of the tag (same sizes) is kept as it is. A
        host's own staging copy is not enough: it holds the files of the ranks that ran there,
        and after a restart other ranks may run on this host.
        """
        if not self.is_complete(tag):
            raise FileNotFoundError(f"{self.tag_url(tag)} is not a complete checkpoint (no {MARKER} marker)")
        dst = Path(local_dir) / tag
        src = f"{self.root}/{tag}"
        files = {path[len(src) :].lstrip("/"): info["size"] for path, info in self.fs.find(src, detail=True).items()}
        files.pop(MARKER, None)
        if (dst / MARKER).is_file() and all(
            (dst / rel).is_file() and (dst / rel).stat().st_size == size for rel, size in files.items()
        ):
            return dst
        tmp = Path(local_dir) / f".fetch-{tag}-{uuid.uuid4().hex[:8]}"
        for rel in files:
            path = f"{src}/{rel}"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(tmp / rel))
        if dst.exists():  # an incomplete local copy of the same tag
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        (dst / MARKER).write_text("")
        log.info("checkpoint %s fetched from %s", tag, self.url)
        return dst

    def remove(self, tag: str, missing_ok: bool = False) -> None:
        """Delete a tag, marker first, so no reader ever sees a half-deleted checkpoint."""
        marker = f"{self.root}/{tag}/{MARKER}"
        self.fs.invalidate_cache()
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        if missing_ok and not self.fs.exists(f"{self.root}/{tag}"):
            return
        self.fs.rm(f"{self.root}/{tag}", recursive=True)
        self.fs.invalidate_cache()

    def files(self, tag: str) -> set[str]:
        """The files of a tag here (relative names), its marker aside."""
        self.fs.invalidate_cache()
        src = f"{self.root}/{tag}"
        return {path[len(src) :].lstrip("/") for path in self.fs.find(src)} - {MARKER}

    def set_aside(self, tag: str, note: dict) -> str:
        """Move a tag out of the run's checkpoints into ``_corrupt/<tag>`` (not deleted: a person
        may want its files), its marker removed first so no reader takes it for complete, with
        ``note`` in ``CORRUPT.json``; returns where it went."""
        name, n = tag, 1
        while self.fs.exists(f"{self.root}/{CORRUPT}/{name}"):  # the same step set aside before
            n += 1
            name = f"{tag}.{n}"
        marker, src, dst = f"{self.root}/{tag}/{MARKER}", f"{self.root}/{tag}", f"{self.root}/{CORRUPT}/{name}"
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        if self.local:
            os.makedirs(posixpath.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:  # no rename on an object store: copy each file, then delete
            self.fs.invalidate_cache()
            for path in self.fs.find(src):
                self.fs.copy(path, f"{dst}/{path[len(src) :].lstrip('/')}")
            self.fs.rm(src, recursive=True)
        write_atomic(self.fs, f"{dst}/{CORRUPT_NOTE}", json.dumps(note, indent=1))
        return f"{self.url}/{CORRUPT}/{name}"

    def set_aside_notes(self) -> dict[str, dict]:
        """Where each tag set aside went (``_corrupt/<name>``) -> its note."""
        self.fs.invalidate_cache()
        out = {}
        for path in sorted(self.fs.glob(f"{self.root}/{CORRUPT}/*/{CORRUPT_NOTE}")):
            with self.fs.open(path, "r") as f:
                out[f"{self.url}/{CORRUPT}/{path.rstrip('/').split('/')[-2]}"] = json.load(f)
        return out

    def keep_latest(self, keep: int) -> None:
        if keep > 0:
            for tag in self.complete_tags()[:-keep]:
                self.remove(tag)


class RunDir:
    """A run's records (see the module docstring for the layout)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = is_local(self.url)
        self.fs, self.root = fsspec.core.url_to_fs(local_path(self.url) if self.local else self.url)
        self.checkpoints = Checkpoints(f"{self.url}/{CHECKPOINTS}")

    @classmethod
    def of(cls, url: str) -> RunDir:
        """The run dir of a URL naming either a run dir or its checkpoints dir."""
        url = url.rstrip("/")
        if posixpath.basename(url) == CHECKPOINTS:
            return cls(url.rsplit("/", 1)[0] if "/" in url else ".")
        return cls(url)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.fs, self._path(name), text)

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open(self._path(name), "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    # -- ownership (pipeline.lease)
    @property
    def lease_url(self) -> str:
        return f"{self.url}/{LEASE}"

    def claim_url(self, tag: str, name: str) -> str:
        return f"{self.url}/evals/claims/{tag}__{name}"

    # -- stop requests
    def request_stop(self, reason: str) -> None:
        self.write_text(STOP, reason + "\n")

    def stop_requested(self) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._path(STOP))

    def clear_stop(self) -> None:
        if self.fs.exists(self._path(STOP)):
            self.fs.rm_file(self._path(STOP))

    # -- the MLflow run of this run
    @property
    def mlflow_run_id(self) -> str | None:
        text = self.read_text("mlflow_run_id")
        return text.strip() or None if text else None

    @mlflow_run_id.setter
    def mlflow_run_id(self, run_id: str) -> None:
        self.write_text("mlflow_run_id", run_id)

    # -- evaluation records
    def _eval_path(self, tag: str, name: str, ext: str = "json") -> str:
        return self._path("evals", tag, f"{name}.{ext}")

    def eval_record(self, tag: str, name: str) -> dict | None:
        try:
            with self.fs.open(self._eval_path(tag, name), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_eval_record(self, tag: str, name: str, record: dict) -> bool:
        """Record one evaluation of ``tag``; a record that exists is kept (False returned)."""
        path = self._eval_path(tag, name)
        if self.fs.exists(path):
            return False
        write_atomic(self.fs, path, json.dumps(record, indent=1), exclusive=True)
        return True

    def eval_records(self) -> dict[str, dict[str, dict]]:
        """tag -> evaluator name -> record, for every evaluation recorded in this run."""
        self.fs.invalidate_cache()
        out: dict[str, dict[str, dict]] = {}
        try:
            paths = self.fs.glob(self._path("evals", "step_*", "*.json"))
        except FileNotFoundError:
            return out
        for path in sorted(paths):
            tag, fname = path.rstrip("/").split("/")[-2:]
            with self.fs.open(path, "r") as f:
                out.setdefault(tag, {})[fname.removesuffix(".json")] = json.load(f)
        return out

    def shown_in_mlflow(self, tag: str, name: str) -> str | None:
        try:
            with self.fs.open(self._eval_path(tag, name, "mlflow"), "r") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def mark_shown_in_mlflow(self, tag: str, name: str, child_run_id: str) -> None:
        write_atomic(self.fs, self._eval_path(tag, name, "mlflow"), child_run_id)

    def unshown_evals(self) -> list[tuple[str, str, dict]]:
        """``(tag, name, record)`` of the evaluations not yet shown in MLflow, oldest first."""
        return [
            (tag, name, rec)
            for tag, recs in sorted(self.eval_records().items(), key=lambda t: step_of(t[0]))
            for name, rec in sorted(recs.items())
            if not self.shown_in_mlflow(tag, name)
        ]

    # -- summaries
    def write_summary(self, summary: dict) -> None:
        self.write_text(SUMMARY, json.dumps(summary, indent=2, default=str))

    def summary(self) -> dict | None:
        text = self.read_text(SUMMARY)
        return json.loads(text) if text else None

    def summary_written(self) -> float | None:
        """When the summary was last written (seconds since the epoch), None without one."""
        try:
            return self.fs.modified(self._path(SUMMARY)).timestamp()
        except FileNotFoundError:
            return None


SERVES = "SERVES"  # in a host's scratch dir (output_dir): the run dir whose checkpoints it stages


def claim_scratch(output_dir: str, run: RunDir) -> str | None:
    """Record in a host's scratch dir that it stages ``run``'s checkpoints; returns why not
    (None when it may) when it stages another run whose lease is live: two runs sharing one
    scratch dir would mix their files in a tag dir, as two writers of one run dir would."""
    path = Path(output_dir) / SERVES
    other = path.read_text().strip() if path.is_file() else ""
    if other and other != run.url:
        from pipeline.lease import owner_of

        try:
            owner = owner_of(RunDir(other).lease_url)
        except Exception:  # its store does not answer: judged by what is known
            owner = None
        if owner is not None and not owner.free():
            return (
                f"output_dir {output_dir} stages the checkpoints of run {other}, owned by {owner.describe()}: "
                f"two live runs must not share a scratch dir; give this run its own (output_dir=runs/<name>)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(fsspec.filesystem("file"), str(path), run.url + "\n")
    return None


def write_atomic(fs, path: str, text: str, exclusive: bool = False) -> None:
    """Write a whole file so that no reader sees part of it (rename locally, one PUT remotely)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not _is_local_fs(fs):
        fs.pipe_file(path, text.encode())
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    if exclusive:  # link fails when the file exists: the first writer wins, nothing is overwritten
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)


def _is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


USAGE = """usage: python -m pipeline.rundir COMMAND <run dir URL>
  stop <run> [reason]   ask a running job to stop gracefully (its workers checkpoint at the next
                        step boundary and it exits with pipeline.stop.Exit.STOPPED)
  clear-stop <run>      withdraw a stop request
  latest <run>          print the URL of the run's newest complete checkpoint (nothing when none)
  owner <run>           print who owns the run (pipeline.lease): "live|free <Ray job id or -> <owner>";
                        exit status 1 when no one does"""


def main(argv: list[str] | None = None) -> int:
    """The run dir from the shell (the launchers ask it instead of spelling its layout)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("stop", "clear-stop", "latest", "owner"):
        print(USAGE, file=sys.stderr)
        return 2
    run = RunDir(argv[1])
    if argv[0] == "stop":
        run.request_stop(" ".join(argv[2:]) or "stop requested from the command line")
        print(f"stop requested: {run.url}/{STOP}")
    elif argv[0] == "clear-stop":
        run.clear_stop()
    elif argv[0] == "owner":
        from pipeline.lease import owner_of

        if (owner := owner_of(run.lease_url)) is None:
            return 1
        print(f"{'free' if owner.free() else 'live'} {owner.job_id or '-'} {owner.describe()}")
    elif (tag := run.checkpoints.latest()) is not None:
        print(run.checkpoints.tag_url(tag))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
