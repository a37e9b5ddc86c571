"""Evaluate one finished checkpoint: every configured evaluator (few-shot linear probes,
fine-tuning) by name from the eval config, each result kept as a record in the run dir (the
fact that it was evaluated, readable with MLflow down) and shown in MLflow by
``pipeline.evaluate.record``. An evaluation with a record is not run again.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.compose import as_config_error
from pipeline import checkpoint
from pipeline.compile import CompileWatch, compile_blocks
from pipeline.config import ConfigError, LeaseConfig
from pipeline.evaluate.record import claimed, eval_name, publish, record_of
from pipeline.lease import owner_of
from pipeline.model import from_config
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)

# The evaluators, by name. An evaluator module has ``evaluate(spec, weights) -> Result`` and
# ``PROTOCOL`` (the records' protocol), optionally ``check(spec)`` (run before anything starts)
# and ``Config`` (a dataclass: the schema of its specs). The built-in ones have their own list
# in the ``eval`` config (``eval.fewshot``, ``eval.finetune``); any other is named by module path
# in an ``eval.extra`` entry and registered under the path's last part. Modules load on first
# use (fine-tuning pulls in DeepSpeed).
EVALUATORS = {"fewshot": "pipeline.evaluate.fewshot", "finetune": "pipeline.evaluate.finetune"}


def evaluator(name: str):
    """The evaluator module registered as ``name``."""
    if name not in EVALUATORS:
        raise ConfigError(f"eval.{name}: no such evaluator; known: {', '.join(EVALUATORS)}")
    return importlib.import_module(EVALUATORS[name])


def register(module: str, key: str = "eval.extra") -> str:
    """Register the evaluator module at the dotted path ``module`` under its last part
    (``tests.support.knn_probe`` -> ``knn_probe``: its records' and metrics' name); returns that name."""
    name = module.rsplit(".", 1)[-1]
    if EVALUATORS.setdefault(name, module) != module:
        raise ConfigError(f"{key}.evaluator: {module} would be named {name!r}, the name of {EVALUATORS[name]}")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module + ".").startswith(e.name + "."):  # the module itself, not one it imports
            del EVALUATORS[name]
            raise ConfigError(f"{key}.evaluator: no module {module} (on this process's Python path)") from None
        raise
    return name


def _extra(i: int, entry: DictConfig) -> tuple[str, DictConfig]:
    """(name, spec) of ``eval.extra.<i>``: the evaluator's module registered, the rest of the
    entry typed by the module's ``Config`` when it has one."""
    key = f"eval.extra.{i}"
    if not isinstance(entry, DictConfig) or not entry.get("evaluator") or not entry.get("name"):
        raise ConfigError(f"{key}: needs evaluator (a registered name or a module path) and name (the dataset's)")
    name = register(entry.evaluator, key) if "." in entry.evaluator else entry.evaluator
    spec = OmegaConf.masked_copy(entry, [k for k in entry if k != "evaluator"])
    schema = getattr(evaluator(name), "Config", None)
    if schema is not None:
        try:
            spec = OmegaConf.merge(OmegaConf.structured(schema), spec)
        except OmegaConfBaseException as e:
            err = as_config_error(e)
            raise ConfigError(f"{key}.{err}" if getattr(e, "key", None) else f"{key}: {err}") from None
    return name, spec


@dataclass
class Result:
    """What an evaluator returns; recording and plotting it is ``pipeline.evaluate.record``'s."""

    metrics: dict[str, float]  # the evaluation's own run
    params: dict
    step_metrics: dict[str, float]  # the pre-training run's, at the checkpoint's step
    confusion: np.ndarray
    title: str  # of the confusion-matrix plot
    curves: dict[str, list] = field(default_factory=dict)  # label -> [(step, value)]
    summary: dict = field(default_factory=dict)  # the evaluator's full result (printed by the CLI)


