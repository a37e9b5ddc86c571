"""One rank's pre-training, read as the story of a step: :class:`Trainer` builds its
components once, :meth:`Trainer.train` loops over :meth:`Trainer.train_step`, and
:meth:`Trainer.close` releases what was opened, however training ends.

Each concern lives with its component; the trainer wires them:

* ``pipeline.checkpoint.CheckpointManager``: the stateful parts (engine, EMA, data position,
  RNG, guard), resume, and when a save is due (its ``SaveSchedule``, with the guard's veto);
* ``pipeline.guard.Guard``: each step's health, rollbacks, their replay at a resume;
* ``pipeline.step_metrics.StepMetrics``: the loss window, the log line, MLflow step metrics,
  the system-metrics monitor;
* ``pipeline.stop.agree``: the ranks' vote at a step boundary (go on, stop, or the run is lost);
* ``pipeline.tracking.Tracker`` (rank 0): the MLflow run, ended here when no driver owns it.

A new per-step concern (a profiler, say) is one more component built in ``_build_step_parts``:
its ``close`` on the exit stack, its ``metrics()`` among the step metrics' sources, and its
per-step call in :meth:`Trainer.train_step`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import DictConfig

from data_prep.disk import NoRoom, check_room
from pipeline import checkpoint, faults, guard, rundir
from pipeline.augment import mixup_lambda
from pipeline.compile import CompileWatch
from pipeline.config import batch_split, data_streams, to_flat_dict, to_yaml
from pipeline.data import ShardIndex, StreamSpec, train_stream
from pipeline.ema import EMA
from pipeline.engine import DTYPES, dist_setup, forward_loss, loss_fn
from pipeline.lease import LEASE_TOKEN, Fence
from pipeline.model import flops_per_image
from pipeline.plan import checkpoint_room
from pipeline.recipe import build_engine, total_steps
from pipeline.step_metrics import StepMetrics, peak_flops
from pipeline.stop import StopRequest, Vote, agree
from pipeline.tracking import Tracker, end_status, run_to_resume, tracking_uri

log = logging.getLogger(__name__)


class Trainer:
    """Every rank builds one, together: joins the process group, checks the disk, builds the
    engine, resumes from the run's latest complete checkpoint and (rank 0) opens the MLflow run.
    Use it as a context manager, or call :meth:`close`.

    ``on_checkpoint(metrics)`` is called on every rank after each complete checkpoint (``step``,
    ``tag``, ``loss``, ``total_steps``). ``owns_run``: no driver owns the run (torchrun, the
    deepspeed launcher), so rank 0 ends its MLflow run at :meth:`close` with the outcome.
    :attr:`engine` is the DeepSpeed engine, as trained once :meth:`train` returns.
    """

    def __init__(self, cfg: DictConfig, on_checkpoint=None, owns_run: bool = False):
        self.cfg, self.on_checkpoint, self.owns_run = cfg, on_checkpoint, owns_run
        self.rank, self.world, self.device = dist_setup()
        quiet = bool(os.environ.get("PIPELINE_QUIET"))  # python -m pipeline.run --quiet
        logging.basicConfig(
            level=logging.INFO if self.rank == 0 and not quiet else logging.WARNING,
            format="%(asctime)s %(message)s",
            force=True,
        )
        self.stop_request = StopRequest()  # SIGTERM: checkpoint at the next step boundary and exit
        self.tracker: Tracker | None = None
        self.lost, self.diverged, self.status = False, None, None  # status: the MLflow run's end; None: failed
        self._open = ExitStack()  # what close() releases, last opened first
        try:
            data_state = self._build_state()
            self._build_stream(data_state)
            self._open_tracking()
            self._build_step_parts()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train to the last step, a stop or a divergence; returns the summary (the same on every
        rank; see ``pipeline.train.train``)."""
        # The run lost while these ranks started: they write nothing.
        self.lost = agree(Vote.LOST if self._lease_lost(now=True) else Vote.CONTINUE, self.device) is Vote.LOST
        if not self.lost and self.ckpts.save_at_start(self.step):
            self.save(0)
        self.metrics.restart(self.step)
        self._first_step = (self.step, time.time())
        self.engine.train()
        while not self.lost and self.step < self.total_steps:
            verdict = self.train_step()
            if verdict is not None and verdict.reason:  # its update was not applied
                self.metrics.drop_step()  # the logged loss is the mean of the applied steps
                self.scheduler.step()  # DeepSpeed holds the schedule on a skipped step; it follows the step count
                if trouble := self.guard.trouble(verdict):
                    if self._roll_back(trouble):
                        continue
                    break
            elif self.ema is not None:
                self.ema.step(self.step)
            self.samples_seen += self.cfg.train.global_batch_size
            vote = self._vote(self.ckpts.schedule.due(self.step))
            if vote is Vote.LOST:
                break
            if self.metrics.due(self.step):
                self.metrics.log(
                    self.step,
                    self.scheduler.get_last_lr()[0],
                    float(self.engine.get_global_grad_norm() or 0.0),
                    self.samples_seen,
                    self.stream.skipped,
                )
            stopping = vote is Vote.STOP or self.step == self.cfg.train.stop_at_step
            healthy = verdict is None or verdict.reason is None
            if saved := self.ckpts.should_save(self.step, stopping, healthy):
                self.save(self.step)
            if stopping and self._stops_here(vote, saved):
                break
        return self._outcome()

    def train_step(self) -> guard.Verdict | None:
        """One optimizer step over ``accum`` micro-batches on every rank (:meth:`train` calls it).
        With the guard, the step is judged before its last backward and an unhealthy update is
        never applied (its loss times NaN makes DeepSpeed skip it); returns the guard's settled
        verdict (None without a guard)."""
        cfg, verdict, step_loss = self.cfg, None, torch.zeros((), device=self.device)
        self.metrics.begin_step()
        skipped_before = self.engine.skipped_steps
        for micro in range(self.accum):
            batch = next(self.stream)
            # mixup: one lambda per micro-batch, from (seed, step, micro-batch): exact on resume
            lam = (
                mixup_lambda(cfg.aug.mixup_alpha, cfg.train.seed, self.step, micro) if cfg.aug.mixup_alpha > 0 else None
            )
            value = forward_loss(self.engine, batch, self.loss_of, self.dtype, self.device, mixup_lam=lam)
            if self.guard is not None:
                value = faults.corrupt_loss(value, cfg.train.guard.fault, self.stream.batches, self.rank)
                step_loss += value.detach().float()
                if micro == self.accum - 1:  # judged before the last backward, so a bad update is never applied
                    verdict = self.guard.judge(self.step + 1, step_loss, self.accum)
            loss = value.detach()
            self.engine.backward(value * math.nan if verdict is not None and verdict.reason else value)
            self.engine.step()
            self.metrics.add(loss)
            if self.keys_file:
                self.keys_file.write(json.dumps({"step": self.step, "keys": batch["keys"]}) + "\n")
        self.step = self.engine.global_steps
        if self.compiling is not None and self._first_step[0] == self.step - 1:
            c = cfg.train.compile
            self.compiling.report_first_step(
                self.step, time.time() - self._first_step[1], c.mode, len(self.engine.module.blocks), self.tracker
            )
        if self.guard is not None:
            verdict = self.guard.settle(verdict, self.engine.skipped_steps > skipped_before)
        return verdict

    def save(self, step: int) -> None:
        """A checkpoint of every tracked part at ``step`` (every rank), then ``on_checkpoint``."""
        t = self.tracker
        meta = {
            "samples_seen": self.samples_seen,
            "world_size": self.world,
            "total_steps": self.total_steps,
            "num_classes": self.num_classes,
            "model": self.cfg.model.name,
            "image_size": self.engine.module.spec.img_size,
            "mlflow_run_id": t.run_id if t else None,
            "mlflow_uri": t.uri if t else None,
            "guard_events": len(self.guard.events) if self.guard else 0,
        }
        tag = self.ckpts.save(step, meta, self.config_yaml)
        if self.on_checkpoint is not None:
            self.on_checkpoint(
                {"step": step, "tag": tag, "loss": self.metrics.last_loss, "total_steps": self.total_steps}
            )

    def close(self) -> None:
        """Release what training opened (the sample-keys file, the monitors, rank 0's MLflow run
        when this process owns it); safe to call again."""
        self._open.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the decisions of a step

    def _roll_back(self, trouble: guard.Trouble) -> bool:
        """The guard's rollback (every rank); False when the run diverged instead."""
        meta, self.diverged = self.guard.roll_back(
            trouble, self.step, self.ckpts, self.stream, self.accum, self.cfg.train.global_batch_size, self.tracker
        )
        if self.diverged is not None:
            return False
        self.step, self.samples_seen = self.engine.global_steps, int(meta.get("samples_seen", 0))
        self.metrics.restart(self.step)
        return True

    def _lease_lost(self, now: bool) -> bool:
        # The run's owner (the driver, or rank 0 under torchrun) holds its lease; rank 0 checks that
        # it still does, so that ranks whose run went to another launch stop before they write more.
        return self.fence is not None and self.fence.lost(now=now)

    def _vote(self, save_due: bool) -> Vote:
        """The ranks' decision after a step: go on; stop (SIGTERM, the run dir's STOP); or stop
        writing nothing, the run's lease naming another owner (read before every save and stop)."""
        if self._lease_lost(now=save_due or self.stop_request.requested):
            mine = Vote.LOST
        elif self.stop_request.requested or (self.rank == 0 and self.run.stop_requested()):
            mine = Vote.STOP
        else:
            mine = Vote.CONTINUE
        if (vote := agree(mine, self.device)) is Vote.LOST:
            self.lost = True
            log.error(
                "the run dir's lease names another owner (%s/%s): stopping at step %d with no checkpoint or metric",
                self.run.url,
                rundir.LEASE,
                self.step,
            )
        return vote

    def _stops_here(self, vote: Vote, saved: bool) -> bool:
        """Whether a stop (a request, or ``train.stop_at_step``) ends training at this step; says how."""
        if self.step >= self.total_steps:
            return False
        if vote is Vote.STOP:
            self.stop_request.requested = True
            log.warning(
                "stop requested (SIGTERM or %s/%s): %s; rerun the same command to resume",
                self.run.url,
                rundir.STOP,
                f"checkpoint saved at step {self.step}"
                if saved
                else f"no checkpoint (unhealthy), the last is {self.ckpts.latest()}",
            )
        else:
            log.info("stopping at step %d (train.stop_at_step); rerun the same command to resume", self.step)
        return True

    def _outcome(self) -> dict:
        """The summary, and the status a run this process owns ends with."""
        self.status = end_status(self.step >= self.total_steps and self.diverged is None, self.diverged is not None)
        summary = {
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.metrics.last_loss,
            "preempted": bool(self.stop_request.requested),
            "lost": self.lost,
            "samples_seen": self.samples_seen,
            "run_id": self.tracker.run_id if self.tracker else None,
        }
        if self.ckpts.set_aside:
            summary["corrupt_checkpoints"] = self.ckpts.set_aside
        if self.guard is not None:
            summary["guard"] = {
                "skipped_steps": self.guard.skipped,
                "rollbacks": self.guard.events,
                "diverged": self.diverged,
            }
        if self.compiling is not None:
            summary["compile"] = self.compiling.summary()
        return summary

    def _end_run(self) -> None:
        # Ends the MLflow run only where no driver does, and never one lost to another launch.
        if self.owns_run and not self.lost:
            self.tracker.finish(self.status or "FAILED")

    # ------------------------------------------------------------ building (in this order: RNG and collectives)

    def _build_state(self) -> dict | None:
        """The run's checkpoints, the engine and its stateful parts, resumed; returns the data
        stream's saved state (None for a fresh start)."""
        cfg, t = self.cfg, self.cfg.train
        index = ShardIndex.load(cfg.data.train)
        self.num_classes = cfg.model.num_classes or index.num_classes
        self.total_steps = total_steps(cfg, index.num_samples)
        self.accum = batch_split(cfg, self.world)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # every rank writes here (sample keys) before any save
        self.run = rundir.RunDir(cfg.run_dir)
        schedule = checkpoint.SaveSchedule(t.checkpoint_every, self.total_steps, t.stop_at_step, t.checkpoint_at_start)
        self.ckpts = checkpoint.CheckpointManager(
            self.run,
            checkpoint.staging_dir(cfg.output_dir),
            t.resume_from,
            t.keep_checkpoints,
            on_corrupt=t.on_corrupt_checkpoint,
            schedule=schedule,
        )
        self.ckpts.tag_bytes = _check_room(cfg, self.ckpts, self.num_classes, self.world, self.total_steps, self.device)
        src = self.ckpts.prepare()  # recovery: the run dir's latest checkpoint onto this host
        self.engine, self.scheduler = build_engine(
            cfg,
            self.num_classes,
            self.total_steps,
            self.world,
            self.device,
            load_universal=src is not None and checkpoint.is_universal(Path(*src)),
        )
        torch.manual_seed(t.seed * 1000 + self.rank + 1)  # dropout differs per rank
        e = t.ema
        self.ema = EMA(self.engine.module, e.decay, e.every, e.warmup, self.engine.optimizer) if e.decay else None
        self.guard = (
            guard.Guard(t.guard, cfg.optim.warmup_steps, fp16=t.precision == "fp16", quiet=self.rank != 0)
            if t.guard.enabled
            else None
        )
        self.ckpts.track(engine=self.engine, ema=self.ema, guard=self.guard)
        self.meta, data_state = self.ckpts.resume()
        self.step = self.engine.global_steps
        self.samples_seen = int(self.meta.get("samples_seen", 0))
        return data_state

    def _build_stream(self, data_state: dict | None) -> None:
        """This rank's data stream at the resumed position, past a rollback its checkpoint missed."""
        cfg = self.cfg
        spec = StreamSpec(
            index_url=cfg.data.train,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.num_workers,
            batch_size=cfg.data.micro_batch_size,
            image_size=self.engine.module.spec.img_size,
            num_classes=self.num_classes,
            seed=cfg.train.seed,
            shuffle_block=cfg.data.shuffle_block,
            crop_area=(cfg.data.crop_min_area, cfg.data.crop_max_area),
            flip=cfg.data.flip,
            randaug_layers=cfg.aug.randaug_layers,
            randaug_magnitude=cfg.aug.randaug_magnitude,
            streams=data_streams(cfg, self.world),
            global_batch=cfg.train.global_batch_size,
        )
        rng = checkpoint.rng_state()
        self.stream = train_stream(spec, data_state)
        self.ckpts.track(stream=self.stream)
        checkpoint.set_rng_state(
            rng
        )  # the DataLoader seeds its workers from the global RNG: keep dropout's stream exact on resume
        if self.guard is not None:
            self.guard.replay(
                self.run, int(self.meta.get("guard_events", 0)), self.step, self.stream, writer=self.rank == 0
            )

    def _open_tracking(self) -> None:
        """Rank 0's MLflow run: a resumed run keeps its run, so curves continue instead of restarting;
        what this start found (corrupt checkpoints set aside, another world size) is noted there."""
        cfg = self.cfg
        if self.rank == 0:
            run_id = run_to_resume(cfg.tracking.run_id, tracking_uri(cfg), self.meta)
            self.tracker = Tracker.start(cfg, run_id=run_id, owner=self.owns_run)
            self._open.callback(self._end_run)
            if not run_id:
                self.tracker.log_params(to_flat_dict(cfg))
                self.tracker.log_text(to_yaml(cfg), "config.yaml")
            if self.ckpts.set_aside:
                _record_set_aside(self.tracker, self.ckpts.set_aside, self.step)
        if (
            saved_world := int(self.meta.get("world_size") or self.world)
        ) != self.world:  # an elastic group resized, or a rerun
            log.warning(
                "resized: step %d resumes on %d ranks, its checkpoint was saved by %d",
                self.step,
                self.world,
                saved_world,
            )
            if self.tracker is not None:
                self.tracker.log_metrics(
                    {"elastic/resized_from": saved_world, "elastic/resized_to": self.world}, self.step
                )
                self.tracker.set_tags({f"elastic.resize.step_{self.step}": f"{saved_world} -> {self.world} ranks"})

    def _build_step_parts(self) -> None:
        """What every step uses: the loss, the step metrics, the sample-keys file, the compile
        watch and (under a driver's lease) rank 0's fence."""
        cfg, model = self.cfg, self.engine.module
        self.dtype = DTYPES[cfg.train.precision]
        self.loss_of = functools.partial(loss_fn, kind=cfg.train.loss, label_smoothing=cfg.train.label_smoothing)
        self.config_yaml = to_yaml(cfg)
        self.compiling = None
        if (c := cfg.train.compile).enabled:
            self.compiling = CompileWatch(c.max_recompiles, quiet=self.rank != 0)
            self._open.callback(self.compiling.close)
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.metrics = StepMetrics(
            self.tracker,
            self.device,
            self.step,
            self.total_steps,
            cfg.train.log_every,
            self.world,
            cfg.train.global_batch_size,
            flops_per_image(model.spec, self.num_classes),
            peak_flops(cfg.train.peak_tflops, gpu),
            (model.spec.img_size // model.spec.patch_size) ** 2 + model.num_prefix_tokens,
            sources=(self.guard, self.compiling),
            system_metrics=cfg.tracking.system_metrics,
        )
        self._open.callback(self.metrics.close)
        self.keys_file = None
        if cfg.train.log_sample_keys:
            self.keys_file = self._open.enter_context(
                open(Path(cfg.output_dir) / f"sample_keys_rank{self.rank}.jsonl", "a")
            )
        token = os.environ.get(LEASE_TOKEN)
        self.fence = Fence(self.run.lease_url, token, cfg.lease.heartbeat_s) if self.rank == 0 and token else None


def _check_room(
    cfg: DictConfig, ckpts: checkpoint.CheckpointManager, num_classes: int, world: int, steps: int, device: torch.device
) -> float:
    """Refuse (:class:`~data_prep.disk.NoRoom`, on every rank) when a host's staging dir lacks room
    for the checkpoints it will hold at once (``pipeline.plan.checkpoint_room``, this host's
    share of each tag), or stages another live run's (:func:`pipeline.rundir.claim_scratch`);
    returns this host's bytes of one tag."""
    latest = ckpts.latest()
    tag, count = checkpoint_room(cfg, num_classes, steps, rundir.step_of(latest) if latest else None, ckpts.shared)
    tag *= int(os.environ.get("LOCAL_WORLD_SIZE", world)) / world
    problem = None
    try:
        check_room(ckpts.staging, tag * count, f"{count} checkpoint(s) of {int(tag):,} bytes (the plan's size)")
    except NoRoom as e:
        problem = e
    if problem is None and not ckpts.shared and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        if why := rundir.claim_scratch(cfg.output_dir, ckpts.run):  # the run dir's lease covers a shared one
            problem = NoRoom(why)
    if agree(Vote.STOP if problem is not None else Vote.CONTINUE, device) is Vote.STOP:  # every rank stops, or none
        raise problem or NoRoom("another host's staging dir has no room for this run (its log says why)")
    return tag


def _record_set_aside(tracker: Tracker, events: list[dict], step: int) -> None:
    """The corrupt checkpoints set aside at this resume, on the MLflow run: a tag each (which
    file, why, where it went) and the step resumed from."""
    for event in events:
        tracker.set_tags(
            {f"checkpoint.corrupt.{event['tag']}": f"{event['problem']} (set aside in {event['moved_to']})"}
        )
    tracker.log_metrics({"checkpoint/corrupt_set_aside": len(events), "checkpoint/resumed_from_step": step}, step)
