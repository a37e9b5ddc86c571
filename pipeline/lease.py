"""One writer at a time: a lease file that its holder creates if absent and renews.

A run has one owner, the driver that holds ``<run>/LEASE``; each evaluation of a checkpoint
has one, whoever holds its claim (``<run>/evals/claims/<tag>__<name>``, ``pipeline.rundir``).
A lease file is a small JSON record naming its holder (a random token, host, pid, the Ray
job's submission id and cluster, when it started, its last heartbeat and the expiry it
promises). The holder renews it every ``heartbeat_s``; a lease whose heartbeat is older than
its ``expiry_s`` may be taken over (at once when its holder is a process of the same machine
that has ended), and the holder that comes back finds another token at its next renewal: it
has lost the lease and must stop writing.

Every step is a compare-and-swap on one file, as strong as the store makes it:

* a local or shared filesystem: create-if-absent by ``link(2)`` of a complete temporary file
  (fails with EEXIST like ``O_EXCL``, and no reader sees a partial file); renewal and takeover
  compare the contents and replace the file under ``flock`` on the directory's
  ``.lease.lock`` (NFS: the client's lock manager must honour it);
* S3: ``PutObject`` with ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew or
  take over, ``DeleteObject`` with ``If-Match`` to release (412 PreconditionFailed when another
  writer came first; tested against moto);
* GCS: the same with generation preconditions (``if_generation_match=0``, then the
  generation read); written for ``google-cloud-storage`` and not tested here;
* any other fsspec store: check, then write. Two launches at the same instant can both
  win; a warning says so.

Clocks: the reader compares the holder's heartbeat with its own clock, so the hosts' clocks
must agree to well within ``expiry_s`` (NTP does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import fsspec
import psutil

log = logging.getLogger(__name__)

# The run owner's token, in the environment of its training ranks.
LEASE_TOKEN = "PIPELINE_LEASE_TOKEN"


@dataclass
class Owner:
    """What a lease file says about its holder."""

    token: str
    host: str
    pid: int
    job_id: str | None
    cluster: str | None
    started: float
    heartbeat: float
    expiry_s: float
    pid_space: str = ""  # where ``pid`` means this process (see :func:`pid_space`)

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        """The record in ``data``; None for a file that is not one (an expired lease)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def age(self) -> float:
        return time.time() - self.heartbeat

    def expired(self) -> bool:
        return self.age() > self.expiry_s

    def ended(self) -> bool:
        """Whether the owner is a process of this pid space (this machine, this container) that
        has ended: its pid is gone, a zombie, or another process's that started after the lease."""
        if not self.pid_space or self.pid_space != pid_space():
            return False
        try:
            proc = psutil.Process(self.pid)
            return proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > self.started
        except psutil.NoSuchProcess:
            return True

    def free(self) -> bool:
        """Whether the lease may be taken over: expired, or its owner ended (a rerun on the
        owner's machine after the driver died, or of a batch job that ended, need not wait
        for the expiry)."""
        return self.expired() or self.ended() or self.batch_job_ended()

    def batch_job_ended(self) -> bool:
        """Whether the owner's SLURM job has ended: this process is a later run of the same job
        (requeued: a higher ``SLURM_RESTART_COUNT``), or ``squeue`` no longer lists it as alive.
        False when neither can tell (no SLURM here)."""
        kind, _, ident = (self.job_id or "").partition(":")
        if kind != "slurm" or not ident:
            return False
        job, _, restart = ident.partition(".")
        if os.environ.get("SLURM_JOB_ID") == job:
            return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > int(restart or 0)
        return slurm_job_ended(job)

    def describe(self) -> str:
        if not self.job_id:
            job = "a process"
        elif ":" in self.job_id:  # a batch job (launcher_job)
            kind, _, ident = self.job_id.partition(":")
            job = f"{'SLURM' if kind == 'slurm' else kind} job {ident}"
        else:  # a Ray job's submission id
            job = f"Ray job {self.job_id}"
        cluster = f" of cluster {self.cluster}" if self.cluster else ""
        return f"{job}{cluster} on host {self.host} (pid {self.pid}), last heartbeat {self.age():.0f}s ago"


