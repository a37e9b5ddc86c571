"""The one MLflow wrapper: the pre-training run, its step metrics and its eval child runs.

Everything is logged with explicit run ids and explicit steps through ``MlflowClient``, so
a resumed run appends to the same run without duplicated or rewound curves, and several
processes (training rank 0, eval tasks) can log to one run.

The tracking server is a service that may be down or restarting. A write it does not take
(connection refused, timeout, 5xx) is appended, with every later write of the process, to
a spool: an append-only JSONL journal per process under the spool directory. A background
thread replays the journal in order once the server answers, and ``flush``/``finish`` drain
it. Replay is idempotent, so a record sent twice (a crash between sending it and noting it
sent) lands once: metrics keep the timestamp taken when they were logged (the store drops
an identical (key, value, timestamp, step) row), params and tags are set to the same value,
and artifacts overwrite the same path. A journal left by a process that died is
delivered by any other process using the same spool directory (``python -m
pipeline.evaluate sync`` does it by hand).

The journal carries only what MLflow cannot do itself, a queue of writes that survives the
process: the training run's params, step metrics, artifacts and status. Evaluations do not
use it; their records in the run dir are their queue (``pipeline.evaluate.record``).

MLflow itself is imported at the first write, not with this module: the training ranks other
than 0 never log, and each would otherwise pay a second of CPU to import it.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 5,
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
}
_RETRY_SECONDS = (1.0, 30.0)  # background replay: first wait, longest wait


def resolve_uri(
    explicit: str | None = None, configured: str | None = None, recorded: str | None = None, default: str | None = None
) -> str | None:
    """The one precedence rule for the tracking URI, for training and evaluation alike: a
    command-line value, then the config's ``tracking.uri``, then $MLFLOW_TRACKING_URI, then
    the one the run recorded (its checkpoints' meta), then ``default``."""
    return explicit or configured or os.environ.get("MLFLOW_TRACKING_URI") or recorded or default


def tracking_uri(cfg) -> str:
    """A run's tracking URI (:func:`resolve_uri`; by default a sqlite file in ``output_dir``)."""
    return resolve_uri(configured=cfg.tracking.uri, default=f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}")


def spool_dir(cfg) -> str:
    """Where a run's undelivered writes wait: ``tracking.spool_dir`` or the run dir's."""
    return cfg.tracking.spool_dir or str(Path(cfg.output_dir).resolve() / "mlflow_spool")


def default_spool_dir() -> str:
    return os.environ.get("PIPELINE_MLFLOW_SPOOL") or str(Path(tempfile.gettempdir()) / "vit-mlflow-spool")


def configure_http(timeout_s: int | None = None, max_retries: int | None = None) -> None:
    """Short MLflow HTTP timeouts and few retries (defaults: 120 s, 7 retries, minutes of backoff).

    Values given here win; otherwise an operator's environment wins over ours.
    """
    for key, default in _HTTP_ENV.items():
        os.environ.setdefault(key, str(default))
    if timeout_s is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    if max_retries is not None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(max_retries))


def end_status(finished: bool, diverged: bool) -> str:
    """The status the run's owner ends its MLflow run with: FINISHED when training reached its
    last step, FAILED after a divergence (and after a crash), KILLED after a stop."""
    return "FINISHED" if finished else "FAILED" if diverged else "KILLED"


def run_to_resume(configured: str | None, uri: str, meta: dict) -> str | None:
    """The MLflow run a (re)started training logs to: the configured one (``tracking.run_id``),
    else the checkpoint's (``meta``) when it lives in this run's tracking store ``uri``; a
    checkpoint carried to another store (e.g. a universal one in a new output_dir) starts a new
    run there instead of failing on an unknown run id; None: a new run."""
    if configured:
        return configured
    run_id, saved_uri = meta.get("mlflow_run_id"), meta.get("mlflow_uri")
    if run_id and saved_uri is not None and saved_uri != uri:
        log.warning("checkpoint's MLflow run %s is in %s, not in %s: starting a new run", run_id, saved_uri, uri)
        return None
    return run_id


