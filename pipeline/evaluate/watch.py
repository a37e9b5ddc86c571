"""Watch a checkpoint directory and evaluate every complete checkpoint once, as Ray tasks.

Used inside the pre-training job (a thread beside ``trainer.fit``) and standalone
(``python -m pipeline.evaluate watch``). The directory is any fsspec URL (a local path,
``s3://...``); a remote checkpoint is copied to a local temp dir inside the task first.
A checkpoint is evaluated only once its ``COMPLETE`` marker exists, and never twice: what
was evaluated is read back from MLflow's child runs (and from the spool of writes the
server has not taken yet), so the watcher survives its own restart and server outages.
Nothing is submitted while that record cannot be read.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import tempfile
import threading

from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint
from pipeline.evaluate.runner import evaluate_checkpoint, evaluated, wanted
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def complete_tags(url: str) -> list[str]:
    """Tags of the complete checkpoints under a checkpoint dir URL, oldest first."""
    if is_local(url):
        return checkpoint.complete_tags(_local_path(url))
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        return []
    tags = []
    for path in fs.ls(root, detail=False, refresh=True):
        name = posixpath.basename(path.rstrip("/"))
        try:
            checkpoint.step_of(name)
        except ValueError:
            continue
        if fs.exists(posixpath.join(root, name, checkpoint.MARKER)):
            tags.append(name)
    return sorted(tags, key=checkpoint.step_of)


def download(url: str, tag: str, dest: str) -> str:
    """Copy one complete checkpoint ``<url>/<tag>`` into ``dest``; returns the local checkpoint dir."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    src = posixpath.join(root, tag)
    if not fs.exists(posixpath.join(src, checkpoint.MARKER)):
        raise FileNotFoundError(f"{url}/{tag} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
    fs.get(src.rstrip("/") + "/", f"{dest}/{tag}/", recursive=True)
    return dest


def evaluate_url(eval_cfg: DictConfig, url: str, tag: str, uri: str | None, run_id: str | None, spool_dir: str | None = None) -> dict:
    """``evaluate_checkpoint`` on a checkpoint dir URL, through a local copy when remote."""
    if is_local(url):
        return evaluate_checkpoint(eval_cfg, _local_path(url), tag, uri, run_id, spool_dir=spool_dir)
    tmp = tempfile.mkdtemp(prefix="vit-eval-")
    try:
        return evaluate_checkpoint(eval_cfg, download(url, tag, tmp), tag, uri, run_id, spool_dir=spool_dir, source=url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remote_eval(eval_cfg: dict, ckpt_dir: str, tag: str, uri: str | None, run_id: str | None, spool_dir: str | None = None) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return evaluate_url(OmegaConf.create(eval_cfg), ckpt_dir, tag, uri, run_id, spool_dir)


class Watcher:
    """Polls ``ckpt_dir`` and evaluates each complete, not yet evaluated checkpoint once.

    ``use_ray`` False evaluates in this process, one checkpoint per poll (the standalone
    watcher without a cluster, and tests).
    """

    def __init__(self, eval_cfg: DictConfig, ckpt_dir: str, tracking_uri: str | None, parent_run_id: str | None,
                 spool_dir: str | None = None, use_ray: bool = True):
        self.eval_cfg, self.ckpt_dir = eval_cfg, ckpt_dir
        self.uri, self.run_id, self.spool_dir = tracking_uri, parent_run_id, spool_dir
        self.tracker = Tracker(tracking_uri, parent_run_id, spool_dir=spool_dir) if tracking_uri and parent_run_id else None
        self.use_ray = use_ray
        if use_ray:
            import ray

            self.task = ray.remote(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus, max_retries=1)(_remote_eval)
        self.pending: dict = {}
        self.results: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.done: set[str] | None = None
        self._load_done()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load_done(self) -> None:
        """The evaluated checkpoints, from MLflow; left None (submit nothing) while unreadable."""
        if self.tracker is None:
            self.done = self.done or set()
            return
        try:
            need = wanted(self.eval_cfg)
            self.done = {tag for tag, have in evaluated(self.tracker).items() if need <= have}
        except Exception as e:
            log.warning("cannot read the evaluated checkpoints from MLflow yet (%s); waiting", e)

    def poll(self) -> None:
        """Submit every complete, not yet evaluated checkpoint; collect finished tasks."""
        if self.tracker is not None:
            self.tracker.flush(0.0)  # deliver spools of eval tasks that ended while the server was away
        if self.done is None:
            self._load_done()
            if self.done is None:
                return
        in_flight = set(self.pending.values())
        for tag in complete_tags(self.ckpt_dir):
            if tag in self.done or tag in in_flight or tag in self.failed:
                continue
            log.info("evaluating checkpoint %s/%s", self.ckpt_dir, tag)
            if self.use_ray:
                ref = self.task.remote(OmegaConf.to_container(self.eval_cfg), self.ckpt_dir, tag, self.uri, self.run_id, self.spool_dir)
                self.pending[ref] = tag
            else:
                self._run_inline(tag)
        self._collect(timeout=0)

    def _run_inline(self, tag: str) -> None:
        try:
            self.results[tag] = evaluate_url(self.eval_cfg, self.ckpt_dir, tag, self.uri, self.run_id, self.spool_dir)
            self.done.add(tag)
        except Exception as e:
            log.exception("evaluation of %s failed", tag)
            self.failed[tag] = str(e)

    def _collect(self, timeout: float | None) -> None:
        if not self.pending:
            return
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in ready:
            tag = self.pending.pop(ref)
            try:
                self.results[tag] = ray.get(ref)
                self.done.add(tag)
            except Exception as e:  # an eval failure must not take the training job down
                log.error("evaluation of %s failed: %s", tag, e)
                self.failed[tag] = str(e)

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.eval_cfg.poll_seconds):
                try:
                    self.poll()
                except Exception as e:
                    log.warning("watcher poll failed (will retry): %s", e)

        self._thread = threading.Thread(target=loop, name="checkpoint-watcher", daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, dict]:
        """Stop polling, evaluate what is left, wait for every task; results by tag."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.poll()
        self._collect(timeout=None)
        return self.results
