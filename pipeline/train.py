"""The training loop: one DeepSpeed engine per rank, read top to bottom.

Runs under any ``torch.distributed`` launcher (Ray Train, ``torchrun``, ``deepspeed``):
``python -m pipeline.train <config.yaml> key=value ...`` (a ``--local_rank=N`` argument
from the deepspeed launcher is accepted and ignored; the rank comes from the environment).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from data_prep.disk import DiskFull, NoRoom
from pipeline import checkpoint, guard, rundir
from pipeline.augment import mixup_lambda
from pipeline.checkpoint import resume_source  # noqa: F401  (tests ask train for it)
from pipeline.checkpoint import staging_dir as local_ckpt_dir  # noqa: F401
from pipeline.compile import CompileWatch, compile_blocks
from pipeline.config import batch_split, data_streams, load_config, to_flat_dict, to_yaml
from pipeline.data import CanonicalStream, ShardIndex, StreamSpec, TrainStream, train_stream
from pipeline.devices import PEAK_TFLOPS
from pipeline.ema import EMA
from pipeline.engine import (
    DTYPES,
    dist_setup,
    ds_config,
    forward_loss,
    initialize,
    loss_fn,
    warmup_decay,
)
from pipeline.lease import LEASE_TOKEN, Fence, Lease, LeaseHeld, launcher_job, refusal, took_over
from pipeline.model import flops_per_image, from_config
from pipeline.stop import Exit, StopRequest
from pipeline.tracking import SystemMetrics, Tracker, tracking_uri

log = logging.getLogger("pipeline.train")

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is 0.


def total_steps(cfg: DictConfig, num_samples: int) -> int:
    if cfg.train.steps > 0:
        return int(cfg.train.steps)
    return max(1, int(cfg.train.epochs * num_samples // cfg.train.global_batch_size))


def lr_at(cfg: DictConfig, step: int, total: int) -> float:
    """Linear warmup from 0 to lr, then linear (or cosine) decay to end_lr at ``total``."""
    o = cfg.optim
    return o.lr * warmup_decay(step, o.warmup_steps, total, o.schedule, o.end_lr / o.lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weight matrices only (not biases, norms, tokens, pos-emb)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    d = cfg.deepspeed
    batch_split(cfg, world_size)  # the error names the keys
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero.update(reduce_bucket_size=d.reduce_bucket_size, overlap_comm=d.overlap_comm, contiguous_gradients=True)
    if d.zero_stage == 3:
        # Without this, ZeRO-3 saves empty 16-bit module weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if cfg.train.compile.enabled:
            zero["memory_efficient_linear"] = False  # its autograd function is opaque to dynamo (pipeline.compile)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    fp16 = {"loss_scale": 0, "initial_scale_power": d.fp16_initial_scale_power,  # dynamic loss scale
            "loss_scale_window": d.fp16_loss_scale_window, "hysteresis": d.fp16_hysteresis,
            "min_loss_scale": d.fp16_min_loss_scale}
    out = ds_config(cfg.train.global_batch_size, cfg.data.micro_batch_size, world_size, cfg.optim.grad_clip,
                    cfg.train.precision, zero, fp16)
    if cfg.train.guard.enabled and cfg.train.precision == "bf16":
        out["bf16"]["check_grad_overflow"] = True  # how the guard skips an update (pipeline.guard)
    return _merge(out, dict(d.extra))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _build_optimizer(cfg: DictConfig, model: torch.nn.Module, device: torch.device):
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _peak_flops(peak_tflops: float, device: torch.device) -> float:
    """Peak FLOP/s of one device: ``peak_tflops`` when set, else a known GPU's, else 0."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    return 0.0


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The model to pre-train: the configured architecture with its regularisation and head init."""
    return from_config(cfg.model, num_classes, dropout=cfg.model.dropout, drop_path=cfg.model.drop_path,
                       head_bias_init=-10.0 if cfg.train.loss == "sigmoid" else 0.0,
                       grad_checkpointing=cfg.model.grad_checkpointing)


def build_engine(cfg: DictConfig, num_classes: int, steps: int, world: int, device: torch.device,
                 load_universal: bool = False):
    """Model, optimizer and schedule wrapped in a DeepSpeed engine (same init on every rank);
    ``load_universal``: it will load a universal checkpoint (another world size)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, num_classes)
    if (c := cfg.train.compile).enabled:  # before ZeRO-3 registers its hooks (blocks become leaf modules)
        compile_blocks(model, c.mode, c.backend, c.dynamic, zero3=cfg.deepspeed.zero_stage == 3)
    optimizer = _build_optimizer(cfg, model, device)
    config = deepspeed_config(cfg, world)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return initialize(model, optimizer, lambda s: lr_at(cfg, s, steps) / cfg.optim.lr, config)


