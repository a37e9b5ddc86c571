"""The one typed configuration of a pre-training run, its loading and its validation.

An experiment is an OmegaConf YAML file. Its optional ``include:`` list names other YAML
files (relative to the including file, then to ``configs/``) that are merged first, in
order; the experiment's own keys come next, then ``key=value`` overrides from the command
line. Everything is merged onto the structured :class:`Config`, so an unknown key or a
value of the wrong type fails at once, naming the key, before any worker starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.compose import (
    CONFIGS_DIR,
    Choice,
    ConfigError,
    as_config_error,
    compose,
    read_yaml,
    require,
)
from data_prep.config import PrepConfig

__all__ = ["CONFIGS_DIR", "Config", "ConfigError", "load_config", "read_yaml", "validate", "check_paths"]


class Pool(Choice):
    token = "token"  # the class token (the paper's)
    gap = "gap"  # global average pooling of the patch tokens


class Loss(Choice):
    sigmoid = "sigmoid"
    softmax = "softmax"


class Precision(Choice):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Fault(Choice):
    none = "none"
    nan = "nan"
    spike = "spike"


class OnCorrupt(Choice):
    set_aside = "set_aside"  # move the tag to checkpoints/_corrupt and resume from the newest that verifies
    refuse = "refuse"  # stop with the file named, for a person to look


class Schedule(Choice):
    linear = "linear"
    cosine = "cosine"


class Backend(Choice):
    auto = "auto"  # nccl on GPU, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class Order(Choice):
    readers = "readers"  # each (rank, loader worker) reads its own stream: the order follows the world size
    canonical = "canonical"  # canonical streams: the samples of step s depend on (seed, s) alone (elastic runs)


class Interpolation(Choice):
    bilinear = "bilinear"  # vit_jax's scipy zoom, order 1
    bicubic = "bicubic"  # timm's


@dataclass
class ModelConfig:
    name: str = "vit_b16"
    num_classes: int = 0  # 0: take it from the training index
    img_size: int | None = None  # None: the variant's own
    patch_size: int | None = None
    pool: Pool = Pool.token
    representation_size: int | None = None  # the paper's pre-logits layer
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last block, rising linearly from 0 over depth (AugReg: 0 or 0.1)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    train: str = "???"  # URL of a {split}_index.json written by data_prep
    micro_batch_size: int = 64  # per rank and step
    num_workers: int = 2  # dataloader processes per rank
    shuffle_block: int = 4096  # encoded samples shuffled together (resumable block shuffle)
    crop_min_area: float = 0.05  # inception crop
    crop_max_area: float = 1.0
    flip: bool = True
    prefetch_factor: int = 2
    order: Order = Order.readers  # canonical: the same samples at every step whatever the world size or workers
    streams: int = 0  # canonical streams (order=canonical); 0: global batch / (micro / gcd(micro, 8))


@dataclass
class AugConfig:
    """AugReg's augmentations (Steiner et al. 2021); the presets are ``configs/aug/<preset>.yaml``.

    ``preset`` names the preset the values come from (``custom``: set by hand); a preset's
    values may not be overridden without naming ``custom``, so a run's label never lies.
    """

    preset: str = "none"
    randaug_layers: int = 0  # RandAugment N; 0 off
    randaug_magnitude: float = 0.0  # RandAugment M on the 0-10 scale (big_vision goes to 20)
    mixup_alpha: float = 0.0  # mixup p ~ Beta(a, a) per micro-batch; 0 off


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.03  # decoupled; weight matrices only
    grad_clip: float = 1.0  # global norm; 0 disables
    warmup_steps: int = 10_000
    schedule: Schedule = Schedule.linear
    end_lr: float = 1e-5


@dataclass
class EmaConfig:
    """Polyak/EMA of the weights (pipeline.ema); checkpointed and evaluated as the ``ema`` variant."""

    decay: float = 0.0  # 0: off; AugReg/big_vision 0.9999
    every: int = 1  # update after every n-th optimizer step
    warmup: bool = False  # decay min(d, (1 + n) / (10 + n)) at the n-th update


@dataclass
class GuardFaultConfig:
    """TESTS ONLY, never for a real run: rank 0's loss of its micro-batches ``start`` to ``end - 1``
    (their index in its data stream, from 1) made non-finite (``nan``) or ``scale`` times larger
    (``spike``), to try the guard on a real engine."""

    kind: Fault = Fault.none
    start: int = 0
    end: int = 0
    scale: float = 10.0
    exit_after_rollback: bool = False  # every rank exits (status 1) right after a rollback is recorded


@dataclass
class GuardConfig:
    """The divergence guard (pipeline.guard): unhealthy steps skipped, trouble rolled back."""

    enabled: bool = True
    spike_factor: float = 2.0  # a loss above this multiple of the running median is a spike
    spike_window: int = 50  # the running median's healthy steps
    max_bad: int = 3  # unhealthy steps within bad_window steps that roll the run back
    bad_window: int = 20  # also: no checkpoint while an unhealthy step is this recent
    rollback_on_nonfinite: bool = False  # roll back on the first non-finite loss
    skip_extra_steps: int = 0  # a rollback skips the data since its checkpoint and this many steps more
    max_rollbacks: int = 3  # the next trouble stops the run (exit status 5)
    fault: GuardFaultConfig = field(default_factory=GuardFaultConfig)


# train.compile / eval.compile (pipeline.compile): torch.compile's modes and backends
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("max-autotune",)  # CUDA graphs: static parameter addresses, which ZeRO-3 does not keep
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # the last two: debugging a graph without inductor's code


@dataclass
class CompileConfig:
    """Regional compilation (pipeline.compile): torch.compile on each transformer block."""

    enabled: bool = False  # off until a GPU measurement says it pays (docs/compile.md)
    mode: str = "default"  # default | max-autotune | max-autotune-no-cudagraphs (torch.compile's mode)
    backend: str = "inductor"  # inductor; aot_eager / eager to debug a graph
    dynamic: bool | None = None  # None: automatic (a second shape recompiles once, symbolic); false: static
    max_recompiles: int = 4  # more recompilations than this in a process is a storm: a warning naming the cause


@dataclass
class TrainConfig:
    global_batch_size: int = 4096
    steps: int = 0  # total optimizer steps; 0: derive from epochs
    epochs: float = 0.0
    # sigmoid (multi-hot) | softmax. Sigmoid with head bias -10 is big_vision's i21k/JFT recipe
    # (configs/vit_i21k.py), not stated in the paper.
    loss: Loss = Loss.sigmoid
    label_smoothing: float = 0.0  # mix targets with uniform e/K (the paper tunes it for ImageNet-1k from scratch)
    precision: Precision = Precision.bf16
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoint_at_start: bool = True  # step 0: the random-init baseline for every eval
    keep_checkpoints: int = 0  # 0 keeps all
    peak_tflops: float = 0.0  # per device, for MFU; 0: look it up for known GPUs
    log_sample_keys: bool = False  # write each step's sample keys (resume checks)
    stop_at_step: int = 0  # checkpoint and stop here (time-boxed allocations); 0: run to the end
    resume_from: str | None = None  # a checkpoint tag dir to start from when the run dir has none of its own
    on_corrupt_checkpoint: OnCorrupt = OnCorrupt.set_aside  # a tag to resume from whose files fail its manifest
    ema: EmaConfig = field(default_factory=EmaConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2
    fp16_min_loss_scale: float = 1.0
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    extra: dict[str, Any] = field(default_factory=dict)  # merged raw into the DS JSON


@dataclass
class FewShotConfig:
    name: str = "digits"
    train: str = "???"  # index URL of the pool k-shot sets are drawn from
    test: str = "???"  # index URL of the held-out split
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    seeds: int = 3
    l2: float = 1024.0
    batch_size: int = 256
    crop_ratio: float = 0.875  # resize to res/ratio, centre crop res (256 -> 224)


@dataclass
class FineTuneConfig:
    """Fine-tuning transfer (paper B.1.1): SGD momentum, no weight decay, cosine, clip 1.

    One run per lr in ``lrs`` on the train split less a dev part; the lr with the best dev
    top-1 wins, then (``final_on_full_train``) one more run on the whole train split at that
    lr gives the test top-1, as the paper reports it.
    """

    name: str = "digits"
    train: str = "???"  # index URL of the train split (the dev part is carved from it)
    test: str = "???"  # index URL of the split top-1 is reported on
    num_classes: int = 0  # 0: from the train index
    image_size: int = 384  # position embeddings are interpolated to this grid
    steps: int = 500
    warmup_steps: int = 500
    batch_size: int = 512
    micro_batch_size: int = 0  # per step of the engine; 0: batch_size (no accumulation)
    lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03])  # paper Table 4; ImageNet: 0.003-0.06
    momentum: float = 0.9
    grad_clip: float = 1.0
    dev_fraction: float = 0.1  # paper: 10% Pets/Flowers, 2% CIFAR, 1% ImageNet
    final_on_full_train: bool = True
    precision: Precision = Precision.bf16  # bf16 | fp32
    zero_stage: int = 0
    crop_min_area: float = 0.05  # inception crop of the training images
    flip: bool = True
    crop_ratio: float = 1.0  # eval: resize the shorter side to image_size / ratio, centre crop
    eval_batch_size: int = 256
    dropout: float = 0.0  # vit_jax fine-tunes L/16 and H/14 with 0.1 (its model configs' dropout_rate)
    pos_embed_interpolation: Interpolation = Interpolation.bilinear
    shuffle_buffer: int = 10_000  # encoded samples shuffled together (pre-training's block shuffle)
    num_workers: int = 2  # decoding processes
    seed: int = 0
    ema_decay: float = 0.0  # 0: off; else the fine-tuned weights' EMA is evaluated too (top1_ema)


@dataclass
class LeaseConfig:
    """A holder's lease (pipeline.lease): the run's owner (``lease``), each evaluation's claim (``eval.claims``)."""

    heartbeat_s: float = 10.0  # renewed this often (one conditional write)
    expiry_s: float = 60.0  # a heartbeat older than this is taken over by the next launch (or claimer)