class LeaseHeld(Exception):
    """The lease is held by a live owner (:attr:`owner`)."""

    def __init__(self, url: str, owner: Owner):
        super().__init__(f"{url} is held by {owner.describe()}")
        self.url, self.owner = url, owner


class LeaseLost(Exception):
    """This holder's lease was taken over (it had expired): stop without writing."""


def refusal(name: str, run_dir: str, owner: Owner) -> str:
    """What a launch over a run that ``owner`` holds says before it exits ``Exit.CONFIG``."""
    return (
        f"error: run {name} ({run_dir}) is owned by {owner.describe()}. This launch does not train. "
        f"Either wait for that job to end, or stop it (it checkpoints at the next step boundary) and launch again:\n"
        f"  python -m pipeline.rundir stop {run_dir}\n"
        f"(a lease whose heartbeat is older than {owner.expiry_s:g}s is taken over by the next launch)"
    )


def took_over(url: str, previous: Owner, why: str | None = None) -> str:
    """What a launch that took the lease of ``url`` over from ``previous`` says (``why``: a
    reason the caller knows better)."""
    if why is None:
        why = (
            "its process has ended"
            if previous.ended()
            else "its batch job has ended"
            if previous.batch_job_ended()
            else f"no heartbeat for over {previous.expiry_s:g}s"
        )
    return f"took over {url} from {previous.describe()} ({why})"


_SLURM_ALIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}