def _check_room(cfg: DictConfig, ckpts: checkpoint.CheckpointManager, num_classes: int, world: int, steps: int,
                device: torch.device) -> float:
    """Refuse (:class:`~data_prep.disk.NoRoom`, on every rank) when a host's staging dir lacks room
    for the checkpoints it will hold at once (``pipeline.plan.checkpoint_room``, this host's
    share of each tag), or stages another live run's (:func:`pipeline.rundir.claim_scratch`);
    returns this host's bytes of one tag."""
    from data_prep.disk import check_room
    from pipeline.plan import checkpoint_room

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
    verdict = torch.tensor(float(problem is not None), device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)  # every rank stops, or none
    if verdict.item():
        raise problem or NoRoom("another host's staging dir has no room for this run (its log says why)")
    return tag


LOST = 2.0  # the ranks' stop code when the run's lease is another's (1.0: a stop request)


def train(cfg: DictConfig, on_checkpoint=None) -> dict:
    """Train to ``total_steps``, resuming from the run's latest complete checkpoint if any.

    ``on_checkpoint(metrics)`` is called on every rank after each complete checkpoint
    (``step``, ``tag``, ``loss``, ``total_steps``; Ray Train reports them). Returns a summary
    (final step, loss, images/s; ``lost`` when the ranks stopped, writing nothing, because the
    run's lease ($PIPELINE_LEASE_TOKEN, ``pipeline.lease``) names another owner) on every rank.
    """
    return _train(cfg, on_checkpoint)[0]


