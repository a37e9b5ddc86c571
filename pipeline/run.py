"""The pre-training job: what ``launch/pretrain.sh`` and ``ray job submit`` run.

``python -m pipeline.run <experiment.yaml> key=value ...``

1. validates the config (nothing starts on a bad one);
2. connects to Ray ($RAY_ADDRESS or ``ray.address``; else starts a local instance);
3. makes the demo corpora and runs the configured data_prep jobs (skipping finished ones);
4. opens (or resumes) the MLflow pre-training run and logs the resolved config;
5. trains on a Ray Train ``TorchTrainer`` worker group, one DeepSpeed engine per worker,
   while a watcher evaluates every finished checkpoint as Ray tasks;
6. waits for the last evaluations and prints a summary and the command to open the UI.

Recovery:
- a worker that dies (SIGKILL, OOM, a lost node): Ray Train restarts the worker group up to
  ``ray.max_failures`` times and every worker resumes from the latest complete checkpoint;
  rank 0 does not log again the steps the MLflow run already has (no duplicated curves);
- the driver dies: rerun the same command (same ``name`` and storage): training resumes from
  the run dir's latest checkpoint and its ``mlflow_run_id`` continues the same MLflow run;
- one owner at a time (``pipeline.lease``): the driver takes the run dir's ``LEASE`` before it
  starts Ray or writes anything, and renews it every ``lease.heartbeat_s``. A launch over a run
  that a live job owns exits ``Exit.CONFIG`` (2) naming the owner; one whose owner's heartbeat is
  older than ``lease.expiry_s`` takes it over. The old owner, if it comes back, finds the lease
  another's: its training rank 0 (which checks the lease token every ``lease.heartbeat_s`` and
  before every checkpoint) stops the ranks at the next step without a checkpoint or a metric,
  and the driver exits ``Exit.LOST`` (6) without a summary, an MLflow status or an evaluation;
- SIGTERM to this driver (preemption, ``scancel``, ``kill``): it writes the run dir's ``STOP``,
  the workers checkpoint at the next step boundary and exit, and the job exits with status
  ``Exit.STOPPED`` (3, ``pipeline.stop``) after printing how to resume (rerun the same command);
- hosts without a shared disk: ``ray.storage_path=s3://...`` puts the run dir there
  (``pipeline.rundir``): checkpoints (marker last), evaluation records, the MLflow run id and
  the demo's shards; a worker on any host fetches the checkpoint it resumes from.

Before it exits, every evaluation recorded in the run dir is shown in MLflow; if the server
does not take them, the job says which and how to deliver them, and exits ``Exit.UNDELIVERED``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import guard
from pipeline.config import ConfigError, check_paths, load_config, to_flat_dict, to_yaml
from pipeline.lease import (
    LEASE_TOKEN,
    Lease,
    LeaseHeld,
    LeaseLost,
    job_identity,
    refusal,
    took_over,
)
from pipeline.rundir import CHECKPOINTS, RunDir, step_of
from pipeline.stop import Exit, StopRequest

log = logging.getLogger("pipeline.run")


def log_level() -> int:
    """INFO, or WARNING under ``--quiet`` ($PIPELINE_QUIET, which reaches every worker)."""
    return logging.WARNING if os.environ.get("PIPELINE_QUIET") else logging.INFO


def _train_worker(config: dict) -> None:
    """Body of each Ray Train worker: the plain training loop on Ray's process group.

    Every complete checkpoint is reported to Ray Train with a pointer checkpoint (the tag in
    the run dir; ``pipeline.rundir`` says why the files are not Ray's), so ``fit()``'s
    ``Result`` carries the last step and loss; the final report adds ``finished``/``preempted``.
    """
    import tempfile

    import ray
    import ray.train

    from pipeline.config import from_container
    from pipeline.elastic import ROOM, hold, room_to_grow
    from pipeline.train import train

    cfg = from_container(config)
    ctx = ray.train.get_context()
    print(
        f"training worker rank {ctx.get_world_rank()} on node {ray.get_runtime_context().get_node_id()} "
        f"({ray.util.get_node_ip_address()})",
        flush=True,
    )

    def report(metrics: dict, final: dict | None = None) -> None:
        is_rank0 = ctx.get_world_rank() == 0
        # An elastic group below its size asks at each checkpoint whether it can grow (pipeline.elastic);
        # not at the last one, where a restart would only end the run.
        grow = (
            is_rank0
            and final is None
            and metrics["step"] < metrics["total_steps"]
            and room_to_grow(cfg.ray, ctx.get_world_size())
        )
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "pointer.json").write_text(json.dumps({"run_dir": cfg.run_dir, "tag": metrics["tag"]}))
            ckpt = ray.train.Checkpoint.from_directory(d) if is_rank0 else None
            ray.train.report({**metrics, **(final or {}), ROOM: int(grow)}, checkpoint=ckpt)
        if grow:
            hold(cfg.ray.grow_wait_s)  # Ray restarts the group at the larger size from this checkpoint

    summary = train(cfg, on_checkpoint=report)
    if summary["lost"]:
        return  # another launch owns the run: no report (Ray would record a pointer checkpoint)
    from pipeline.rundir import tag_for

    diverged = (summary.get("guard") or {}).get("diverged")
    tag = diverged["resume_from"] if diverged else tag_for(summary["step"])  # nothing was saved after the trouble
    report(
        {"step": summary["step"], "tag": tag, "loss": summary["loss"], "total_steps": summary["total_steps"]},
        final={
            "finished": summary["step"] >= summary["total_steps"] and not diverged,
            "preempted": summary["preempted"],
            "diverged": bool(diverged),
        },
    )


def connect_ray(cfg: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not cfg.ray.use_gpu else "cuda")}
    for var in (
        "MLFLOW_TRACKING_URI",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "FSSPEC_S3_ENDPOINT_URL",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "PIPELINE_QUIET",
        "TQDM_DISABLE",
        LEASE_TOKEN,
    ):
        if var in os.environ:
            env[var] = os.environ[var]
    runtime_env = {"env_vars": env}
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + (cfg.eval.num_cpus if cfg.eval.enabled else 0)
        num_cpus = max(int(need + 0.999), os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP check of a ``host:port`` Ray address: ``ray.init`` retries an unreachable GCS
    for about a minute before it fails."""
    import socket

    if address == "auto" or "://" in address and not address.startswith("ray://"):
        return  # "auto" (a local cluster's address file) or a job-server URL: left to Ray
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"ray.address: cannot reach a Ray cluster at {address} ({e}); "
            "start one (ray start --head) or fix ray.address / $RAY_ADDRESS"
        ) from None


