"""Watch a checkpoint directory and evaluate every complete checkpoint once, as Ray tasks.

Used inside the pre-training job (a thread beside ``trainer.fit``) and standalone
(``python -m pipeline.evaluate watch``). A checkpoint is evaluated only once its marker
exists, and never twice: what was evaluated is read back from MLflow's child runs, so the
watcher survives its own restart.
"""

from __future__ import annotations

import logging
import threading

import ray
from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint
from pipeline.evaluate.runner import CHECKPOINT_TAG, evaluate_checkpoint
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def _remote_eval(eval_cfg: dict, ckpt_dir: str, tag: str, uri: str | None, run_id: str | None) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return evaluate_checkpoint(OmegaConf.create(eval_cfg), ckpt_dir, tag, uri, run_id)


class Watcher:
    def __init__(self, eval_cfg: DictConfig, ckpt_dir: str, tracking_uri: str | None, parent_run_id: str | None):
        self.eval_cfg, self.ckpt_dir = eval_cfg, ckpt_dir
        self.uri, self.run_id = tracking_uri, parent_run_id
        self.task = ray.remote(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus, max_retries=1)(_remote_eval)
        self.pending: dict[ray.ObjectRef, str] = {}
        self.results: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.done = self._evaluated_in_mlflow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _evaluated_in_mlflow(self) -> set[str]:
        if not (self.uri and self.run_id):
            return set()
        names = {fs.name for fs in self.eval_cfg.fewshot}
        seen: dict[str, set[str]] = {}
        for run in Tracker(self.uri, self.run_id).children("attributes.status = 'FINISHED'"):
            tag = run.data.tags.get(CHECKPOINT_TAG)
            if tag:
                seen.setdefault(tag, set()).add(run.data.tags.get("eval.dataset", ""))
        return {tag for tag, ds in seen.items() if names <= ds}

    def poll(self) -> None:
        """Submit every complete, not yet evaluated checkpoint; collect finished tasks."""
        in_flight = set(self.pending.values())
        for tag in checkpoint.complete_tags(self.ckpt_dir):
            if tag in self.done or tag in in_flight or tag in self.failed:
                continue
            log.info("evaluating checkpoint %s/%s", self.ckpt_dir, tag)
            ref = self.task.remote(OmegaConf.to_container(self.eval_cfg), self.ckpt_dir, tag, self.uri, self.run_id)
            self.pending[ref] = tag
        self._collect(timeout=0)

    def _collect(self, timeout: float | None) -> None:
        if not self.pending:
            return
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