def _train(cfg: DictConfig, on_checkpoint=None):
    rank, world, device = dist_setup()
    quiet = bool(os.environ.get("PIPELINE_QUIET"))  # python -m pipeline.run --quiet
    logging.basicConfig(level=logging.INFO if rank == 0 and not quiet else logging.WARNING, format="%(asctime)s %(message)s",
                        force=True)
    preempt = StopRequest()  # SIGTERM: checkpoint at the next step boundary and exit
    index = ShardIndex.load(cfg.data.train)
    num_classes = cfg.model.num_classes or index.num_classes
    steps = total_steps(cfg, index.num_samples)
    accum = batch_split(cfg, world)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # every rank writes here (sample keys) before any save
    run = rundir.RunDir(cfg.run_dir)
    ckpts = checkpoint.CheckpointManager(run, checkpoint.staging_dir(cfg.output_dir), cfg.train.resume_from, cfg.train.keep_checkpoints,
                                         on_corrupt=cfg.train.on_corrupt_checkpoint)
    ckpts.tag_bytes = _check_room(cfg, ckpts, num_classes, world, steps, device)
    src = ckpts.prepare()  # recovery: the run dir's latest checkpoint onto this host
    engine, scheduler = build_engine(cfg, num_classes, steps, world, device,
                                     load_universal=src is not None and checkpoint.is_universal(Path(*src)))
    model = engine.module
    image_size = model.spec.img_size
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # dropout differs per rank

    ema = EMA(engine.module, cfg.train.ema.decay, cfg.train.ema.every, cfg.train.ema.warmup, engine.optimizer) if cfg.train.ema.decay else None
    sentry = guard.Guard(cfg.train.guard, cfg.optim.warmup_steps, fp16=cfg.train.precision == "fp16",
                         quiet=rank != 0) if cfg.train.guard.enabled else None
    ckpts.track(engine=engine, ema=ema, guard=sentry)
    meta, data_state = ckpts.resume()
    step = engine.global_steps
    samples_seen = int(meta.get("samples_seen", 0))

    spec = StreamSpec(
        index_url=cfg.data.train, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
        batch_size=cfg.data.micro_batch_size, image_size=image_size, num_classes=num_classes, seed=cfg.train.seed,
        shuffle_block=cfg.data.shuffle_block, crop_area=(cfg.data.crop_min_area, cfg.data.crop_max_area), flip=cfg.data.flip,
        randaug_layers=cfg.aug.randaug_layers, randaug_magnitude=cfg.aug.randaug_magnitude,
        streams=data_streams(cfg, world), global_batch=cfg.train.global_batch_size,
    )
    rng = checkpoint.rng_state()
    stream = train_stream(spec, data_state)
    ckpts.track(stream=stream)
    checkpoint.set_rng_state(rng)  # the DataLoader seeds its workers from the global RNG: keep dropout's stream exact on resume
    if sentry is not None:
        record = guard.read_record(run)
        sentry.events = record["rollbacks"]
        if rank == 0 and record["diverged"] is not None:  # a new attempt (with other settings, one hopes)
            guard.write_record(run, sentry.events)
        if (event := guard.pending_skip(sentry.events, int(meta.get("guard_events", 0)), step)) is not None:
            log.warning("replaying a rollback this checkpoint did not see: %s", guard.describe(event))
            _skip_past(stream, event)  # stopped between a rollback and its next checkpoint

    tracker = None
    if rank == 0:
        # A resumed run keeps its MLflow run, so curves continue instead of restarting.
        run_id = _mlflow_run_to_resume(cfg.tracking.run_id, tracking_uri(cfg), meta)
        tracker = Tracker.start(cfg, run_id=run_id)
        if not run_id:
            tracker.log_params(to_flat_dict(cfg))
            tracker.log_text(to_yaml(cfg), "config.yaml")
    logged_upto = _last_logged_step(tracker) if tracker is not None else 0  # recovery: steps logged before a restart
    if tracker is not None and ckpts.set_aside:
        _record_set_aside(tracker, ckpts.set_aside, step)
    if (saved_world := int(meta.get("world_size") or world)) != world:  # an elastic group resized, or a rerun
        log.warning("resized: step %d resumes on %d ranks, its checkpoint was saved by %d", step, world, saved_world)
        if tracker is not None:
            tracker.log_metrics({"elastic/resized_from": saved_world, "elastic/resized_to": world}, step)
            tracker.set_tags({f"elastic.resize.step_{step}": f"{saved_world} -> {world} ranks"})
    monitor = _system_metrics(cfg.tracking.system_metrics, tracker)
    dtype = DTYPES[cfg.train.precision]
    loss_of = functools.partial(loss_fn, kind=cfg.train.loss, label_smoothing=cfg.train.label_smoothing)
    config_yaml = to_yaml(cfg)
    keys_file = open(Path(cfg.output_dir) / f"sample_keys_rank{rank}.jsonl", "a") if cfg.train.log_sample_keys else None  # noqa: SIM115
    flops = flops_per_image(model.spec, num_classes)
    peak = _peak_flops(cfg.train.peak_tflops, device)
    tokens_per_image = (image_size // model.spec.patch_size) ** 2 + model.num_prefix_tokens

    def save(at_step: int) -> None:
        meta = {"samples_seen": samples_seen, "world_size": world, "total_steps": steps, "num_classes": num_classes,
                "model": cfg.model.name, "image_size": image_size, "mlflow_run_id": tracker.run_id if tracker else None,
                "mlflow_uri": tracker.uri if tracker else None, "guard_events": len(sentry.events) if sentry else 0}
        t = ckpts.save(at_step, meta, config_yaml)
        if on_checkpoint is not None:
            on_checkpoint({"step": at_step, "tag": t, "loss": last_loss, "total_steps": steps})

    # The driver owns the run (its lease); rank 0 checks that it still does, so that ranks whose
    # driver lost the run to another launch stop before they write anything more.
    fence = Fence(run.lease_url, os.environ[LEASE_TOKEN], cfg.lease.heartbeat_s) if rank == 0 and os.environ.get(LEASE_TOKEN) else None
    at_start = torch.tensor(float(fence is not None and fence.lost(now=True)), device=device)
    dist.all_reduce(at_start, op=dist.ReduceOp.MAX)  # the run lost while these ranks started: write nothing
    lost = bool(at_start.item())
    last_loss = float("nan")
    # The run dir decides, as every rank sees the same one: a host's scratch dir may hold an
    # earlier run's tags (same output_dir), and ranks that disagreed would hang in save().
    if not lost and step == 0 and cfg.train.checkpoint_at_start and ckpts.latest() is None:
        save(0)

    window_loss, window_n, t0, window_start = torch.zeros(2, device=device), 0, time.time(), step
    diverged = None
    compiling = CompileWatch(cfg.train.compile.max_recompiles, quiet=rank != 0) if cfg.train.compile.enabled else None
    first_step = (step, time.time())
    engine.train()
    while not lost and step < steps:
        verdict, step_loss, window_before = None, torch.zeros((), device=device), window_loss.clone()
        skipped_before = engine.skipped_steps
        for micro in range(accum):
            batch = next(stream)
            # mixup: one lambda per micro-batch, from (seed, step, micro-batch): exact on resume
            lam = mixup_lambda(cfg.aug.mixup_alpha, cfg.train.seed, step, micro) if cfg.aug.mixup_alpha > 0 else None
            value = forward_loss(engine, batch, loss_of, dtype, device, mixup_lam=lam)
            if sentry is not None:
                value = guard.fault(value, cfg.train.guard, stream.batches, rank)
                step_loss += value.detach().float()
                if micro == accum - 1:  # judged before the last backward, so a bad update is never applied
                    verdict = sentry.judge(step + 1, step_loss, accum)
            loss = value.detach()
            engine.backward(value * math.nan if verdict is not None and verdict.reason else value)
            engine.step()
            window_loss += torch.stack([loss.float(), torch.ones((), device=device)])
            if keys_file:
                keys_file.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
        step = engine.global_steps
        if compiling is not None and first_step[0] == step - 1:
            _compile_report(compiling, step, time.time() - first_step[1], cfg.train.compile.mode, len(model.blocks), tracker)
        if sentry is not None and sentry.settle(verdict, engine.skipped_steps > skipped_before).reason:
            window_loss.copy_(window_before)  # the logged loss is the mean of the applied steps
            scheduler.step()  # DeepSpeed holds the schedule on a skipped step; it follows the step count
            if trouble := sentry.trouble(verdict):
                meta, diverged = _roll_back(sentry, trouble, ckpts, stream, step, cfg.train, accum, tracker)
                if diverged is not None:
                    break
                step, samples_seen = engine.global_steps, int(meta.get("samples_seen", 0))
                window_loss.zero_()
                window_n, t0, window_start = 0, time.time(), step
                continue
        elif ema is not None:
            ema.step(step)
        samples_seen += cfg.train.global_batch_size
        window_n += 1
        save_due = step % cfg.train.checkpoint_every == 0 or step == steps or step == cfg.train.stop_at_step
        lost_here = fence is not None and fence.lost(now=save_due or preempt.requested)
        stop = torch.tensor(LOST if lost_here else float(preempt.requested or (rank == 0 and run.stop_requested())), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() == LOST:
            lost = True
            log.error("the run dir's lease names another owner (%s/%s): stopping at step %d with no checkpoint or metric",
                      run.url, rundir.LEASE, step)
            break

        if step % cfg.train.log_every == 0 or step == steps:
            dist.all_reduce(window_loss)
            mem = torch.tensor(_memory_gib(device), device=device)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            dt = time.time() - t0
            ips = (step - window_start) * cfg.train.global_batch_size / dt
            last_loss = (window_loss[0] / window_loss[1]).item()
            metrics = {
                "train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/images_per_s": ips, "train/tokens_per_s": ips * tokens_per_image,
                "train/memory_gib_max_rank": mem.item(), "train/samples_seen": samples_seen,
                "train/skipped_samples": stream.skipped, "train/world_size": world,
                **(sentry.metrics() if sentry is not None else {}),
                **(compiling.metrics() if compiling is not None else {}),
            }
            if peak:
                metrics["train/mfu"] = ips * flops / (peak * world)
            if rank == 0 and step > logged_upto:  # steps redone after a restart or a rollback were logged already
                steps_per_s = (step - window_start) / dt
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f images/s %.1f steps/s %.2f eta %s mem %.2fGiB",
                         step, steps, last_loss, metrics["train/lr"], metrics["train/grad_norm"], ips, steps_per_s,
                         _eta(steps - step, steps_per_s), mem.item())
                tracker.log_metrics(metrics, step)
                logged_upto = step
            window_loss.zero_()
            window_n, t0, window_start = 0, time.time(), step

        stop_here = stop.item() or step == cfg.train.stop_at_step
        saved = False
        if save_due or stop_here:
            if sentry is None or sentry.may_checkpoint(step) or (step == steps and verdict.reason is None):
                save(step)
                saved = True
            else:
                log.warning("step %d: no checkpoint, an unhealthy step is within train.guard.bad_window=%d steps",
                            step, cfg.train.guard.bad_window)
        if stop.item() and step < steps:
            preempt.requested = True
            log.warning("stop requested (SIGTERM or %s/%s): %s; rerun the same command to resume", run.url, rundir.STOP,
                        f"checkpoint saved at step {step}" if saved else f"no checkpoint (unhealthy), the last is {ckpts.latest()}")
            break
        if stop_here and step < steps:
            log.info("stopping at step %d (train.stop_at_step); rerun the same command to resume", step)
            break

    if keys_file:
        keys_file.close()
    if compiling is not None:
        compiling.close()
    if monitor:
        monitor.finish()
    summary = {"step": step, "total_steps": steps, "loss": last_loss, "preempted": bool(preempt.requested), "lost": lost,
               "samples_seen": samples_seen, "run_id": tracker.run_id if tracker else None}
    if ckpts.set_aside:
        summary["corrupt_checkpoints"] = ckpts.set_aside
    if sentry is not None:
        summary["guard"] = {"skipped_steps": sentry.skipped, "rollbacks": sentry.events, "diverged": diverged}
    if compiling is not None:
        summary["compile"] = {**{k.split("/")[1]: v for k, v in compiling.metrics().items()},
                              "reasons": dict(compiling.reasons), "storm": compiling.warned}
    return summary, engine


def _compile_report(watch: CompileWatch, step: int, seconds: float, mode: str, blocks: int, tracker: Tracker | None) -> None:
    """The compile cost, once, after this process's first step: a log line and a metric."""
    log.info("train.compile: %d blocks compiled (mode %s): %.1f s of compiling in step %d, which took %.1f s",
             blocks, mode, watch.seconds, step, seconds)
    if tracker is not None:
        tracker.log_metrics({"compile/first_step_seconds": seconds, **watch.metrics()}, step)


# ---------------------------------------------------------------- the divergence guard (pipeline.guard)

def _skip_past(stream: TrainStream | CanonicalStream, event: dict) -> None:
    """Consume the stream until it has delivered the data a rollback skips to: ``data_steps``
    training steps of data (the same in any world size, so a replay after a resize skips the
    same samples), or in an event recorded before that count, ``batches`` of this rank's."""
    if "data_steps" in event:
        while stream.steps < event["data_steps"]:
            next(stream)
        return
    while stream.batches < event["batches"]:
        next(stream)


def _roll_back(sentry: guard.Guard, trouble: guard.Trouble, ckpts: checkpoint.CheckpointManager, stream: TrainStream | CanonicalStream,
               step: int, train_cfg: DictConfig, accum: int, tracker: Tracker | None) -> tuple[dict, dict | None]:
    """Back to the newest checkpoint before the trouble, past the data since then (every rank);
    ``(its meta, None)``, or ``({}, why)`` when there is no such checkpoint or the rollbacks ran out."""
    g = train_cfg.guard
    complete = [rundir.step_of(t) for t in ckpts.run.checkpoints.complete_tags()]
    to = guard.target(complete, trouble)
    reasons = ", ".join(sorted({r for s, r in sentry.bad}))
    if to is None or len(sentry.events) >= g.max_rollbacks:
        why = "no checkpoint before it" if to is None else f"after {len(sentry.events)} rollbacks (train.guard.max_rollbacks)"
        diverged = {"steps": trouble.steps, "reasons": reasons, "resume_from": ckpts.latest(), "why": why}
        if tracker is not None:
            guard.write_record(ckpts.run, sentry.events, diverged)
            log.error("%s", guard.diverged_message(diverged, ckpts.run.checkpoints.url))
        return {}, diverged
    event = {"at_step": step, "first_bad": trouble.first, "bad_steps": trouble.steps, "reasons": reasons, "to_step": to,
             "batches": stream.batches + g.skip_extra_steps * accum, "data_steps": stream.steps + g.skip_extra_steps,
             "samples_skipped": (step - to + g.skip_extra_steps) * train_cfg.global_batch_size}
    sentry.events.append(event)
    if tracker is not None:  # rank 0: the decision is recorded before it is carried out
        guard.write_record(ckpts.run, sentry.events)
        tracker.log_metrics({"guard/rollback_to_step": to, "guard/samples_skipped": event["samples_skipped"]}, step)
        tracker.set_tags({f"guard.rollback.{len(sentry.events)}": guard.describe(event)})
        log.warning("rollback %d of at most %d: %s", len(sentry.events), g.max_rollbacks, guard.describe(event))
    if g.fault.exit_after_rollback:  # TESTS ONLY: a kill between the decision and the next checkpoint
        dist.barrier()
        os._exit(Exit.FAILED)
    _skip_past(stream, event)
    skipped = sentry.skipped
    meta = ckpts.rollback(rundir.tag_for(to))
    sentry.skipped = skipped  # a count of this process's skips, not part of the decisions
    return meta, None


# ---------------------------------------------------------------- recovery (see pipeline/run.py)

def _record_set_aside(tracker: Tracker, events: list[dict], step: int) -> None:
    """The corrupt checkpoints set aside at this resume, on the MLflow run: a tag each (which
    file, why, where it went) and the step resumed from."""
    for event in events:
        tracker.set_tags({f"checkpoint.corrupt.{event['tag']}": f"{event['problem']} (set aside in {event['moved_to']})"})
    tracker.log_metrics({"checkpoint/corrupt_set_aside": len(events), "checkpoint/resumed_from_step": step}, step)


def _last_logged_step(tracker: Tracker) -> int:
    """The highest step of ``train/loss`` already in the run (steps redone after a restart are not
    logged again); 0 when the store cannot be read."""
    try:
        return max((m.step for m in tracker.metric_history("train/loss")), default=0)
    except Exception as e:  # an unreachable server: log everything, the store keeps the last value
        log.warning("could not read the logged steps of run %s: %s", tracker.run_id, e)
        return 0


def _eta(steps_left: int, steps_per_s: float) -> str:
    """Time left as h:mm:ss at the current rate."""
    if steps_per_s <= 0:
        return "?"
    seconds = int(steps_left / steps_per_s)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _mlflow_run_to_resume(configured: str | None, uri: str, meta: dict) -> str | None:
    """The configured MLflow run (``tracking.run_id``), else the checkpoint's run when it lives
    in this run's tracking store ``uri``; a checkpoint carried to another store (e.g. a
    universal one in a new output_dir) starts a new run there instead of failing on an
    unknown run id."""
    if configured:
        return configured
    run_id, saved_uri = meta.get("mlflow_run_id"), meta.get("mlflow_uri")
    if run_id and saved_uri is not None and saved_uri != uri:
        log.warning("checkpoint's MLflow run %s is in %s, not in %s: starting a new run", run_id, saved_uri, uri)
        return None
    return run_id


def _system_metrics(enabled: bool, tracker: Tracker | None):
    """System metrics (CPU, memory, disk, network, GPU) of the pre-training run from rank 0,
    through the tracker (``SystemMetrics``: spooled while the server is away), every
    $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10)."""
    if tracker is None or not enabled:
        return None
    try:
        return SystemMetrics(tracker, float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10)))
    except Exception as e:  # metrics are a nicety; never stop training for them
        log.warning("system metrics disabled: %s", e)
        return None