class Weights:
    """What is evaluated: a complete local checkpoint (``ckpt_dir``, ``tag``; ``variant`` ``raw``
    for its own weights, ``ema`` for their EMA) or published weights (``init``, see
    ``pipeline.weights``; ``heads`` where the file does not record them). The model is loaded
    once, on first use, for all the evaluators that share it; ``compile`` (``eval.compile``): its
    blocks compiled when enabled (``pipeline.compile``), for feature extraction, with the compile
    time and recompilations watched (``compile_metrics``; a storm is a warning)."""

    def __init__(
        self,
        ckpt_dir: str | None = None,
        tag: str | None = None,
        init: str | None = None,
        variant: str = "raw",
        heads: int | None = None,
        compile: DictConfig | None = None,
    ):
        self.ckpt_dir, self.tag, self.init, self.variant, self.heads = ckpt_dir, tag, init, variant, heads
        self.compile = compile
        self._loaded: tuple[torch.nn.Module, int] | None = None
        self._watch: CompileWatch | None = None

    @property
    def label(self) -> str:
        """How results name these weights: ``step_00000400``, ``step_00000400 (ema)``, a file name."""
        return (self.tag or Path(self.init or "").name) + ("" if self.variant == "raw" else f" ({self.variant})")

    def model(self) -> tuple[torch.nn.Module, int]:
        """The model in eval mode on this task's device (a GPU when given one), and its input resolution."""
        if self._loaded is None:
            if self.init:
                from pipeline.weights import load_pretrained

                model = load_pretrained(self.init, heads=self.heads)
                size = model.spec.img_size
            else:
                model, _, meta = load_model(self.ckpt_dir, self.tag, self.variant)
                size = meta["image_size"]
            if self.compile is not None and self.compile.enabled:
                c = self.compile
                compile_blocks(model, c.mode, c.backend, c.dynamic)
                self._watch = CompileWatch(c.max_recompiles, key="eval.compile")
            self._loaded = (model.eval().to("cuda" if torch.cuda.is_available() else "cpu"), size)
        return self._loaded

    def compile_metrics(self) -> dict[str, float]:
        """Seconds compiling, recompilations and graph breaks since the model was loaded; {} when
        its blocks are not compiled."""
        return self._watch.metrics() if self._watch is not None else {}

    def release(self) -> None:
        if self._watch is not None:
            m = self._watch.metrics()
            log.info(
                "eval.compile: %s: %.1f s compiling, %d recompilations%s",
                self.label,
                m["compile/seconds"],
                m["compile/recompiles"],
                "".join(f"; {c} (x{n})" for c, n in self._watch.reasons.most_common(3)),
            )
            self._watch.close()
            self._watch = None
        self._loaded = None


def load_model(ckpt_dir: str, tag: str, variant: str = "raw") -> tuple[torch.nn.Module, DictConfig, dict]:
    """The model of a complete checkpoint with consolidated fp32 weights (``variant`` ``ema``:
    its EMA weights), in eval mode."""
    cfg, meta = checkpoint.saved_config(Path(ckpt_dir) / tag)
    model = from_config(cfg.model, meta["num_classes"])
    model.load_state_dict(checkpoint.load_fp32_weights(ckpt_dir, tag, variant))
    return model.eval(), cfg, meta