class Tracker:
    """Logs to one MLflow run (``run_id``) of one tracking store, spooling through outages."""

    def __init__(self, uri: str, run_id: str, spool_dir: str | None = None, flush_timeout_s: float = 120.0):
        configure_http()
        self.uri, self._run_id = uri, run_id
        self.client = _client(uri)
        self.journal = _journal(spool_dir or default_spool_dir())
        self.flush_timeout_s = flush_timeout_s

    @property
    def run_id(self) -> str:
        return self._run_id

    @classmethod
    def start(cls, cfg, run_id: str | None = None, owner: bool = True) -> Tracker:
        """Create the pre-training run, or resume ``run_id`` (or ``cfg.tracking.run_id``).

        Resuming works while the server is away (the status change is spooled); creating a
        run needs the server, since its id goes into every checkpoint. Only the run's
        ``owner`` (the driver, or rank 0 where no driver is) marks a resumed run RUNNING: a
        rank's spooled status change, delivered after the driver ended the run, would undo
        the end (seen with a worker restarted while the server was away).
        """
        configure_http(cfg.tracking.http_timeout_s, cfg.tracking.http_max_retries)
        uri = tracking_uri(cfg)
        run_id = run_id or cfg.tracking.run_id
        if run_id:
            tracker = cls(uri, run_id, spool_dir(cfg), cfg.tracking.flush_timeout_s)
            if owner:
                tracker._write({"op": "update_run", "run": run_id, "status": "RUNNING"})
            return tracker
        client = _client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifacts = None
            if uri.startswith("sqlite:"):
                artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags={"pipeline.kind": "pretrain"})
        return cls(uri, run.info.run_id, spool_dir(cfg), cfg.tracking.flush_timeout_s)

    # ------------------------------------------------------------ writes (spooled when offline)

    def log_params(self, params: dict) -> None:
        items = [[k, _param_value(v)] for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._write({"op": "log_batch", "run": self._run_id, "params": items[i : i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, int(step)] for k, v in metrics.items()]
        self._write({"op": "log_batch", "run": self._run_id, "metrics": batch})

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_text(text)
            self.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._write({"op": "log_artifact", "run": self._run_id, "file": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "log_batch", "run": self._run_id, "tags": [[k, str(v)] for k, v in tags.items()]})

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended and wait (``flush_timeout_s``) for the spool to drain."""
        self._write(
            {"op": "set_terminated", "run": self._run_id, "status": status, "end_time": int(time.time() * 1000)}
        )
        self.flush(self.flush_timeout_s)

    def register_model(self, name: str, artifact_path: str) -> None:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of model ``name`` (once)."""
        self._write({"op": "register", "run": self._run_id, "name": name, "artifact_path": artifact_path})

    def _write(self, record: dict) -> None:
        """Send ``record`` now, or spool it when the server is away or earlier ones wait."""
        record["uri"] = self.uri
        j = self.journal
        with j.lock:
            if not j.idle():
                j.append(record)
                return
            try:
                _apply(record)
            except Exception as e:
                if not _transient(e):
                    raise
                log.warning(
                    "MLflow at %s did not take a write (%s); spooling to %s until it answers",
                    self.uri,
                    _short(e),
                    j.path_hint(),
                )
                j.append(record)

    def note_logged_step(self, step: int) -> None:
        """Note, beside the spool, that the run's step metrics are logged up to ``step`` (a
        restarted rank 0 on this host reads it when the server is away: :meth:`logged_step_noted`)."""
        path = self._logged_step_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(str(int(step)))
            os.replace(tmp, path)
        except OSError as e:  # a note for a later restart; never stop training for it
            log.warning("could not note the logged step in %s: %s", path, e)

    def logged_step_noted(self) -> int:
        """The step noted by :meth:`note_logged_step` on this host for this run; 0 when none."""
        try:
            return int(self._logged_step_path().read_text())
        except (OSError, ValueError):
            return 0

    def _logged_step_path(self) -> Path:
        return self.journal.dir / f"{self._run_id}.logged_step"

    def metric_history(self, key: str) -> list:
        """The run's history of metric ``key`` (needs the server)."""
        return self.client.get_metric_history(self.run_id, key)

    # ------------------------------------------------------------ delivery

    def flush(self, timeout: float | None = 0.0) -> bool:
        """Deliver this process's spool and those dead processes left for this server; True when none is left.

        ``timeout`` 0 tries once; None waits as long as it takes.
        """
        return self.journal.flush(timeout, self.uri)

    def pending(self) -> int:
        """Writes of this process not delivered yet."""
        return len(self.journal.queue)


class SystemMetrics:
    """CPU, memory, disk, network and GPU use, sampled into ``system/...`` metrics of a run.

    MLflow's monitors do the sampling; logging goes through the tracker, so samples taken
    while the server is away are spooled (MLflow's own ``SystemMetricsMonitor`` stops for
    good at the first failed request), and the step is whole seconds since the run started,
    so a resumed run continues its curves instead of restarting them at step 0.
    """

    def __init__(self, tracker: Tracker, interval_s: float = 10.0, node: str | None = None):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.tracker, self.interval_s = tracker, interval_s
        self.prefix = "system/" + (f"{node}/" if node else "")
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU or no pynvml
            pass
        try:
            self.t0 = tracker.client.get_run(tracker.run_id).info.start_time / 1000
        except Exception:
            self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Collect once and log; a failure is logged and sampling goes on."""
        try:
            metrics = {}
            for m in self.monitors:
                m.collect_metrics()
                metrics.update(m.aggregate_metrics())
                m.clear_metrics()
            self.tracker.log_metrics({self.prefix + k: v for k, v in metrics.items()}, int(time.time() - self.t0))
        except Exception as e:
            log.warning("system metrics sample failed: %s", e)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- applying one write


_CLIENTS: dict[str, MlflowClient] = {}


def _client(uri: str) -> MlflowClient:
    if uri not in _CLIENTS:
        from mlflow.tracking import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def _apply(record: dict) -> None:
    """Perform one write; idempotent, so a replayed record lands once."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client(record["uri"])
    op = record["op"]
    run = record["run"]
    if op == "log_batch":
        client.log_batch(
            run,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])],
            params=[Param(k, v) for k, v in record.get("params", [])],
            tags=[RunTag(k, v) for k, v in record.get("tags", [])],
        )
    elif op == "log_artifact":
        if not Path(record["file"]).exists():
            raise _Permanent(f"artifact file {record['file']} is gone")
        _with_timeout(
            int(os.environ.get("PIPELINE_MLFLOW_ARTIFACT_TIMEOUT", 600)),
            client.log_artifact,
            run,
            record["file"],
            record.get("artifact_path"),
        )
    elif op == "set_terminated":
        client.set_terminated(run, status=record["status"], end_time=record.get("end_time"))
    elif op == "update_run":
        client.update_run(run, status=record["status"])
    elif op == "register":
        _register(client, run, record["name"], record["artifact_path"])
    else:
        raise ValueError(f"unknown spool record op {op!r}")


