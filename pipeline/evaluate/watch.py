"""Watch a run's checkpoints and evaluate every complete one once, as Ray tasks.

Used inside the pre-training job (a thread beside ``trainer.fit``) and standalone
(``python -m pipeline.evaluate watch``), any number of them over one run dir: each evaluation
is claimed before it starts (``pipeline.evaluate.record.claimed``), and a checkpoint whose
open evaluations others hold is left to them. The run dir is any fsspec URL (a local path,
``s3://...``, see ``pipeline.rundir``); a task on a host that cannot see it as a local path
copies the checkpoint into a temp dir first. A checkpoint is evaluated only once its marker
exists, and never twice: what was evaluated is the run dir's records, so the watcher
survives its own restart and MLflow outages alike. The watcher is what shows records in
MLflow: its Ray tasks only write them, and every poll (and :meth:`Watcher.finish`) publishes
each record MLflow does not have yet, those of finished tasks and those it did not take before.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading

from omegaconf import DictConfig, OmegaConf

from pipeline.checkpoint import CorruptCheckpoint
from pipeline.evaluate.record import publish_pending
from pipeline.evaluate.runner import evaluate_checkpoint, evaluated, left_to_others, wanted
from pipeline.rundir import RunDir, local_path

log = logging.getLogger(__name__)


def evaluate_tag(eval_cfg: DictConfig, run_url: str, tag: str, uri: str | None, run_id: str | None) -> dict:
    """``evaluate_checkpoint`` of the run's checkpoint ``tag``, through a local copy when remote."""
    run = RunDir(run_url)
    ckpts = run.checkpoints
    if ckpts.local:
        if not ckpts.is_complete(tag):
            raise FileNotFoundError(f"{ckpts.tag_url(tag)} is not a complete checkpoint")
        return evaluate_checkpoint(eval_cfg, local_path(ckpts.url), tag, run, uri, run_id)
    tmp = tempfile.mkdtemp(prefix="vit-eval-")
    try:
        ckpts.fetch(tag, tmp)
        return evaluate_checkpoint(eval_cfg, tmp, tag, run, uri, run_id, source=ckpts.url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remote_eval(eval_cfg: dict, run_url: str, tag: str) -> dict:
    """The Ray task: evaluate ``tag`` and write its records to the run dir. The watcher that
    submitted it shows them in MLflow (``publish_pending`` at its next poll), so an evaluation's
    worker needs no MLflow client (nor its import: about 2 CPU-seconds per task)."""
    import os

    logging.basicConfig(
        level=logging.WARNING if os.environ.get("PIPELINE_QUIET") else logging.INFO, format="%(asctime)s %(message)s"
    )
    return evaluate_tag(OmegaConf.create(eval_cfg), run_url, tag, None, None)


class Watcher:
    """Polls the run dir and evaluates each complete, not yet evaluated checkpoint once.

    ``use_ray`` False evaluates in this process, one checkpoint per poll (the standalone
    watcher without a cluster, and tests).
    """

    def __init__(
        self,
        eval_cfg: DictConfig,
        run: RunDir,
        tracking_uri: str | None,
        parent_run_id: str | None,
        use_ray: bool = True,
    ):
        self.eval_cfg, self.run = eval_cfg, run
        self.uri, self.run_id = tracking_uri, parent_run_id
        self.use_ray = use_ray
        if use_ray:
            import ray

            self.task = ray.remote(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus, max_retries=1)(_remote_eval)
        self.pending: dict = {}
        self.results: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.unshown: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def needed(eval_cfg: DictConfig) -> bool:
        """Whether ``eval_cfg`` asks for any evaluation (of any evaluator) of the checkpoints."""
        return bool(eval_cfg.enabled and wanted(eval_cfg))

    @property
    def done(self) -> set[str]:
        return evaluated(self.run, self.eval_cfg)

    def poll(self) -> None:
        """Submit every complete, not yet evaluated checkpoint; collect finished tasks; show
        in MLflow what it did not take before."""
        in_flight = set(self.pending.values())
        done = self.done
        for tag in self.run.checkpoints.complete_tags():
            if tag in done or tag in in_flight or tag in self.failed or left_to_others(self.run, self.eval_cfg, tag):
                continue
            log.info("evaluating checkpoint %s/%s", self.run.checkpoints.url, tag)
            if self.use_ray:
                ref = self.task.remote(OmegaConf.to_container(self.eval_cfg), self.run.url, tag)
                self.pending[ref] = tag
            else:
                self._run_inline(tag)
        self._collect(timeout=0)
        self.unshown = (
            publish_pending(self.run, self.uri, self.run_id, self.eval_cfg.claims) if self.uri and self.run_id else []
        )

    def _run_inline(self, tag: str) -> None:
        try:
            self.results[tag] = evaluate_tag(self.eval_cfg, self.run.url, tag, self.uri, self.run_id)
        except Exception as e:
            self._failed(tag, e)

    def _collect(self, timeout: float | None) -> None:
        if not self.pending:
            return
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in ready:
            tag = self.pending.pop(ref)
            try:
                self.results[tag] = ray.get(ref)
            except Exception as e:  # an eval failure must not take the training job down
                self._failed(tag, e)

    def _failed(self, tag: str, e: Exception) -> None:
        """Remember a failed evaluation (not tried again by this watcher); a corrupt checkpoint
        is one line naming the file, anything else its traceback."""
        if isinstance(e, CorruptCheckpoint):  # also a Ray task's error caused by one
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[-1]
            log.error("checkpoint %s/%s is corrupt, not evaluated: %s", self.run.checkpoints.url, tag, problem)
            self.failed[tag] = f"corrupt checkpoint: {problem}"
            return
        log.error("evaluation of %s failed", tag, exc_info=e)
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

    def abandon(self) -> None:
        """Stop polling and write nothing more (the run has another owner now); tasks in flight
        keep their claims until they end."""
        self._stop.set()
        if self._thread:
            self._thread.join()

    def finish(self) -> dict[str, dict]:
        """Stop polling, evaluate what is left, wait for every task, publish every record;
        results of this process by tag (``unshown`` lists what MLflow still lacks)."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.poll()
        self._collect(timeout=None)
        self.poll()  # records of the last tasks
        return self.results
