"""Transfer evaluation from the command line (console script ``vit-eval``).

    python -m pipeline.evaluate watch <run dir URL> [config.yaml] [key=value ...]
        [--run-id ID] [--tracking-uri URI] [--once] [--until-final] [--no-ray]
    python -m pipeline.evaluate checkpoint <run dir URL> <tag> [config.yaml] [key=value ...] [...]
    python -m pipeline.evaluate sync [run dir URL] [--spool-dir DIR]

A run dir URL is a local path or any fsspec URL (``pipeline.rundir``); its ``checkpoints``
dir is accepted too.

The eval config is the pre-training config saved with the checkpoints (its ``eval`` and
``tracking`` sections), then ``config.yaml`` (e.g. ``configs/eval/finetune_digits.yaml``),
then ``key=value`` overrides. The run logged to is ``--run-id``, else the config's
``tracking.run_id``, else ``mlflow_run_id`` of the checkpoint's meta.json; the server is
``--tracking-uri``, else $MLFLOW_TRACKING_URI, else the config's ``tracking.uri``, else
``mlflow_uri`` of meta.json.

``watch`` polls the run's checkpoints and evaluates each complete one once (what was
evaluated is the run dir's records, so a restarted watcher skips it); ``--once`` does one
pass, waits for it and exits; ``--until-final`` exits after the last pre-training step.
``sync`` shows in MLflow the evaluations the run dir holds and MLflow lacks, and delivers
MLflow writes left in a spool by processes that ended during an outage.
``pretrained [config.yaml] init=<file> [init_heads=N] [key=value ...]`` runs the config's
evaluations on published weights (vit_jax/big_vision ``.npz``, timm ``.safetensors``; see
``pipeline.weights``; ``init_heads`` for a timm file whose head count is not the paper
variant's) instead of a checkpoint and prints the results (nothing is logged to MLflow).
Exit status: 0 done, 1 an evaluation failed, 2 a bad config or argument.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.compose import ConfigError, as_config_error, compose
from pipeline.config import Config, LeaseConfig

log = logging.getLogger("pipeline.evaluate")


def _meta_and_config(url: str, tag: str) -> tuple[dict, DictConfig | None]:
    """A checkpoint's meta and saved config, read where it lives; a file that fails its
    manifest (or does not parse) is :class:`CorruptCheckpoint`, not a config error."""
    import hashlib

    import fsspec

    from pipeline.checkpoint import CONFIG_FILE, META_FILE, CorruptCheckpoint

    fs, root = fsspec.core.url_to_fs(url)
    base = f"{root.rstrip('/')}/{tag}"
    try:
        with fs.open(f"{base}/{META_FILE}", "r") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{url}/{tag}/{META_FILE}: not a readable checkpoint manifest ({e})") from None
    cfg = None
    if fs.exists(f"{base}/{CONFIG_FILE}"):
        data = fs.cat_file(f"{base}/{CONFIG_FILE}")
        entry = (meta.get("files") or {}).get(CONFIG_FILE) if isinstance(meta, dict) else None
        if entry is not None and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CorruptCheckpoint(
                f"{url}/{tag}/{CONFIG_FILE}: sha256 differs from the manifest's (the file is corrupt or was altered)"
            )
        try:
            cfg = OmegaConf.create(data.decode())
        except (OmegaConfBaseException, UnicodeDecodeError, ValueError) as e:
            raise CorruptCheckpoint(f"{url}/{tag}/{CONFIG_FILE}: not readable YAML ({type(e).__name__})") from None
    return meta, cfg


def resolve(url: str, tag: str | None, path: str | None, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The full config (checkpoint's, then file, then overrides) and the checkpoint's meta."""
    meta, saved = _meta_and_config(url, tag) if tag else ({}, None)
    cfg = compose(Config, path, overrides, base=saved)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise as_config_error(e) from None
    from pipeline.evaluate.runner import validate_eval

    validate_eval(cfg.eval)
    return cfg, meta


def _tracking(args, cfg: DictConfig, meta: dict) -> tuple[str | None, str | None]:
    from pipeline.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri, cfg.tracking.uri, meta.get("mlflow_uri"))
    run_id = args.run_id or cfg.tracking.run_id or meta.get("mlflow_run_id")
    return uri, run_id


def _connect_ray(cfg: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        k: os.environ[k]
        for k in (
            "DS_ACCELERATOR",
            "MLFLOW_TRACKING_URI",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
            "FSSPEC_S3_ENDPOINT_URL",
        )
        if k in os.environ
    }
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, runtime_env={"env_vars": env}, **({} if address else {"dashboard_host": "127.0.0.1"}))


def _run_of(url: str):
    """The run dir of a URL naming a run dir or its ``checkpoints`` dir."""
    from pipeline.rundir import RunDir

    return RunDir.of(url)


def cmd_watch(args) -> int:
    from pipeline.evaluate.watch import Watcher

    run = _run_of(args.ckpt_dir)
    tags = run.checkpoints.complete_tags()
    while not tags and not args.config:  # the config and run id come with the first checkpoint
        if args.once:
            print(f"no complete checkpoint in {run.checkpoints.url} and no config given", file=sys.stderr)
            return 2
        time.sleep(args.poll_seconds or 5.0)
        tags = run.checkpoints.complete_tags()
    cfg, meta = resolve(run.checkpoints.url, tags[0] if tags else None, args.config, args.overrides)
    uri, run_id = _tracking(args, cfg, meta)
    run_id = run_id or run.mlflow_run_id
    if not (uri and run_id):
        raise ConfigError("watch needs a tracking URI and a run id (--tracking-uri/--run-id, the config or meta.json)")
    if args.poll_seconds:
        cfg.eval.poll_seconds = args.poll_seconds
    use_ray = not args.no_ray
    if use_ray:
        _connect_ray(cfg)
    watcher = Watcher(cfg.eval, run, uri, run_id, use_ray=use_ray)
    log.info("watching %s for run %s at %s", run.checkpoints.url, run_id, uri)
    try:
        while True:
            watcher.poll()
            if args.once or (args.until_final and _final_evaluated(run, watcher)):
                break
            time.sleep(cfg.eval.poll_seconds)
    except KeyboardInterrupt:
        log.info("stopping; evaluations in flight are waited for")
    watcher.finish()
    for tag, err in watcher.failed.items():
        print(f"evaluation of {tag} failed: {err}", file=sys.stderr)
    if watcher.unshown:
        print(
            f"{len(watcher.unshown)} evaluation(s) not in MLflow yet (kept in {run.url}); deliver them with: "
            f"python -m pipeline.evaluate sync {run.url}",
            file=sys.stderr,
        )
    return 1 if watcher.failed or watcher.unshown else 0