def main(argv: list[str] | None = None) -> int:
    """Exits 0 at the end of training, ``Exit.STOPPED`` (3) after a stop request (SIGTERM, the
    run dir's STOP) with the stop checkpoint saved, ``Exit.CONFIG`` (2) when a live job owns the
    run, ``Exit.DIVERGED`` (5), ``Exit.LOST`` (6) when another launch took the run over. Rank 0
    also writes its status to $PIPELINE_STATUS_FILE when set: torchrun itself exits 1 whenever
    a rank exits with another status than 0, and launch/train_dist.sh passes the real one on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_config(path, argv[1:] if path else argv)
    rank, _, device = dist_setup()
    code = _run(cfg, rank, device)
    if rank == 0 and (where := os.environ.get(STATUS_FILE)):
        Path(where).write_text(f"{int(code)}\n")
    return code


STATUS_FILE = "PIPELINE_STATUS_FILE"


def _run(cfg: DictConfig, rank: int, device: torch.device) -> Exit:
    lease = None
    if not os.environ.get(LEASE_TOKEN):  # torchrun or the deepspeed launcher: no driver owns the run
        lease = _own_run(cfg, rank, device)
        if lease is False:
            dist.destroy_process_group()
            return Exit.CONFIG
    try:
        summary = train(cfg)
        if rank == 0:
            print(json.dumps(summary))
        dist.barrier()
        dist.destroy_process_group()
    except (NoRoom, DiskFull) as e:  # one line a person reads, and its own status
        print(f"{'config error: ' if isinstance(e, NoRoom) else ''}{e}", file=sys.stderr, flush=True)
        return Exit.CONFIG if isinstance(e, NoRoom) else Exit.NO_SPACE
    finally:
        if lease:
            lease.release()  # a lease another launch took over is left to it
    if summary["lost"]:
        return Exit.LOST
    if (summary.get("guard") or {}).get("diverged"):
        return Exit.DIVERGED
    return Exit.STOPPED if summary["preempted"] and summary["step"] < summary["total_steps"] else Exit.OK


def _own_run(cfg: DictConfig, rank: int, device: torch.device) -> Lease | None | bool:
    """Own the run when no driver does (``pipeline.lease``): rank 0 takes the run dir's lease,
    renews it in a thread and hands its token to its own fence (see ``_train``); every rank
    learns in one all-reduce whether it did. Returns rank 0's lease (None on the other ranks),
    or False on every rank when a live job owns the run (rank 0 says who)."""
    lease, held, failed = None, None, None
    if rank == 0:
        run = rundir.RunDir(cfg.run_dir)
        lease = Lease(run.lease_url, cfg.lease.heartbeat_s, cfg.lease.expiry_s, job_id=launcher_job())
        try:
            if (previous := lease.acquire()) is not None:
                print(took_over(run.url, previous), file=sys.stderr, flush=True)
            os.environ[LEASE_TOKEN] = lease.token
            lease.start()
        except LeaseHeld as e:
            held = refusal(cfg.name, cfg.run_dir, e.owner)
        except Exception as e:  # the store did not answer: every rank stops, rank 0 says why
            failed = e
    verdict = torch.tensor(2.0 if failed else float(held is not None), device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    if failed is not None:
        raise failed
    if verdict.item() == 2.0:
        raise RuntimeError("rank 0 could not take the run dir's lease (see its log)")
    if verdict.item():
        if held is not None:
            print(held, file=sys.stderr, flush=True)
        return False
    return lease


if __name__ == "__main__":
    sys.exit(main())