def slurm_job_ended(job: str) -> bool:
    """Whether SLURM says job ``job`` is no longer alive (``squeue`` lists it in an end state, or
    not at all); False when ``squeue`` cannot be asked."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:  # "Invalid job id specified": gone from the controller's memory
        return "invalid job id" in out.stderr.lower()
    states = set(out.stdout.split())
    return not states & _SLURM_ALIVE


def launcher_job() -> str | None:
    """The batch job this process runs in, for a lease's record (no spaces: ``rundir owner``
    prints it as one word): ``slurm:<job id>[.<restart count>]``, else ``torchrun:<run id>``
    when torchrun was given one."""
    if job := os.environ.get("SLURM_JOB_ID"):
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"slurm:{job}" + (f".{restart}" if restart != "0" else "")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run_id}" if run_id and run_id != "none" else None


class Lease:
    """A lease on the file at ``url`` (any fsspec URL), for this process.

    ``acquire`` takes it (a live owner raises :class:`LeaseHeld`; an expired one, or one whose
    process ended on this machine, is taken over), ``start`` renews it every ``heartbeat_s`` in a
    thread, ``release`` deletes it.
    ``lost`` is set once a renewal finds another owner; ``on_lost(owner)`` is called then.
    """

    def __init__(
        self,
        url: str,
        heartbeat_s: float,
        expiry_s: float,
        job_id: str | None = None,
        cluster: str | None = None,
        on_lost: Callable[[Owner | None], None] | None = None,
    ):
        self.url = url
        self.store = store_for(url)
        self.heartbeat_s, self.expiry_s = heartbeat_s, expiry_s
        self.me = Owner(
            token=secrets.token_hex(8),
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=job_id,
            cluster=cluster,
            started=time.time(),
            heartbeat=time.time(),
            expiry_s=expiry_s,
            pid_space=pid_space(),
        )
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.requests = 0  # store requests made (the lease's cost)
        self._version = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.me.token

    def _record(self) -> bytes:
        self.me.heartbeat = time.time()
        return json.dumps(asdict(self.me)).encode()

    def acquire(self, dead: Callable[[Owner], bool] | None = None) -> Owner | None:
        """Take the lease; returns the previous owner taken over (None when there was none).
        ``dead(owner)``: the caller knows that owner has ended (a Ray job of its cluster)."""
        for _ in range(3):  # each retry follows another writer's change: a live owner ends it
            self.requests += 1
            if (version := self.store.create(self._record())) is not None:
                self._version = version
                return None
            self.requests += 1
            if (current := self.store.read()) is None:
                continue  # released meanwhile
            data, version = current
            owner = Owner.parse(data)
            if owner is not None and not owner.free() and owner.token != self.token and not (dead and dead(owner)):
                raise LeaseHeld(self.url, owner)
            self.requests += 1
            if (new := self.store.replace(self._record(), version)) is not None:
                self._version = new
                if owner is not None:
                    log.warning("%s: took over the lease of %s", self.url, owner.describe())
                return owner
        raise LeaseHeld(self.url, self._owner() or self.me)

    def renew(self) -> bool:
        """Write a new heartbeat if the lease is still ours; False (and ``lost`` set) when not."""
        if self.lost.is_set():
            return False
        self.requests += 1
        if self._version is not None and (new := self.store.replace(self._record(), self._version)) is not None:
            self._version = new
            return True
        self.requests += 1
        current = self.store.read()
        owner = Owner.parse(current[0]) if current else None
        if owner is not None and owner.token == self.token:  # ours: a retried write we did not see
            self._version = current[1]
            return self.renew()
        self.lost.set()
        log.error(
            "%s: lease lost: %s",
            self.url,
            f"now held by {owner.describe()}" if owner else "the lease file is gone",
        )
        if self.on_lost is not None:
            self.on_lost(owner)
        return False

    def holds(self) -> bool:
        """Whether the lease file still names this holder (one read; no renewal)."""
        if self.lost.is_set():
            return False
        owner = self._owner()
        return owner is not None and owner.token == self.token

    def _owner(self) -> Owner | None:
        """The owner the lease file names now (None: no file, or not a lease record)."""
        self.requests += 1
        current = self.store.read()
        return Owner.parse(current[0]) if current else None

    def start(self) -> Lease:
        """Renew every ``heartbeat_s`` in a daemon thread until ``release`` or the lease is lost."""

        def loop():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # store away: retry (past expiry_s, another may take over)
                    log.warning("%s: lease not renewed (will retry): %s", self.url, e)

        self._thread = threading.Thread(target=loop, name=f"lease:{posixpath.basename(self.url)}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost.is_set() and self._version is not None:
            try:
                self.store.delete(self._version)
            except Exception as e:  # it expires on its own
                log.warning("%s: lease not released (it expires in %.0fs): %s", self.url, self.expiry_s, e)


class Fence:
    """A writer's check that the lease at ``url`` still names its holder ``token``: one read at
    most every ``every_s`` seconds, and whenever asked with ``now`` (before a write that must not
    land after a takeover). Training rank 0 uses it: the driver holds the lease, the ranks write.
    A store that does not answer is asked again at the next call (training goes on meanwhile)."""

    def __init__(self, url: str, token: str, every_s: float):
        self.url, self.token, self.every_s = url, token, every_s
        self.store = store_for(url)
        self._checked, self._lost = -every_s, False  # the first call reads

    def lost(self, now: bool = False) -> bool:
        if not self._lost and (now or time.monotonic() - self._checked >= self.every_s):
            try:
                current = self.store.read()
            except Exception as e:  # a store hiccup must not end training: ask again next time
                log.warning("%s: lease not checked (will retry): %s", self.url, e)
                return False
            owner = Owner.parse(current[0]) if current else None
            self._lost = owner is None or owner.token != self.token
            self._checked = time.monotonic()
            if self._lost:
                log.error(
                    "%s: lease lost: %s",
                    self.url,
                    f"now held by {owner.describe()}" if owner else "the lease file is gone",
                )
        return self._lost


def pid_space() -> str:
    """This process's pid namespace, unique across machines: the kernel's boot id and the
    namespace's inode ("" where /proc does not say; an owner is then judged by expiry only)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def owner_of(url: str) -> Owner | None:
    """The holder the lease file at ``url`` names (None: no lease)."""
    current = store_for(url).read()
    return Owner.parse(current[0]) if current else None