@dataclass
class EvalConfig:
    enabled: bool = True
    fewshot: list[FewShotConfig] = field(default_factory=list)
    finetune: list[FineTuneConfig] = field(default_factory=list)
    # Any other evaluator, by module path: {evaluator: my.module, name: <dataset>, <its keys>}
    # (pipeline.evaluate.runner); `train`/`test`, when given, are paths checked at start.
    extra: list[Any] = field(default_factory=list)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    poll_seconds: float = 2.0
    claims: LeaseConfig = field(default_factory=LeaseConfig)  # one evaluator per (checkpoint, evaluation) at a time
    compile: CompileConfig = field(default_factory=CompileConfig)  # of feature extraction (the frozen model)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under output_dir
    experiment: str = "vit-pretrain"
    run_name: str | None = None
    run_id: str | None = None  # set by the driver; resumes that run
    system_metrics: bool = True
    spool_dir: str | None = None  # writes the server did not take; None: <output_dir>/mlflow_spool
    http_timeout_s: int = 5  # per request, so a dead server costs seconds
    http_max_retries: int = 1
    flush_timeout_s: float = 120.0  # how long finishing a run waits for the spool to drain
    register_model: str | None = None  # register the final weights under this name
    # The final model also as MLflow's pytorch flavor (torch.export; ~15 s of CPU at the end of a run)
    pytorch_flavor: bool = True


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else a local instance
    num_workers: int = 2
    # Elastic (Ray Train's (min, max) group): None keeps the group at num_workers; else it runs on
    # min_workers..num_workers, shrinks when hosts are lost and grows back when they return.
    min_workers: int | None = None
    grow_wait_s: float = 30.0  # how long rank 0 waits at a checkpoint for a group with room to grow (pipeline.elastic)
    # How often Ray Train's controller polls its workers ($RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
    # it learns of the end of training, a lost worker or room to grow only at a poll, and the
    # end takes a few polls. None: Ray's (2 s, or the variable when set); a small group can poll
    # often, a group of hundreds of workers should keep Ray's.
    poll_interval_s: float | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    storage_path: str | None = None  # None: <output_dir>/ray
    backend: Backend = Backend.auto