def check_room(cfg: DictConfig, run: RunDir) -> None:
    """Refuse (:class:`~data_prep.disk.NoRoom`, exit 2) before Ray starts when a local run dir
    lacks room for the checkpoints it will keep (``pipeline.plan.checkpoint_room``; each
    training host checks its own staging dir again)."""
    from data_prep.disk import check_room as room_for
    from pipeline.plan import checkpoint_room, corpus

    if not run.checkpoints.local:
        return
    latest = run.checkpoints.latest()
    steps = cfg.train.steps or int(cfg.train.epochs * corpus(cfg)[0] // cfg.train.global_batch_size)
    tag, count = checkpoint_room(cfg, corpus(cfg)[1], steps, step_of(latest) if latest else None, True)
    room_for(run.checkpoints.url, tag * count, f"{count} checkpoint(s) of {int(tag):,} bytes (the plan's size)")


def check_resources(cfg: DictConfig) -> None:
    """Fail before any worker starts when the cluster cannot hold the worker group."""
    import ray

    total = ray.cluster_resources()
    workers = cfg.ray.min_workers or cfg.ray.num_workers  # an elastic group starts with what there is
    if cfg.ray.use_gpu and total.get("GPU", 0) < workers:
        key = "ray.min_workers" if cfg.ray.min_workers else "ray.num_workers"
        raise ConfigError(f"{key}: {workers} GPU workers asked, the cluster has {total.get('GPU', 0):g} GPUs")
    need = workers * cfg.ray.cpus_per_worker
    if total.get("CPU", 0) < need:
        raise ConfigError(
            f"ray.cpus_per_worker: {need:g} CPUs asked for training, the cluster has {total.get('CPU', 0):g}"
        )


def prepare_data(cfg: DictConfig) -> list[dict]:
    """Demo corpora, then every data_prep job whose index does not exist yet."""
    import fsspec

    from data_prep.job import run_prep

    out = Path(cfg.output_dir)
    if cfg.demo.enabled:
        from data_prep.demo import make_digits_corpus, make_glyph_corpus

        if not (out / "corpus" / "glyphs").exists():
            s = make_glyph_corpus(
                str(out / "corpus" / "glyphs"),
                num_classes=cfg.demo.classes,
                per_class=cfg.demo.per_class,
                size=cfg.demo.image_size,
                seed=cfg.demo.seed,
                multi_label_fraction=cfg.demo.multi_label_fraction,
            )
            log.info("demo corpus: %s", s)
        if not (out / "corpus" / "digits").exists():
            make_digits_corpus(str(out / "corpus" / "digits"), size=cfg.demo.image_size)
    summaries = []
    for job in cfg.prep:
        index = f"{job.output.rstrip('/')}/{job.train_split}_index.json"
        fs, path = fsspec.core.url_to_fs(index)
        if fs.exists(path):
            log.info("shards exist, skipping data_prep: %s", index)
            continue
        summaries.append(run_prep(OmegaConf.to_object(job)))
    return summaries


def fit(cfg: DictConfig):
    """Train on a Ray Train worker group; returns Ray's ``Result`` (metrics of the last report)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.elastic import grow_at_checkpoints
    from pipeline.rundir import is_local

    backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if cfg.ray.use_gpu else "gloo")
    storage = cfg.run_dir  # Ray's own files under <run>/ray
    storage_fs = None
    if not is_local(storage):
        # Through fsspec (s3fs honours AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL), as our own uploads.
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, storage = fsspec.core.url_to_fs(storage)
        storage_fs = PyFileSystem(FSSpecHandler(fs))
    if cfg.ray.poll_interval_s is not None:  # read from the driver's environment when the controller starts
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.ray.poll_interval_s)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=OmegaConf.to_container(cfg, resolve=True),
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=(
                cfg.ray.num_workers if cfg.ray.min_workers is None else (cfg.ray.min_workers, cfg.ray.num_workers)
            ),
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    if cfg.ray.min_workers is None:
        return trainer.fit()
    with grow_at_checkpoints(cfg.ray.grow_wait_s):  # an elastic group grows back at a checkpoint
        return trainer.fit()


def run_job(cfg: DictConfig, dead_owner: str | None = None) -> dict:
    """The job, once this process owns the run (``pipeline.lease``): refused with
    :class:`~pipeline.lease.LeaseHeld` while a live job owns it; :class:`~pipeline.lease.LeaseLost`
    when another launch took it over meanwhile (nothing more was written). ``dead_owner``: a
    Ray job of this cluster the launcher saw end; a lease it holds is taken over at once."""
    t_start = time.time()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    run = RunDir(cfg.run_dir)
    if (finished := _finished_summary(cfg, run)) is not None:
        print(
            f"run {cfg.name} is finished (step {finished['final_step']} of {finished['total_steps']}, {run.url}); "
            "its summary:",
            flush=True,
        )
        _print_summary(finished)
        return finished
    lease = take_lease(cfg, run, dead_owner)
    try:
        return _owned_job(cfg, run, lease, t_start)
    finally:
        lease.release()


def take_lease(cfg: DictConfig, run: RunDir, dead_owner: str | None = None) -> Lease:
    """Own the run dir (its ``LEASE``), renewed in a thread; the token reaches the training ranks
    ($PIPELINE_LEASE_TOKEN), whose rank 0 stops without a checkpoint once it is not the lease's.
    A lease of Ray job ``dead_owner`` (ended, as the launcher asked the cluster) is taken over."""
    job_id, cluster = job_identity()
    lease = Lease(
        run.lease_url, cfg.lease.heartbeat_s, cfg.lease.expiry_s, job_id=job_id, cluster=cfg.ray.address or cluster
    )
    previous = lease.acquire(dead=lambda owner: dead_owner is not None and owner.job_id == dead_owner)
    if previous is not None:
        why = f"its Ray job {dead_owner} has ended" if previous.job_id == dead_owner and dead_owner else None
        print(took_over(run.url, previous, why), flush=True)
    os.environ[LEASE_TOKEN] = lease.token
    return lease.start()


def _owned_job(cfg: DictConfig, run: RunDir, lease: Lease, t_start: float) -> dict:
    from pipeline.evaluate.watch import Watcher
    from pipeline.plan import planned_vs_measured, run_plan
    from pipeline.tracking import Tracker, end_status, spool_dir

    check_room(cfg, run)
    connect_ray(cfg)
    check_resources(cfg)
    _install_stop_handler(run)
    prep = prepare_data(cfg)
    if not _still_owner(lease):  # frozen (or preparing data) past the expiry: the run went to another launch
        raise LeaseLost(f"{run.url} was taken over by another launch before this one wrote to it")

    resumed = bool(run.mlflow_run_id) and not cfg.tracking.run_id
    tracker = Tracker.start(cfg, run_id=run.mlflow_run_id if resumed else None)
    run.mlflow_run_id = tracker.run_id
    OmegaConf.update(cfg, "tracking.run_id", tracker.run_id)
    OmegaConf.update(cfg, "tracking.uri", tracker.uri)
    planned = run_plan(cfg)  # pipeline.plan: logged now, set next to the measured in the summary
    if not resumed:
        tracker.log_params(to_flat_dict(cfg))
        tracker.log_params(planned)
        tracker.log_text(to_yaml(cfg), "config.yaml")
    run.write_text("config.yaml", to_yaml(cfg))

    watcher = None
    if Watcher.needed(cfg.eval):
        watcher = Watcher(cfg.eval, run, tracker.uri, tracker.run_id)
        watcher.start()
    status, result = "FAILED", None
    t_train = time.time()
    try:
        result = fit(cfg)
        metrics = result.metrics or {}
        status = end_status(bool(metrics.get("finished")), bool(metrics.get("diverged")))
    finally:
        if not _still_owner(lease):  # the new owner's run from here: no status, summary or STOP removal
            if watcher:
                watcher.abandon()
            raise LeaseLost(f"{run.url} was taken over by another launch")
        if watcher:
            watcher.finish()
        if status == "FINISHED" and (last := run.checkpoints.latest()):
            _log_final_weights(tracker, run, last, cfg.tracking.register_model, cfg.tracking.pytorch_flavor)
        tracker.finish(status)
    train_seconds = time.time() - t_train
    final = result.metrics or {}
    summary = _summary(run, tracker, prep, final, train_seconds, time.time() - t_start)
    summary["plan"] = planned_vs_measured(planned, summary["images_per_s"], tracker)
    summary["stopped"] = status == "KILLED"
    summary["finished"] = status == "FINISHED"
    summary["guard"] = guard.read_record(run)
    summary["corrupt_checkpoints"] = run.checkpoints.set_aside_notes()
    run.clear_stop()
    summary["undelivered"] = _undelivered(run, tracker, spool_dir(cfg), cfg.eval.claims)
    run.write_summary(summary)
    _print_summary(summary)
    if summary["stopped"]:
        print(
            f"\nstopped on request at step {summary['final_step']} of {summary['total_steps']}, checkpoint saved in "
            f"{run.checkpoints.url}; to resume, rerun the same command (same name and storage): {' '.join(sys.argv)}",
            flush=True,
        )
    return summary


def _still_owner(lease: Lease) -> bool:
    """Whether the lease still names this job: read afresh (rank 0 may have seen the takeover
    before the renewal thread); a store that does not answer leaves the thread's verdict."""
    try:
        return lease.holds()
    except Exception as e:
        log.warning("could not read %s (%s); the last renewal's verdict stands", lease.url, e)
        return not lease.lost.is_set()


def _finished_summary(cfg: DictConfig, run) -> dict | None:
    """The summary of this run when it already trained to its end with this config."""
    summary = run.summary()
    if not summary or not summary.get("finished"):
        return None
    tag = run.checkpoints.latest()
    if tag is None or (cfg.train.steps and cfg.train.steps != summary.get("total_steps")):
        return None
    return summary if summary.get("final_step") == step_of(tag) else None


def _log_final_weights(tracker, run, tag: str, register_as: str | None, pytorch_flavor: bool) -> None:
    """The last checkpoint as an MLflow Model of the run (fetched first when the run dir is remote)."""
    from pipeline.mlflow_model import log_final_weights

    log_final_weights(tracker, run.url, tag, register_as=register_as, pytorch_flavor=pytorch_flavor)


def _undelivered(run, tracker, spool: str, claims) -> dict:
    """What MLflow still lacks: evaluation records, and writes left in the spool (this
    process's and those of training processes that ended)."""
    from pipeline.evaluate.record import publish_pending

    evals = publish_pending(run, tracker.uri, tracker.run_id, claims)
    return {"evaluations": [f"{tag}/{name}" for tag, name in evals], "spool": None if tracker.flush(0.0) else spool}


def _install_stop_handler(run) -> StopRequest:
    """SIGTERM or SIGINT to the driver becomes a graceful stop: the run dir's ``STOP``, which
    training rank 0 checks at each step boundary. Replaces Ray's own driver handler (exit at
    once). A stale STOP of an earlier process is removed first; a second signal exits at once."""
    import signal

    run.clear_stop()

    def request(signum: int) -> None:
        run.request_stop(f"signal {signum} at {time.time():.0f}")
        print(
            f"signal {signum}: stopping at the next step boundary after a checkpoint (signal again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    return StopRequest((signal.SIGTERM, signal.SIGINT), on_request=request, exit_on_repeat=True)


def _summary(run, tracker, prep, final: dict, train_seconds: float, total_seconds: float) -> dict:
    """The run's summary from its records: every evaluation of every checkpoint (this process's
    or an earlier one's, random init first) and the last step and loss Ray reported."""
    try:
        ips = [m.value for m in tracker.metric_history("train/images_per_s")]
    except Exception:  # the server may be away; throughput is then left out
        ips = []
    fewshot, finetune, other = {}, {}, {}
    for _tag, recs in sorted(run.eval_records().items()):
        for rec in recs.values():
            variant = rec.get("variant", "raw")
            name = rec["dataset"] if variant == "raw" else f"{rec['dataset']}/{variant}"  # digits, digits/ema
            if rec["protocol"] == "fewshot_linear":
                fewshot.setdefault(name, {})[rec["step"]] = {
                    int(k.removesuffix("shot")): v for k, v in rec["metrics"].items() if k.endswith("shot")
                }
            elif rec["protocol"] == "finetune":
                finetune.setdefault(name, {})[rec["step"]] = rec["metrics"]["top1"]
            else:  # any other evaluator: the metrics it puts on the parent run (knn/digits/top1 -> top1)
                other.setdefault(rec["protocol"], {}).setdefault(name, {})[rec["step"]] = {
                    k.rsplit("/", 1)[-1]: v for k, v in rec["parent_metrics"].items()
                }
    try:
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    except Exception:  # the server may be away
        experiment_id = None
    return {
        "run_id": tracker.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracker.uri,
        "run_dir": run.url,
        "shards_written": sum(
            s.get("shards", 0) if isinstance(s.get("shards"), int) else sum(s.get("shards", {}).values()) for s in prep
        ),
        "prep": prep,
        "final_step": final.get("step"),
        "final_loss": final.get("loss"),
        "total_steps": final.get("total_steps"),
        "images_per_s": sum(ips) / len(ips) if ips else None,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "fewshot": fewshot,
        "finetune": finetune,
        "evaluations": other,  # {protocol: {dataset: {step: {metric: value}}}} of every other evaluator
    }


def _print_summary(s: dict) -> None:
    print("\n==== pre-training summary ====")
    print(f"shards written      : {s['shards_written']}")
    loss = s["final_loss"]
    print(f"final step / loss   : {s['final_step']} / {loss if loss is None else f'{loss:.4f}'}")
    if s["images_per_s"]:
        print(f"images/s (mean)     : {s['images_per_s']:.1f}")
    for event in (s.get("guard") or {}).get("rollbacks", []):
        print(f"guard rollback      : {guard.describe(event)}")
    for where, note in (s.get("corrupt_checkpoints") or {}).items():
        print(f"corrupt checkpoint  : {note.get('tag')} set aside in {where} ({note.get('problem')})")
    print(f"training time       : {s['train_seconds']:.0f}s (job {s['total_seconds']:.0f}s)")
    for line in s.get("plan", []):
        print(line)
    for name, steps in s["fewshot"].items():
        for step, acc in sorted(steps.items(), key=lambda t: int(t[0])):
            label = "random init" if int(step) == 0 else f"step {step}"
            print(
                f"few-shot {name:<10} {label:>12}: "
                + "  ".join(f"{k}-shot {v:.3f}" for k, v in sorted(acc.items(), key=lambda t: int(t[0])))
            )
    for name, steps in s.get("finetune", {}).items():
        for step, top1 in steps.items():
            label = "random init" if int(step) == 0 else f"step {step}"
            print(f"fine-tune {name:<9} {label:>12}: top-1 {top1:.3f}")
    for protocol, datasets in s.get("evaluations", {}).items():
        for name, steps in datasets.items():
            for step, metrics in sorted(steps.items(), key=lambda t: int(t[0])):
                label = "random init" if int(step) == 0 else f"step {step}"
                print(
                    f"{protocol} {name:<10} {label:>12}: "
                    + "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
                )
    uri = s["tracking_uri"]
    page = (
        f"#/experiments/{s['experiment_id']}/runs/{s['run_id']}?workflowType=machine_learning"
        if s.get("experiment_id")
        else ""
    )
    if uri.startswith(("http://", "https://")):
        print(f"MLflow run {s['run_id']}: {uri.rstrip('/')}/{page}")
    else:
        print(f"MLflow run {s['run_id']}; open the UI with:\n  mlflow ui --backend-store-uri {uri}")
        if page:
            print(f"  then http://127.0.0.1:5000/{page}")
    left = s.get("undelivered") or {}
    if left.get("evaluations") or left.get("spool"):
        evals = left.get("evaluations", [])
        spooled = f" and spooled training writes in {left['spool']}" if left.get("spool") else ""
        print(
            f"\nNOT IN MLFLOW YET: the tracking server at {uri} did not take {len(evals)} evaluation(s) "
            f"{' '.join(evals)}{spooled}. Nothing is lost: evaluations are kept in {s['run_dir']}. Deliver everything "
            f"when the server is back with:\n  python -m pipeline.evaluate sync {s['run_dir']} --tracking-uri {uri}"
            + (f" --spool-dir {left['spool']}" if left.get("spool") else ""),
            file=sys.stderr,
            flush=True,
        )


# What a failed job's text says, the one sentence that ends the output, and the exit status.
_KNOWN = (
    ("DiskFull: ", "{}; rerun the same command to resume from the newest checkpoint", Exit.NO_SPACE),
    ("disk full: ", "{}; rerun the same command to resume from the newest checkpoint", Exit.NO_SPACE),
    ("NoRoom: ", "config error: {}", Exit.CONFIG),
    (
        "CorruptCheckpoint: ",
        "corrupt checkpoint: {} (train.on_corrupt_checkpoint=set_aside resumes from the newest one that verifies)",
        Exit.FAILED,
    ),
)


def known_failure(e: BaseException) -> tuple[str, Exit] | None:
    """``(sentence, exit status)`` for a failure of a kind we know (a full disk, no room, a
    corrupt checkpoint), found in the text of ``e`` (Ray wraps a worker's error in its own)."""
    text = "".join(traceback.format_exception(e))
    for marker, sentence, code in _KNOWN:
        lines = [line for line in text.splitlines() if marker in line]
        if lines:
            detail = lines[-1].split(marker, 1)[1].strip()
            return sentence.format(detail if marker != "disk full: " else "disk full: " + detail), code
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quiet" in argv:  # warnings, errors and the summary only, here and in every worker
        argv.remove("--quiet")
        os.environ["PIPELINE_QUIET"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
    dead_owner = None
    if "--dead-owner" in argv:  # the launcher saw this Ray job of our cluster end: its lease is not live
        at = argv.index("--dead-owner")
        dead_owner = argv[at + 1] if at + 1 < len(argv) else None
        del argv[at : at + 2]
    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s %(message)s")
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
        from pipeline.evaluate.runner import validate_eval

        validate_eval(cfg.eval)
        check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return Exit.CONFIG
    try:
        summary = run_job(cfg, dead_owner)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return Exit.CONFIG
    except LeaseHeld as e:
        print(refusal(cfg.name, cfg.run_dir, e.owner), file=sys.stderr, flush=True)
        return Exit.CONFIG
    except LeaseLost as e:
        print(
            f"lease lost: {e}; this job stopped without writing (no checkpoint, summary or MLflow status): "
            "the run goes on under its new owner",
            file=sys.stderr,
            flush=True,
        )
        return Exit.LOST
    except Exception as e:  # noqa: BLE001 - a reason we know ends the output, after Ray's tracebacks
        if (known := known_failure(e)) is None:
            raise
        traceback.print_exc()
        print(f"\n{known[0]}", file=sys.stderr, flush=True)
        return known[1]
    if (diverged := (summary.get("guard") or {}).get("diverged")) is not None:
        checkpoints = f"{summary['run_dir']}/{CHECKPOINTS}"
        print(f"\n{guard.diverged_message(diverged, checkpoints)}", file=sys.stderr, flush=True)
        return Exit.DIVERGED
    if summary.get("stopped"):
        return Exit.STOPPED
    left = summary.get("undelivered") or {}
    return Exit.UNDELIVERED if left.get("evaluations") or left.get("spool") else Exit.OK


if __name__ == "__main__":
    sys.exit(main())