def job_identity() -> tuple[str | None, str | None]:
    """(Ray job submission id, cluster address) of this driver, when ``ray job submit`` started it.

    Ray passes the submission id to the driver in its job config (``RAY_JOB_CONFIG_JSON_ENV_VAR``,
    metadata ``job_submission_id``) and the cluster's GCS address in ``RAY_ADDRESS``.
    """
    try:
        job = (
            json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
        )
    except ValueError:
        job = None
    return job, os.environ.get("RAY_ADDRESS") or None


# ---------------------------------------------------------------- stores: one file, compare-and-swap


def store_for(url: str):
    """The compare-and-swap of the store at ``url`` (see the module docstring)."""
    local = "://" not in url or url.startswith("file://")
    fs, path = fsspec.core.url_to_fs(url.removeprefix("file://") if local else url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return LocalFile(path)
    if protocol in ("s3", "s3a"):
        return S3File(fs, path)
    if protocol in ("gs", "gcs"):
        return GCSFile(path)
    log.warning(
        "%s: %s has no conditional writes here: the lease is a check, then a write (two launches at the same "
        "instant can both take it)",
        url,
        protocol,
    )
    return AnyFile(fs, path)


class LocalFile:
    """A file on a local or shared filesystem; the version is the contents."""

    def __init__(self, path: str):
        self.path = path
        self.lock = os.path.join(os.path.dirname(path), ".lease.lock")

    def create(self, data: bytes):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)  # fails if the file exists: the first creator wins
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: bytes):
        with self._locked():
            if self.read() != (version, version):
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return data

    def delete(self, version: bytes) -> None:
        with self._locked():
            if self.read() == (version, version):
                os.unlink(self.path)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


class S3File:
    """An S3 object; the version is its ETag (conditional writes answer 412 to the loser)."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def create(self, data: bytes):
        return self._put(data, IfNoneMatch="*")

    def read(self):
        from fsspec.asyn import sync

        async def get():
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        return sync(self.fs.loop, get)

    def replace(self, data: bytes, version: str):
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as e:
            if not _precondition_failed(e):
                raise

    def _put(self, data: bytes, **condition):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as e:  # s3fs: FileExistsError (If-None-Match), EINVAL (If-Match)
            if _precondition_failed(e):
                return None
            raise


def _precondition_failed(e: BaseException) -> bool:
    """Whether S3 refused a conditional request (412, or 409 for a concurrent conditional write)."""
    cause = getattr(e, "__cause__", None)
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or isinstance(e, FileExistsError)


class GCSFile:
    """A GCS object; the version is its generation. Written for google-cloud-storage; untested here."""

    def __init__(self, path: str):
        from google.cloud import storage

        bucket, _, key = path.partition("/")
        self.blob = storage.Client().bucket(bucket).blob(key)

    def create(self, data: bytes):
        return self._put(data, 0)

    def read(self):
        from google.api_core.exceptions import NotFound

        try:
            data = self.blob.download_as_bytes()
        except NotFound:
            return None
        return data, self.blob.generation

    def replace(self, data: bytes, version: int):
        return self._put(data, version)

    def delete(self, version: int) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.blob.delete(if_generation_match=version)
        except (NotFound, PreconditionFailed):
            pass

    def _put(self, data: bytes, generation: int):
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.blob.upload_from_string(data, if_generation_match=generation)
        except PreconditionFailed:
            return None
        return self.blob.generation


class AnyFile:
    """Any other fsspec store: check, then write (best effort); the version is the contents."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes):
        self.fs.invalidate_cache()
        if self.fs.exists(self.path):
            return None
        self.fs.pipe_file(self.path, data)
        return data

    def read(self):
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: bytes):
        if self.read() != (version, version):
            return None
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, version: bytes) -> None:
        if self.read() == (version, version):
            self.fs.rm_file(self.path)