@dataclass
class DemoConfig:
    """Make the demo corpora on the spot (procedural glyphs, scikit-learn's digits)."""

    enabled: bool = False
    classes: int = 100
    per_class: int = 128
    image_size: int = 32
    multi_label_fraction: float = 0.0
    seed: int = 0


@dataclass
class PlanConfig:
    """The target hardware and corpus facts of ``python -m pipeline.plan``; training ignores them."""

    # a GPU (H100, H200, A100, L40S, ...), cpu (this host) or any name with memory_gib/peak_tflops;
    # auto: H100 with ray.use_gpu, else cpu
    device: str = "auto"
    memory_gib: float = 0.0  # per device; 0: the device's
    peak_tflops: float = 0.0  # dense bf16 per device; 0: train.peak_tflops, else the device's
    mfu: float = 0.0  # 0: the measured one for the device (bench/train_plan_calibration.json), else an assumed 0.4
    nodes: int = 0  # 0: from --sbatch-args, else ray.num_workers / gpus_per_node
    gpus_per_node: int = 8
    cpu_cores_per_node: int = 0  # 0: 14 per GPU (a DGX H100); cpu: this host's
    memory_fraction: float = 0.9  # of device memory the run may plan for (CUDA context, fragmentation)
    storage_gbps: float = 1.0  # GB/s to the run dir, for checkpoint uploads
    network_gbps: float = 50.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand a GPU, as a DGX H100)
    nvlink_gbps: float = 450.0  # GB/s per GPU within a node (H100 NVLink 4)
    num_samples: int = 0  # training corpus size, for train.epochs; 0: the index when it is a local file
    num_classes: int = 0  # when model.num_classes is 0 and the index cannot be read
    eval_images: int = 0  # images the evaluations of one checkpoint read (pools and test splits)
    decode_rate: float = 0.0  # images per host core-second; 0: measured (bench/train_plan_calibration.json)