def _register(client: MlflowClient, run_id: str, name: str, artifact_path: str) -> None:
    # The artifacts' own URI, as mlflow.register_model resolves a runs:/ URI: a server that
    # proxies artifacts cannot resolve runs:/ itself, and its registry page would show no schema.
    from mlflow.exceptions import MlflowException

    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if any(v.source == source for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")):
        return
    client.create_model_version(name, source=source, run_id=run_id, tags={"pipeline.artifact_path": artifact_path})


_ENV_LOCK = threading.Lock()


def _with_timeout(seconds: int, fn, *args):
    """Artifacts (large weights) get a longer HTTP timeout than the other requests."""
    with _ENV_LOCK:
        old = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(seconds, int(old or 0)))
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
            else:
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = old


_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}


class _Permanent(Exception):
    """A spooled record that can never be sent (its run was never created, its file is gone)."""


def _transient(e: BaseException) -> bool:
    """Worth retrying later: the server (or the network, or the store) is away, not the request wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        # Connection refused, timeouts and exhausted retries come as INTERNAL_ERROR too.
        return e.error_code in _TRANSIENT_CODES
    import requests

    return isinstance(e, (OSError, requests.exceptions.RequestException))


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s if len(s) < 200 else s[:197] + "..."


def _param_value(v) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


# ---------------------------------------------------------------- the spool


class _Journal:
    """This process's spool file in one directory, and delivery of it and of orphans.

    ``<host>-<pid>-<rand>.jsonl`` holds the records (appended, fsync'd); ``.state.json``
    beside it the last delivered ``seq``. The
    owner holds an exclusive ``flock`` on its file for life, so a file whose lock can be
    taken belongs to a dead (or closed) process and may be delivered by anyone.
    """

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.lock = threading.RLock()
        self._delivering = threading.Lock()
        self.queue: list[dict] = []
        self.seq = 0
        self.path: Path | None = None
        self._fh = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def path_hint(self) -> str:
        return str(self.path or self.dir)

    def idle(self) -> bool:
        return not self.queue

    def append(self, record: dict) -> None:
        with self.lock:
            if record["op"] == "log_artifact":
                record = {**record, "file": self._keep(record["file"])}
            self.seq += 1
            record = {**record, "seq": self.seq}
            fh = self._open()
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            self.queue.append(record)
        self._start_thread()

    def _open(self):
        if self._fh is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            tmp = self.dir / (name + ".new")
            fh = open(tmp, "a")  # noqa: SIM115 -- held (and locked) for the process's life
            fcntl.flock(fh, fcntl.LOCK_EX)
            os.replace(tmp, self.dir / name)  # visible to others only once locked
            self._fh, self.path = fh, self.dir / name
        return self._fh

    def _keep(self, path: str) -> str:
        """A copy of an artifact file in the spool (the original is often a temp file)."""
        dst = self.dir / "blobs" / uuid.uuid4().hex / Path(path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
        return str(dst)

    # ------------------------------------------------------------ delivery

    def deliver(self) -> bool:
        """Send queued records in order; stop at the first transient failure. True if none left.

        The network calls run outside ``lock``, so logging goes on (into the queue) meanwhile.
        """
        with self._delivering:
            while True:
                with self.lock:
                    if not self.queue:
                        return True
                    record = self.queue[0]
                try:
                    _apply(record)
                except Exception as e:
                    if _transient(e):
                        return False
                    _reject(self.path, record, e)
                with self.lock:
                    self.queue.pop(0)
                    _write_state(self.path, record["seq"])
                _drop_blob(record)

    def flush(self, timeout: float | None, uri: str | None = None) -> bool:
        deadline = None if timeout is None else time.time() + timeout
        wait = _RETRY_SECONDS[0]
        while True:
            own = self.deliver()
            others = deliver_orphans(self.dir, exclude=self.path, uri=uri)
            if own and others:
                return True
            if deadline is not None and time.time() + wait > deadline:
                if not own and timeout:
                    log.warning(
                        "%d MLflow writes still spooled in %s; they are sent when the server answers "
                        "(or run: python -m pipeline.evaluate sync --spool-dir %s)",
                        len(self.queue),
                        self.path,
                        self.dir,
                    )
                return False
            time.sleep(wait)
            wait = min(wait * 2, _RETRY_SECONDS[1])

    def _start_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return

        def loop():
            wait = _RETRY_SECONDS[0]
            while self.queue:
                self._wake.wait(wait)
                self._wake.clear()
                uri = self.queue[0]["uri"] if self.queue else None
                if uri and server_up(uri) and self.deliver():
                    log.info("MLflow at %s is back; spooled writes delivered", uri)
                    return
                wait = min(wait * 2, _RETRY_SECONDS[1])

        self._thread = threading.Thread(target=loop, name="mlflow-spool", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """At exit: one last try; an undelivered file stays for another process to deliver."""
        with self.lock:
            if self._fh is None:
                return
            if self.queue:
                self.deliver()
            done = not self.queue
            fh, self._fh = self._fh, None
            if done:
                _remove(self.path)
            fh.close()  # releases the lock


def server_up(uri: str, timeout: float = 2.0) -> bool:
    """Whether an HTTP tracking server answers ``/health`` (other stores: assume yes)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.exceptions.RequestException:
        return False


def deliver_orphans(directory: str | os.PathLike, exclude: Path | None = None, uri: str | None = None) -> bool:
    """Deliver the journals of dead processes in ``directory`` (those for ``uri`` only, if
    given); True if none is left."""
    directory = Path(directory)
    if not directory.is_dir():
        return True
    clean = True
    for path in sorted(directory.glob("*.jsonl")):
        if path == exclude:
            continue
        try:
            fh = open(path, "a")  # noqa: SIM115
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process is alive and delivers it itself
            fh.close()
            continue
        try:
            clean &= _deliver_file(path, uri)
        finally:
            fh.close()
    return clean


def _deliver_file(path: Path, uri: str | None = None) -> bool:
    if not path.exists():  # delivered and removed by another process meanwhile
        return True
    delivered = _read_state(path)["delivered"]
    records = [r for r in _read_records(path) if r["seq"] > delivered]
    if uri is not None and records and records[0]["uri"] != uri:
        return True  # another server's: left to its own processes (or to `sync`)
    for record in records:
        try:
            _apply(record)
        except Exception as e:
            if _transient(e):
                return False
            _reject(path, record, e)
        _write_state(path, record["seq"])
        _drop_blob(record)
    _remove(path)
    log.info("delivered the spooled MLflow writes of %s", path.name)
    return True


def _read_records(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash mid-write: never sent
                break
    return records


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state.json")


def _read_state(path: Path) -> dict:
    try:
        return json.loads(_state_path(path).read_text())
    except FileNotFoundError:
        return {"delivered": 0}


def _write_state(path: Path | None, seq: int) -> None:
    if path is None:
        return
    tmp = _state_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"delivered": seq}))
    os.replace(tmp, _state_path(path))