def _final_evaluated(run, watcher) -> bool:
    """Whether the checkpoint of the last pre-training step is evaluated and nothing runs."""
    from pipeline.rundir import step_of

    tags = run.checkpoints.complete_tags()
    if not tags or tags[-1] not in watcher.done or watcher.pending:
        return False
    meta, _ = _meta_and_config(run.checkpoints.url, tags[-1])
    return bool(meta.get("total_steps")) and step_of(tags[-1]) >= meta["total_steps"]


def cmd_checkpoint(args) -> int:
    from pipeline.evaluate.watch import evaluate_tag

    run = _run_of(args.ckpt_dir)
    cfg, meta = resolve(run.checkpoints.url, args.tag, args.config, args.overrides)
    uri, run_id = _tracking(args, cfg, meta)
    result = evaluate_tag(cfg.eval, run.url, args.tag, uri, run_id or run.mlflow_run_id)
    print(json.dumps(_jsonable(result), indent=2))
    return 0


def cmd_sync(args) -> int:
    """Show in MLflow every evaluation the run dir holds and MLflow lacks; deliver spooled writes."""
    from pipeline.evaluate.record import publish_pending
    from pipeline.tracking import default_spool_dir, deliver_orphans

    ok = True
    if args.run_dir:
        run = _run_of(args.run_dir)
        saved = OmegaConf.create(run.read_text("config.yaml") or "{}")
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or OmegaConf.select(saved, "tracking.uri")
        run_id = args.run_id or run.mlflow_run_id
        if not (uri and run_id):
            raise ConfigError(f"sync: no MLflow run id or tracking URI for {run.url} (pass --run-id / --tracking-uri)")
        claims = OmegaConf.select(saved, "eval.claims") or LeaseConfig()  # the run's own; an older run has none
        left = publish_pending(run, uri, run_id, claims)
        state = (
            "every evaluation is in MLflow" if not left else f"{len(left)} evaluation(s) still not in MLflow at {uri}"
        )
        print(f"{run.url}: {state}")
        ok = not left
    directory = args.spool_dir or default_spool_dir()
    delivered = deliver_orphans(directory)
    print(f"{directory}: {'everything delivered' if delivered else 'some writes are still waiting for the server'}")
    return 0 if ok and delivered else 1


def cmd_pretrained(args) -> int:
    from pipeline.evaluate.runner import Weights, run_evaluators

    cfg, _ = resolve("", None, args.config, args.overrides)
    if not cfg.init:
        raise ConfigError("init: name the weights to evaluate, e.g. init=ViT-B_16.npz")
    results = run_evaluators(cfg.eval, Weights(init=cfg.init, heads=cfg.init_heads, compile=cfg.eval.compile))
    print(json.dumps(_jsonable({"init": cfg.init, **results}), indent=2))
    return 0


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "confusion"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("rest", nargs="*", help="[config.yaml] [key=value ...]")
        sp.add_argument("--run-id", help="the pre-training run to log to (default: from the config or meta.json)")
        sp.add_argument("--tracking-uri")
        sp.add_argument("--spool-dir", help="where writes wait while the server is away")

    w = sub.add_parser("watch", help="evaluate every complete checkpoint of a directory, once")
    w.add_argument("ckpt_dir")
    common(w)
    w.add_argument("--once", action="store_true", help="one pass, wait for it, exit")
    w.add_argument("--until-final", action="store_true", help="exit once the last pre-training step is evaluated")
    w.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of Ray tasks")
    w.add_argument("--poll-seconds", type=float, default=0.0)
    c = sub.add_parser("checkpoint", help="evaluate one checkpoint")
    c.add_argument("ckpt_dir")
    c.add_argument("tag")
    common(c)
    s = sub.add_parser("sync", help="show a run's evaluations MLflow lacks; deliver spooled writes of ended processes")
    s.add_argument("run_dir", nargs="?", help="a run dir URL (its records are shown in MLflow)")
    s.add_argument("--spool-dir")
    s.add_argument("--run-id")
    s.add_argument("--tracking-uri")
    x = sub.add_parser("pretrained", help="evaluate published weights (init=<file>) instead of a checkpoint")
    x.add_argument("rest", nargs="*", help="[config.yaml] init=<file> [key=value ...]")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = parser()
    args, extra = p.parse_known_args(argv)  # key=value may also follow the options
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    rest = getattr(args, "rest", []) + extra
    args.config = rest[0] if rest and "=" not in rest[0] else None
    args.overrides = rest[1:] if args.config else rest
    from pipeline.checkpoint import CorruptCheckpoint

    try:
        return {"watch": cmd_watch, "checkpoint": cmd_checkpoint, "sync": cmd_sync, "pretrained": cmd_pretrained}[
            args.command
        ](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CorruptCheckpoint as e:
        print(f"corrupt checkpoint: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