@dataclass
class Config:
    name: str = "vit"
    output_dir: str = "runs/${name}"  # this host's scratch dir (a local path on every host)
    run_dir: str = ""  # the run's records (pipeline.rundir); "": <ray.storage_path>/<name>, else output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)  # one driver owns the run dir at a time
    demo: DemoConfig = field(default_factory=DemoConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    prep: list[PrepConfig] = field(default_factory=list)  # data_prep jobs run before training
    # Published weights (vit_jax/big_vision .npz, timm .safetensors) that `python -m
    # pipeline.evaluate pretrained` evaluates in place of a checkpoint; pre-training ignores it.
    init: str | None = None
    init_heads: int | None = None  # attention heads of `init` where the file does not record them (timm's)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Compose (``data_prep.compose``), override and validate a config; raises
    :class:`ConfigError` naming the key."""
    cfg = compose(Config, path, overrides or [])
    try:
        # Workers run elsewhere (Ray's session dir): every path derived from output_dir is absolute.
        require(
            "://" not in cfg.output_dir,
            "output_dir",
            f"{cfg.output_dir!r} is a URL; output_dir is each host's local scratch dir. Put the run on object "
            "storage with ray.storage_path=<url> (checkpoints, records and demo shards then live in <url>/<name>)",
        )
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
        if cfg.ray.storage_path and "://" not in cfg.ray.storage_path:
            cfg.ray.storage_path = str(Path(cfg.ray.storage_path).expanduser().resolve())
        if not cfg.run_dir:
            from pipeline.rundir import run_dir_url

            cfg.run_dir = run_dir_url(cfg.output_dir, cfg.ray.storage_path, cfg.name)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise as_config_error(e) from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each failure names its key."""
    from pipeline.variants import VARIANTS

    require(
        cfg.model.name in VARIANTS,
        "model.name",
        f"unknown model {cfg.model.name!r}; known: {', '.join(sorted(VARIANTS))}",
    )
    require(0.0 <= cfg.model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    require(
        0.0 <= cfg.train.label_smoothing < 1.0,
        "train.label_smoothing",
        f"must be in [0, 1), got {cfg.train.label_smoothing}",
    )
    require(
        cfg.deepspeed.zero_stage in (0, 1, 2, 3),
        "deepspeed.zero_stage",
        f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}",
    )
    require(
        not cfg.deepspeed.offload_param or cfg.deepspeed.zero_stage == 3,
        "deepspeed.offload_param",
        "parameter offload needs zero_stage 3",
    )
    require(
        not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1,
        "deepspeed.offload_optimizer",
        "optimizer offload needs zero_stage >= 1",
    )
    require(cfg.optim.lr > 0, "optim.lr", f"must be positive, got {cfg.optim.lr}")
    require(
        len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {list(cfg.optim.betas)}",
    )
    require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(cfg.train.steps > 0 or cfg.train.epochs > 0, "train.steps", "set train.steps or train.epochs")
    require(cfg.train.log_every > 0, "train.log_every", "must be positive")
    require(cfg.train.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    require(
        0 < cfg.data.crop_min_area <= cfg.data.crop_max_area <= 1,
        "data.crop_min_area",
        "need 0 < crop_min_area <= crop_max_area <= 1",
    )
    require(cfg.data.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(cfg.ray.num_workers > 0, "ray.num_workers", "must be positive")
    require(
        cfg.ray.poll_interval_s is None or cfg.ray.poll_interval_s > 0,
        "ray.poll_interval_s",
        f"must be positive (or null: Ray's), got {cfg.ray.poll_interval_s}",
    )
    batch_split(cfg, cfg.ray.num_workers)
    _validate_elastic(cfg)
    sizes = range(cfg.ray.num_workers if cfg.ray.min_workers is None else cfg.ray.min_workers, cfg.ray.num_workers + 1)
    for world in sizes:
        data_streams(cfg, world)
    for key, lease in (("lease", cfg.lease), ("eval.claims", cfg.eval.claims)):
        require(lease.heartbeat_s > 0, f"{key}.heartbeat_s", f"must be positive, got {lease.heartbeat_s}")
        require(
            lease.expiry_s >= 2 * lease.heartbeat_s,
            f"{key}.expiry_s",
            f"must be at least two heartbeats ({2 * lease.heartbeat_s:g}s), got {lease.expiry_s}",
        )
    _validate_augreg(cfg)
    _validate_guard(cfg)
    _validate_compile(cfg)
    for i, fs in enumerate(cfg.eval.fewshot):
        require(all(k > 0 for k in fs.shots), f"eval.fewshot.{i}.shots", "shot counts must be positive")
        require(fs.seeds > 0, f"eval.fewshot.{i}.seeds", "must be positive")


def _validate_guard(cfg: DictConfig) -> None:
    g = cfg.train.guard
    if not g.enabled:
        return
    require(g.spike_factor > 1, "train.guard.spike_factor", f"must be > 1, got {g.spike_factor}")
    for key in ("spike_window", "max_bad", "bad_window"):
        require(g[key] > 0, f"train.guard.{key}", f"must be positive, got {g[key]}")
    require(
        g.max_bad <= g.bad_window,
        "train.guard.max_bad",
        f"{g.max_bad} unhealthy steps cannot fit in bad_window {g.bad_window}",
    )
    require(g.skip_extra_steps >= 0, "train.guard.skip_extra_steps", f"must be >= 0, got {g.skip_extra_steps}")
    require(g.max_rollbacks >= 0, "train.guard.max_rollbacks", f"must be >= 0, got {g.max_rollbacks}")
    require(
        g.fault.kind == "none" or 0 < g.fault.start < g.fault.end,
        "train.guard.fault.start",
        f"a fault needs 0 < start < end, got {g.fault.start}, {g.fault.end}",
    )
    require(
        cfg.deepspeed.zero_stage > 0 or cfg.train.precision != "fp32",
        "train.guard.enabled",
        "DeepSpeed cannot skip an update in fp32 without ZeRO; use deepspeed.zero_stage >= 1, bf16, or "
        "train.guard.enabled=false",
    )


def _validate_compile(cfg: DictConfig) -> None:
    """Compilation settings, and the combinations that cannot work, refused before anything starts."""
    for key in ("train.compile", "eval.compile"):
        c = OmegaConf.select(cfg, key)
        modes, backends = ", ".join(COMPILE_MODES), ", ".join(COMPILE_BACKENDS)
        require(c.mode in COMPILE_MODES, f"{key}.mode", f"must be one of {modes}, got {c.mode!r}")
        require(c.backend in COMPILE_BACKENDS, f"{key}.backend", f"must be one of {backends}, got {c.backend!r}")
        require(c.max_recompiles >= 0, f"{key}.max_recompiles", f"must be >= 0, got {c.max_recompiles}")
    c = cfg.train.compile
    require(
        not (c.enabled and c.mode in CUDAGRAPH_MODES and cfg.deepspeed.zero_stage == 3),
        "train.compile.mode",
        f"{c.mode!r} records CUDA graphs, which need parameters at fixed addresses; deepspeed.zero_stage=3 gathers "
        "and frees them every step: use train.compile.mode=max-autotune-no-cudagraphs (or default)",
    )


AUG_PRESETS_DIR = CONFIGS_DIR / "aug"
AUG_KEYS = ("randaug_layers", "randaug_magnitude", "mixup_alpha")


def aug_presets() -> dict[str, dict]:
    """preset name -> its ``aug`` values, from ``configs/aug/*.yaml``."""
    files = {p.stem: OmegaConf.load(p) for p in sorted(AUG_PRESETS_DIR.glob("*.yaml"))}
    return {name: dict(node.aug) for name, node in files.items() if "aug" in node}


def _validate_augreg(cfg: DictConfig) -> None:
    a = cfg.aug
    require(a.randaug_layers >= 0, "aug.randaug_layers", f"must be >= 0, got {a.randaug_layers}")
    require(0 <= a.randaug_magnitude <= 30, "aug.randaug_magnitude", f"must be in [0, 30], got {a.randaug_magnitude}")
    require(a.mixup_alpha >= 0, "aug.mixup_alpha", f"must be >= 0, got {a.mixup_alpha}")
    require(0.0 <= cfg.model.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {cfg.model.drop_path}")
    e = cfg.train.ema
    require(0.0 <= e.decay < 1.0, "train.ema.decay", f"must be in [0, 1) (0 turns EMA off), got {e.decay}")
    require(e.every > 0, "train.ema.every", f"must be positive, got {e.every}")
    for i, ft in enumerate(cfg.eval.finetune):
        require(0.0 <= ft.ema_decay < 1.0, f"eval.finetune.{i}.ema_decay", f"must be in [0, 1), got {ft.ema_decay}")
    if a.preset == "custom":
        return
    presets = aug_presets()
    require(
        a.preset in presets, "aug.preset", f"unknown preset {a.preset!r}; known: {', '.join(sorted(presets))}, custom"
    )
    differ = [k for k in AUG_KEYS if float(a[k]) != float(presets[a.preset].get(k, 0))]
    require(
        not differ,
        f"aug.{differ[0] if differ else ''}",
        f"{a[differ[0]] if differ else ''} differs from preset {a.preset!r} ({presets[a.preset]}); set "
        "aug.preset=custom "
        "to run other values",
    )


# What ``demo.enabled`` draws under output_dir before the prep jobs run (pipeline.run.prepare_data).
DEMO_CORPORA = ("corpus/glyphs", "corpus/digits")


def check_paths(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every key whose path must exist and does not: the
    training and evaluation indexes, ``train.resume_from``, and the sources and class files of
    the ``prep`` jobs that still have to run. Paths that this run makes first are not checked:
    what a ``prep`` job writes (an index must be one of its splits) and, with
    ``demo.enabled``, the demo corpora. Existence is asked of fsspec, so URLs (s3://...) work;
    a store that cannot be asked is an error naming the key too. Run it before anything
    starts; it does I/O, so :func:`load_config` does not."""
    problems = []
    for key, url in _required_paths(cfg):
        problem = _path_problem(cfg, url)
        if problem:
            problems.append(f"{key}: {url} {problem}")
    if problems:
        raise ConfigError("\n".join(problems))


def _required_paths(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, path) of every path the run reads; an unset mandatory one is an error now."""
    keys = ["data.train"] + (["train.resume_from"] if cfg.train.resume_from else [])
    if cfg.eval.enabled:
        keys += [
            f"eval.{kind}.{i}.{split}"
            for kind, specs in cfg.eval.items()
            if isinstance(specs, ListConfig)
            for i, spec in enumerate(specs)
            for split in ("train", "test")
            if split in spec.keys()
        ]
    for i, job in enumerate(cfg.prep):
        if not _exists(f"{job.output.rstrip('/')}/{job.train_split}_index.json"):  # else skipped
            keys += [f"prep.{i}.source"] + ([f"prep.{i}.classes_file"] if job.classes_file else [])
    paths = []
    for key in keys:
        try:
            paths.append((key, str(OmegaConf.select(cfg, key, throw_on_missing=True))))
        except OmegaConfBaseException:
            raise ConfigError(f"{key}: must be set (a path)") from None
    return paths


def _path_problem(cfg: DictConfig, url: str) -> str | None:
    """Why ``url`` will not be there when the run reads it, or None."""
    target = _normal(url)
    if cfg.demo.enabled and any(_under(target, _normal(f"{cfg.output_dir}/{d}")) for d in DEMO_CORPORA):
        return None
    for j, job in enumerate(cfg.prep):
        out = _normal(job.output)
        if not _under(target, out):
            continue
        splits = [job.train_split] + ([job.holdout.name] if job.holdout.count or job.holdout.fraction else [])
        name = target[len(out) :].lstrip("/")
        if name.endswith("_index.json") and "/" not in name and name[: -len("_index.json")] not in splits:
            return f"is not an index that prep.{j} writes (its splits: {', '.join(splits)})"
        return None
    try:
        return None if _exists(url, strict=True) else "does not exist"
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, a missing fsspec backend: all stop the run
        return f"cannot be checked: {type(e).__name__}: {e}"


def _exists(url: str, strict: bool = False) -> bool:
    """Whether fsspec finds ``url``; an error asking is raised with ``strict``, else False."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except Exception:
        if strict:
            raise
        return False


def _normal(url: str) -> str:
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _validate_elastic(cfg: DictConfig) -> None:
    """An elastic range (``ray.min_workers``..``ray.num_workers``) in which every world size keeps
    ``train.global_batch_size``, and a group that is allowed to restart after a host loss."""
    lo, hi = cfg.ray.min_workers, cfg.ray.num_workers
    if lo is None:
        return
    require(1 <= lo <= hi, "ray.min_workers", f"must be in 1..ray.num_workers={hi}, got {lo}")
    micro, glob = cfg.data.micro_batch_size, cfg.train.global_batch_size
    bad = [w for w in range(lo, hi + 1) if glob % (micro * w)]
    good = [w for w in range(1, hi + 1) if glob % (micro * w) == 0]
    require(
        not bad,
        "ray.min_workers",
        f"world sizes {', '.join(map(str, bad))} of {lo}..{hi} cannot keep train.global_batch_size={glob} "
        f"(data.micro_batch_size {micro} x accumulation x world size); the sizes up to {hi} that can: "
        f"{', '.join(map(str, good))} (narrow the range, or change the batch sizes)",
    )
    require(
        cfg.ray.max_failures != 0,
        "ray.max_failures",
        "an elastic group restarts on the hosts left after a loss, and each restart counts as a failure: "
        "set how many it may take (-1: no limit)",
    )
    require(cfg.ray.grow_wait_s > 0, "ray.grow_wait_s", f"must be positive, got {cfg.ray.grow_wait_s}")


def batch_split(cfg: DictConfig, world_size: int) -> int:
    """Gradient-accumulation steps so that micro x accumulation x world = global batch."""
    micro, glob = cfg.data.micro_batch_size, cfg.train.global_batch_size
    per_step = micro * world_size
    require(
        glob > 0 and glob % per_step == 0,
        "train.global_batch_size",
        f"{glob} is not a multiple of data.micro_batch_size x world size = {micro} x {world_size} = {per_step}",
    )
    return glob // per_step


def default_streams(global_batch: int, micro_batch: int) -> int:
    """``data.streams`` when not set: a function of the batch sizes alone, never of the world
    size or the loader workers, so that every run of a config reads the same order.

    Each stream gives ``micro_batch / gcd(micro_batch, 8)`` samples a step, so a rank has at
    least ``gcd(micro_batch, 8)`` streams per micro-batch for its loader workers to share, and
    the count is a multiple of global / micro, which every possible world size divides.
    """
    return global_batch // (micro_batch // math.gcd(micro_batch, 8))


def data_streams(cfg: DictConfig, world_size: int) -> int:
    """The canonical streams of ``data.order=canonical`` at this world size (0 for reader order)."""
    if cfg.data.order != Order.canonical:
        return 0
    glob, micro = cfg.train.global_batch_size, cfg.data.micro_batch_size
    streams = cfg.data.streams or default_streams(glob, micro)
    require(
        streams > 0 and glob % streams == 0,
        "data.streams",
        f"{streams} streams do not divide train.global_batch_size={glob} (every stream gives as many samples a step)",
    )
    require(
        streams % world_size == 0,
        "data.streams",
        f"{streams} streams cannot be shared by {world_size} ranks (a rank reads every {world_size}-th stream); "
        f"use a multiple of every world size the run may have",
    )
    return streams


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_flat_dict(cfg: DictConfig) -> dict[str, Any]:
    """Dotted keys -> scalar values (lists joined), for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, ListConfig):
            if all(not isinstance(v, (DictConfig, ListConfig)) for v in node):
                out[prefix[:-1]] = list(node)
            else:
                for i, v in enumerate(node):
                    walk(v, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = node

    walk(cfg, "")
    return out


def from_container(data: dict) -> DictConfig:
    """Rebuild a typed config from a plain dict (as shipped to Ray workers)."""
    return compose(Config, base=data)