def wanted(eval_cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(evaluator name, spec) of every evaluation each checkpoint gets: the built-in lists in
    registry order, then ``eval.extra``."""
    builtin = [(name, spec) for name in EVALUATORS for spec in eval_cfg.get(name, None) or []]
    return builtin + [_extra(i, entry) for i, entry in enumerate(eval_cfg.get("extra", None) or [])]


def evaluated(run: RunDir, eval_cfg: DictConfig) -> set[str]:
    """Tags of the checkpoints with a record of every configured evaluation of every weights
    variant they hold (the run's own records: readable with MLflow down)."""
    raw = {eval_name(n, spec.name) for n, spec in wanted(eval_cfg)}
    ema = {eval_name(n, spec.name, "ema") for n, spec in wanted(eval_cfg)}
    return {
        tag
        for tag, recs in run.eval_records().items()
        if raw <= set(recs) and (ema <= set(recs) or not _has_ema(run, tag))
    }


def left_to_others(run: RunDir, eval_cfg: DictConfig, tag: str) -> bool:
    """Whether every evaluation of ``tag`` that has no record is claimed by another live
    evaluator (read only: a watcher then neither submits nor fetches the checkpoint)."""
    variants = ("raw", "ema") if _has_ema(run, tag) else ("raw",)
    todo = {eval_name(n, spec.name, v) for n, spec in wanted(eval_cfg) for v in variants} - set(
        run.eval_records().get(tag, {})
    )
    return all((owner := owner_of(run.claim_url(tag, name))) is not None and not owner.free() for name in todo)


_HAS_EMA: dict[tuple[str, str], bool] = {}  # a complete checkpoint's files never change: ask storage once


def _has_ema(run: RunDir, tag: str) -> bool:
    key = (run.checkpoints.url, tag)
    if key not in _HAS_EMA:
        _HAS_EMA[key] = run.checkpoints.fs.exists(f"{run.checkpoints.root}/{tag}/{checkpoint.EMA_FILE}")
    return _HAS_EMA[key]


def validate_eval(eval_cfg: DictConfig) -> None:
    """Checks of the eval section that types cannot express (run before anything starts)."""
    names = [(n, spec.name) for n, spec in wanted(eval_cfg)]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval: dataset names repeat within a protocol: {names}")
    for n, spec in wanted(eval_cfg):
        check = getattr(evaluator(n), "check", None)
        if check is not None:
            check(spec)


def run_evaluators(eval_cfg: DictConfig, weights: Weights, skip: set[str] = frozenset(), keep=None) -> dict:
    """Every configured evaluation of ``weights`` whose name is not in ``skip``; ``keep(name,
    spec, result)`` is called after each. Returns ``{evaluator name: {dataset: summary}}``."""
    evaluations = wanted(eval_cfg)
    out: dict = {n: {} for n in EVALUATORS}
    try:
        for n, spec in evaluations:
            if eval_name(n, spec.name, weights.variant) in skip:
                continue
            before = weights.compile_metrics()
            result = evaluator(n).evaluate(spec, weights)
            # the compile cost of this evaluation (the first one also compiles the blocks)
            result.metrics.update({k: v - before.get(k, 0.0) for k, v in weights.compile_metrics().items()})
            out[n][spec.name] = result.summary
            if keep is not None:
                keep(n, spec, result)
    finally:
        weights.release()
    return out


def evaluate_checkpoint(
    eval_cfg: DictConfig,
    ckpt_dir: str,
    tag: str,
    run: RunDir,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    source: str | None = None,
) -> dict:
    """Run every configured evaluation of one (local) checkpoint not yet recorded in ``run``,
    for each weights variant it holds (``raw``; ``ema`` when trained with an EMA); record each
    in the run dir, then show it in MLflow when tracking.

    Each evaluation is claimed first (``pipeline.evaluate.record.claimed``): one that another
    live evaluator holds is left to it. ``source`` names the checkpoint dir in the records when
    ``ckpt_dir`` is a local copy.
    Results are ``{"fewshot": {dataset: ...}, "finetune": {...}, <other evaluator>: {...}}`` for
    the raw weights, and the same under ``"ema"`` for the EMA weights.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    step = checkpoint.step_of(tag)
    where = f"{(source or str(ckpt_dir)).rstrip('/')}/{tag}"
    recorded = set(run.eval_records().get(tag, {}))
    variants = checkpoint.variants(Path(ckpt_dir) / tag)

    def keep(variant: str):
        def keep(n: str, spec: DictConfig, result: Result) -> None:
            record = record_of(
                evaluator(n).PROTOCOL,
                spec.name,
                tag,
                step,
                where,
                result.params,
                result.metrics,
                result.step_metrics,
                result.confusion,
                result.title,
                curves=result.curves,
                config_yaml=OmegaConf.to_yaml(spec, resolve=True),
                variant=variant,
            )
            name = eval_name(n, spec.name, variant)
            run.write_eval_record(tag, name, record)
            if tracking_uri and parent_run_id:
                publish(run, tracking_uri, parent_run_id, tag, name, run.eval_record(tag, name))

        return keep

    names = {eval_name(n, spec.name, v) for n, spec in wanted(eval_cfg) for v in variants}
    results: dict = {"step": step, "tag": tag}
    claims = eval_cfg.get("claims", None) or LeaseConfig()  # an eval section written by hand may lack it
    with claimed(run, tag, sorted(names - recorded), claims) as mine:
        recorded = set(run.eval_records().get(tag, {}))  # records written before the claims were ours
        for variant in variants:  # the checkpoint's own weights, then its EMA's (their results under "ema")
            weights = Weights(ckpt_dir, tag, variant=variant, compile=eval_cfg.get("compile", None))
            out = run_evaluators(eval_cfg, weights, skip=names - (mine - recorded), keep=keep(variant))
            if variant == "raw":
                results.update(out)
            else:
                results[variant] = out
    results["skipped"] = sorted(recorded & names)
    results["elsewhere"] = sorted(names - recorded - mine)  # claimed by another evaluator
    return results
