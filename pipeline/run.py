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
- the driver dies: rerun the same command (same ``name``/``output_dir``): training resumes from
  the latest checkpoint and ``<output_dir>/mlflow_run_id`` continues the same MLflow run;
- SIGTERM to this driver (preemption, ``scancel``, ``kill``): it writes ``<output_dir>/STOP``, the
  workers checkpoint at the next step boundary and exit, and the job exits with status
  ``EXIT_STOPPED`` (3) after printing how to resume (rerun the same command);
- ``ray.storage_path`` on object storage (s3://...): checkpoints are also uploaded there (marker
  last) and a worker whose local dir lacks the latest one downloads it (``pipeline.storage``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, check_paths, load_config, to_flat_dict, to_yaml

log = logging.getLogger("pipeline.run")

EXIT_STOPPED = 3  # stopped on request (SIGTERM) with a checkpoint saved: rerun the same command to resume


def _train_worker(config: dict) -> None:
    """Body of each Ray Train worker: the plain training loop on Ray's process group."""
    from pipeline.config import from_container
    from pipeline.train import train

    cfg = from_container(config)
    summary = train(cfg)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps(summary))


def connect_ray(cfg: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not cfg.ray.use_gpu else "cuda")}
    for var in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
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
        raise ConfigError(f"ray.address: cannot reach a Ray cluster at {address} ({e}); "
                          "start one (ray start --head) or fix ray.address / $RAY_ADDRESS") from None


def check_resources(cfg: DictConfig) -> None:
    """Fail before any worker starts when the cluster cannot hold the worker group."""
    import ray

    total = ray.cluster_resources()
    if cfg.ray.use_gpu and total.get("GPU", 0) < cfg.ray.num_workers:
        raise ConfigError(f"ray.num_workers: {cfg.ray.num_workers} GPU workers asked, the cluster has {total.get('GPU', 0):g} GPUs")
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if total.get("CPU", 0) < need:
        raise ConfigError(f"ray.cpus_per_worker: {need:g} CPUs asked for training, the cluster has {total.get('CPU', 0):g}")


def prepare_data(cfg: DictConfig) -> list[dict]:
    """Demo corpora, then every data_prep job whose index does not exist yet."""
    import fsspec

    from data_prep.job import run_prep

    out = Path(cfg.output_dir)
    if cfg.demo.enabled:
        from data_prep.demo import make_digits_corpus, make_glyph_corpus

        if not (out / "corpus" / "glyphs").exists():
            s = make_glyph_corpus(str(out / "corpus" / "glyphs"), num_classes=cfg.demo.classes, per_class=cfg.demo.per_class,
                                  size=cfg.demo.image_size, seed=cfg.demo.seed, multi_label_fraction=cfg.demo.multi_label_fraction)
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


