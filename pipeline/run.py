"""The pre-training job: what ``launch/pretrain.sh`` and ``ray job submit`` run.

``python -m pipeline.run <experiment.yaml> key=value ...``

1. validates the config (nothing starts on a bad one);
2. connects to Ray ($RAY_ADDRESS or ``ray.address``; else starts a local instance);
3. makes the demo corpora and runs the configured data_prep jobs (skipping finished ones);
4. opens (or resumes) the MLflow pre-training run and logs the resolved config;
5. trains on a Ray Train ``TorchTrainer`` worker group, one DeepSpeed engine per worker,
   while a watcher evaluates every finished checkpoint as Ray tasks;
6. waits for the last evaluations and prints a summary and the command to open the UI.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, load_config, to_flat_dict, to_yaml

log = logging.getLogger("pipeline.run")


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
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + (cfg.eval.num_cpus if cfg.eval.enabled else 0)
        num_cpus = max(int(need + 0.999), os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env)


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

    backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if cfg.ray.use_gpu else "gloo")
    storage = cfg.ray.storage_path or str((Path(cfg.output_dir) / "ray").resolve())
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=OmegaConf.to_container(cfg, resolve=True),
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
        ),
        run_config=RunConfig(name=cfg.name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    trainer.fit()


def run_job(cfg: DictConfig) -> dict:
    from pipeline.evaluate.watch import Watcher
    from pipeline.tracking import Tracker

    t_start = time.time()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.update(cfg, "output_dir", str(out))
    connect_ray(cfg)
    check_resources(cfg)
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
    if cfg.eval.enabled and cfg.eval.fewshot:
        watcher = Watcher(cfg.eval, str(out / "checkpoints"), tracker.uri, tracker.run_id)
        watcher.start()
    status = "FAILED"
    try:
        t_train = time.time()
        fit(cfg)
        train_seconds = time.time() - t_train
        status = "FINISHED"
    finally:
        evals = watcher.finish() if watcher else {}
        tracker.finish(status)
    train_summary = json.loads((out / "train_summary.json").read_text())
    summary = _summary(cfg, tracker, prep, train_summary, evals, train_seconds, time.time() - t_start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _summary(cfg, tracker, prep, train_summary, evals, train_seconds, total_seconds) -> dict:
    ips = [m.value for m in tracker.metric_history("train/images_per_s")]
    by_step = sorted(evals.values(), key=lambda r: r["step"])
    fewshot = {}
    for r in by_step:
        for name, res in r["fewshot"].items():
            fewshot.setdefault(name, {})[r["step"]] = {int(k): v["mean"] for k, v in res.items()}
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
    uri = s["tracking_uri"]
    print(f"MLflow run {s['run_id']}; open the UI with:\n  mlflow ui --backend-store-uri {uri}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run_job(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