def _reject(path: Path | None, record: dict, e: Exception) -> None:
    """A record the server refuses for good (e.g. a changed param) is set aside, not retried."""
    log.error("MLflow refused a spooled %s write (%s); kept in %s.rejected", record["op"], _short(e), path)
    if path is not None:
        with open(path.with_name(path.name + ".rejected"), "a") as f:
            f.write(json.dumps({**record, "error": _short(e)}) + "\n")


def _drop_blob(record: dict) -> None:
    if record["op"] == "log_artifact" and "/blobs/" in record["file"]:
        shutil.rmtree(Path(record["file"]).parent, ignore_errors=True)


def _remove(path: Path | None) -> None:
    if path is None:
        return
    for p in (path, _state_path(path)):
        p.unlink(missing_ok=True)


_JOURNALS: dict[tuple[int, str], _Journal] = {}
_JOURNALS_LOCK = threading.Lock()


def _journal(directory: str) -> _Journal:
    """The one journal of this process for ``directory`` (trackers of a process share it)."""
    key = (os.getpid(), str(Path(directory).resolve()))
    with _JOURNALS_LOCK:
        if key not in _JOURNALS:
            _JOURNALS[key] = _Journal(key[1])
        return _JOURNALS[key]


@atexit.register
def _close_journals() -> None:
    for (pid, _), j in list(_JOURNALS.items()):
        if pid == os.getpid():
            try:
                j.close()
            except Exception as e:  # exiting anyway; the file stays for another process
                log.warning("closing MLflow spool %s: %s", j.path_hint(), e)