def fit(cfg: DictConfig) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import storage as object_storage

    backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if cfg.ray.use_gpu else "gloo")
    storage = cfg.ray.storage_path or str((Path(cfg.output_dir) / "ray").resolve())
    storage_fs = None
    if object_storage.is_remote(storage):
        # Through fsspec (s3fs honours AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL), as our own uploads.
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, storage = fsspec.core.url_to_fs(storage)
        storage_fs = PyFileSystem(FSSpecHandler(fs))
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=OmegaConf.to_container(cfg, resolve=True),
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
        ),
        run_config=RunConfig(name=cfg.name, storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    trainer.fit()


def run_job(cfg: DictConfig) -> dict:
    from pipeline import checkpoint
    from pipeline.evaluate.watch import Watcher
    from pipeline.tracking import Tracker, log_final_weights, spool_dir

    t_start = time.time()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.update(cfg, "output_dir", str(out))
    connect_ray(cfg)
    check_resources(cfg)
    stop_file = _install_stop_handler(out)
    prep = prepare_data(cfg)

    run_id_file = out / "mlflow_run_id"
    resumed = run_id_file.exists() and not cfg.tracking.run_id
    tracker = Tracker.start(cfg, run_id=run_id_file.read_text().strip() if resumed else None)
    run_id_file.write_text(tracker.run_id)
    OmegaConf.update(cfg, "tracking.run_id", tracker.run_id)
    OmegaConf.update(cfg, "tracking.uri", tracker.uri)
    if not resumed:
        tracker.log_params(to_flat_dict(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
    (out / "config.yaml").write_text(to_yaml(cfg))

    watcher = None
    if cfg.eval.enabled and (cfg.eval.fewshot or cfg.eval.finetune):
        watcher = Watcher(cfg.eval, str(out / "checkpoints"), tracker.uri, tracker.run_id, spool_dir=spool_dir(cfg))
        watcher.start()
    status = "FAILED"
    try:
        t_train = time.time()
        fit(cfg)
        train_seconds = time.time() - t_train
        done = json.loads((out / "train_summary.json").read_text())
        stopped = stop_file.exists() and done["step"] < done["total_steps"]  # a graceful stop (SIGTERM) before the end
        status = "KILLED" if stopped else "FINISHED"
    finally:
        evals = watcher.finish() if watcher else {}
        if status == "FINISHED" and (last := checkpoint.latest_tag(out / "checkpoints")):
            log_final_weights(tracker, str(out / "checkpoints"), last, register_as=cfg.tracking.register_model)
        tracker.finish(status)
    train_summary = json.loads((out / "train_summary.json").read_text())
    summary = _summary(cfg, tracker, prep, train_summary, evals, train_seconds, time.time() - t_start)
    summary["stopped"] = stopped
    stop_file.unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    if summary["stopped"]:
        print(f"\nstopped on request at step {summary['final_step']} of {train_summary.get('total_steps', '?')}, "
              f"checkpoint saved in {out / 'checkpoints'}; to resume, rerun the same command "
              f"(same name and output_dir): {' '.join(sys.argv)}", flush=True)
    return summary


def _install_stop_handler(out: Path) -> Path:
    """SIGTERM to the driver becomes a graceful stop: ``<output_dir>/STOP``, which every training
    worker checks at each step boundary (``pipeline.train.stop_requested``). Replaces Ray's own
    driver handler (exit at once). A stale STOP file of an earlier run is removed first."""
    import signal

    from pipeline.train import STOP_FILE

    stop_file = out / STOP_FILE
    stop_file.unlink(missing_ok=True)

    def handler(signum, frame):
        if not stop_file.exists():
            stop_file.write_text(f"signal {signum} at {time.time():.0f}\n")
            print("SIGTERM: stopping at the next step boundary after a checkpoint (send SIGKILL to stop at once)",
                  file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handler)
    return stop_file


def _summary(cfg, tracker, prep, train_summary, evals, train_seconds, total_seconds) -> dict:
    ips = [m.value for m in tracker.metric_history("train/images_per_s")]
    by_step = sorted(evals.values(), key=lambda r: r["step"])
    fewshot, finetune = {}, {}
    for r in by_step:
        for name, res in r.get("fewshot", {}).items():
            fewshot.setdefault(name, {})[r["step"]] = {int(k): v["mean"] for k, v in res.items()}
        for name, res in r.get("finetune", {}).items():
            finetune.setdefault(name, {})[r["step"]] = res["top1"]
    return {
        "run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "shards_written": sum(s.get("shards", 0) if isinstance(s.get("shards"), int) else sum(s.get("shards", {}).values()) for s in prep),
        "prep": prep,
        "final_step": train_summary["step"],
        "final_loss": train_summary["loss"],
        "images_per_s": sum(ips) / len(ips) if ips else None,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "fewshot": fewshot,
        "finetune": finetune,
    }


def _print_summary(s: dict) -> None:
    print("\n==== pre-training summary ====")
    print(f"shards written      : {s['shards_written']}")
    print(f"final step / loss   : {s['final_step']} / {s['final_loss']:.4f}")
    if s["images_per_s"]:
        print(f"images/s (mean)     : {s['images_per_s']:.1f}")
    print(f"training time       : {s['train_seconds']:.0f}s (job {s['total_seconds']:.0f}s)")
    for name, steps in s["fewshot"].items():
        for step, acc in steps.items():
            label = "random init" if step == 0 else f"step {step}"
            print(f"few-shot {name:<10} {label:>12}: " + "  ".join(f"{k}-shot {v:.3f}" for k, v in sorted(acc.items())))
    for name, steps in s.get("finetune", {}).items():
        for step, top1 in steps.items():
            label = "random init" if step == 0 else f"step {step}"
            print(f"fine-tune {name:<9} {label:>12}: top-1 {top1:.3f}")
    uri = s["tracking_uri"]
    print(f"MLflow run {s['run_id']}; open the UI with:\n  mlflow ui --backend-store-uri {uri}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
        from pipeline.evaluate.runner import validate_eval

        validate_eval(cfg.eval)
        check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_job(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return EXIT_STOPPED if summary.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
