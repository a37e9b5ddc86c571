"""Plan a pre-training run before launch: memory, time, cost, host cores and storage.

``python -m pipeline.plan <experiment.yaml> [key=value ...] [--sbatch-args "--nodes=64 --gpus-per-node=8"] [--json]``
(``launch/pretrain.sh --plan`` runs this) prints, from the config and the target hardware
(the ``plan.*`` keys, SLURM flags, or the config's ``ray.num_workers``), with no cluster
and no data: parameters and FLOPs per image; per-rank memory at every ZeRO stage and
whether it fits, with the largest micro-batch that does; images/s, step time, wall time
and GPU-hours; host cores per GPU to decode for that rate; checkpoint size and upload
time; and the evaluations' cost per checkpoint. A micro-batch that does not fit the
target at the configured stage is refused with exit status 2, naming the largest that
fits. Every formula is a small function of values; ``bench/bench_train_plan.py`` checks them
against measurements (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import devices
from pipeline.model import ViTSpec, flops_per_image, get_spec

GIB = 2**30
CALIBRATION = Path(__file__).resolve().parents[1] / "bench" / "train_plan_calibration.json"
ASSUMED_MFU = 0.4  # no measured MFU for the device: a stated assumption, printed as such
CORES_PER_GPU_DEFAULT = 14  # a DGX H100: 112 cores for 8 GPUs

# --- model ----------------------------------------------------------------------------


def vit_params(spec: ViTSpec, num_classes: int, representation_size: int | None = None, pool: str = "token") -> int:
    """Parameters of :class:`pipeline.model.VisionTransformer` (the paper's count at 1000 classes)."""
    d, m, p = spec.width, spec.mlp_dim, spec.patch_size
    tokens = (spec.img_size // p) ** 2 + (1 if pool == "token" else 0)
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)  # 2 LN, qkv, proj, fc1, fc2
    embed = 3 * p * p * d + d + tokens * d + (d if pool == "token" else 0)
    head_in = representation_size or d
    head = (d * representation_size + representation_size if representation_size else 0) + (
        head_in * num_classes + num_classes if num_classes else 0
    )
    return embed + spec.depth * block + 2 * d + head


def train_flops(
    spec: ViTSpec, num_classes: int, representation_size: int | None = None, recompute: bool = False
) -> float:
    """Model FLOPs (multiply-add = 2) to train on one image: forward + backward (2x forward),
    plus the blocks' forward once more under activation checkpointing."""
    body = flops_per_image(spec, 0, training=False)
    head_in = representation_size or spec.width
    forward = body + 2 * (spec.width * representation_size if representation_size else 0) + 2 * head_in * num_classes
    blocks = body - flops_per_image(
        ViTSpec(spec.width, 0, spec.heads, spec.mlp_dim, spec.patch_size, spec.img_size), 0, training=False
    )
    return 3 * forward + (blocks if recompute else 0.0)


def tokens_per_image(spec: ViTSpec, pool: str = "token") -> int:
    return (spec.img_size // spec.patch_size) ** 2 + (1 if pool == "token" else 0)


def activation_bytes(
    spec: ViTSpec,
    micro_batch: int,
    num_classes: int,
    pool: str = "token",
    precision: str = "bf16",
    dropout: bool = False,
    recompute: bool = False,
) -> float:
    """Peak activation memory of one forward + backward at ``micro_batch`` (bytes).

    Counts what autograd saves per token in a pre-LN block (flash-style attention, no
    n x n scores): LN1 and qkv inputs, q/k/v and the attention output, the proj input, LN2
    and fc1 inputs, the GELU input and fc2 input (9 width + 2 MLP elements; dropout adds
    1-byte masks), plus the model input, the last LayerNorm and the fp32 logits; the peak is at
    the end of the forward pass (the backward frees a block's saved tensors as it makes its
    gradients: measured within 1% on this CPU, bench/RESULTS.md). With ``recompute`` only
    each block's input is kept, and one block is rebuilt at a time in the backward pass."""
    e = 4 if precision == "fp32" else 2
    n, d, m = tokens_per_image(spec, pool), spec.width, spec.mlp_dim
    block = n * (e * (9 * d + 2 * m) + ((2 * d + m) if dropout else 0))
    kept = spec.depth * n * d * e + block if recompute else spec.depth * block
    edges = 3 * spec.img_size**2 * e + n * d * e + 3 * 4 * num_classes  # input, final LN, logits + loss in fp32
    return micro_batch * (kept + edges)


# --- memory per rank --------------------------------------------------------------------


def model_state_bytes(
    params: int,
    stage: int,
    world: int,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_param: bool = False,
    ema: bool = False,
    reduce_bucket_size: int = 0,
) -> dict[str, dict[str, float]]:
    """Bytes per rank of the model states under ZeRO ``stage`` on ``world`` ranks, split by
    kind, for the device and for the host (offload). Mixed precision (ZeRO paper, K = 12):
    16-bit weights and gradients, fp32 master weights and two Adam moments; fp32: 4-byte
    weights and gradients, no master copy. Stage 1 shards the optimizer states, 2 also the
    gradients, 3 also the weights. The EMA (pipeline.ema) is 4 bytes a parameter kept where
    the fp32 masters are, sharded like them. ZeRO-3 keeps a 16-bit reduce bucket of
    ``reduce_bucket_size`` elements (measured in bench_zero_memory)."""
    e = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    shard = {k: (world if stage >= s else 1) for k, s in (("optimizer", 1), ("gradients", 2), ("weights", 3))}
    parts = {
        "weights": e * params / shard["weights"],
        "gradients": e * params / shard["gradients"],
        "optimizer": (master + 8) * params / shard["optimizer"],
        "ema": (4 * params / shard["optimizer"]) if ema else 0.0,
        "buckets": float(e * reduce_bucket_size) if stage == 3 else 0.0,
    }
    host_kinds = ({"optimizer", "ema"} if offload_optimizer else set()) | ({"weights"} if offload_param else set())
    return {
        "device": {k: (0.0 if k in host_kinds else v) for k, v in parts.items()},
        "host": {k: v for k, v in parts.items() if k in host_kinds},
    }


def largest_micro_batch(budget: float, fixed: float, per_sample: float) -> int:
    """The largest micro-batch whose memory ``fixed + b * per_sample`` fits ``budget`` (0: none)."""
    return max(0, int((budget - fixed) // per_sample)) if per_sample > 0 else 0


# --- time, cores, storage ---------------------------------------------------------------


def images_per_second(flops_per_img: float, peak_tflops: float, mfu: float) -> float:
    """Images/s of one device that sustains ``mfu`` of ``peak_tflops``."""
    return mfu * peak_tflops * 1e12 / flops_per_img


def step_seconds(global_batch: int, world: int, device_images_per_s: float) -> float:
    """Compute time of one optimizer step (no communication)."""
    return global_batch / (world * device_images_per_s)


def comm_bytes_per_step(
    params: int, stage: int, world: int, accumulation: int = 1, precision: str = "bf16", recompute: bool = False
) -> float:
    """Bytes through each rank's link per optimizer step (ring collectives move (N-1)/N of the
    data per rank for a reduce-scatter or an all-gather, twice that for an all-reduce).
    Stage 0: one gradient all-reduce; 1: a gradient reduce-scatter and a weight all-gather;
    2: the reduce-scatter at every micro-step; 3: the weights gathered for the forward, the
    backward (and the recomputed forward) and the gradients reduce-scattered, every micro-step."""
    if world <= 1:
        return 0.0
    one = (2 if precision != "fp32" else 4) * params * (world - 1) / world
    if stage == 0:
        return 2 * one
    if stage == 1:
        return 2 * one
    if stage == 2:
        return accumulation * one + one
    return accumulation * (3 + (1 if recompute else 0)) * one


def host_cores_per_device(device_images_per_s: float, decode_images_per_core_s: float) -> float:
    """Host cores to decode for one device, plus one for the training process itself."""
    return device_images_per_s / decode_images_per_core_s + 1.0


def checkpoint_bytes(params: int, stage: int, precision: str = "bf16", ema: bool = False) -> float:
    """Bytes of one checkpoint tag over all ranks: the module's weights, the fp32 master and
    Adam moments (every rank's shard), under ZeRO-3 also the gathered 16-bit weights, and
    the EMA's fp32 weights (``ema.safetensors``)."""
    e = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    return params * (e + master + 8 + (2 if stage == 3 else 0) + (4 if ema else 0))


def checkpoint_room(cfg, num_classes: int, steps: int, latest_step: int | None, kept_here: bool) -> tuple[float, int]:
    """(bytes of one tag, tags a disk holds at once from here): the tags still to write from
    ``latest_step`` (None: a fresh start), as many as ``train.keep_checkpoints`` (+1 while one is
    saved) where the run's tags are kept (``kept_here``), else 2 (a remote run dir's staging
    keeps its newest copy and the one being saved)."""
    m, t = cfg.model, cfg.train
    spec = get_spec(m.name, img_size=m.img_size, patch_size=m.patch_size)
    params = vit_params(spec, num_classes, m.representation_size, str(m.pool))
    tag = checkpoint_bytes(params, cfg.deepspeed.zero_stage, str(t.precision), bool(t.ema.decay))
    start = latest_step or 0
    to_write = steps // t.checkpoint_every - start // t.checkpoint_every + (steps % t.checkpoint_every != 0)
    to_write += int(latest_step is None and t.checkpoint_at_start)
    return tag, max(0, min(to_write, (t.keep_checkpoints + 1 if t.keep_checkpoints else to_write) if kept_here else 2))


def train_steps(steps: int, epochs: float, num_samples: int, global_batch: int) -> int:
    """``steps``, or ``epochs`` over ``num_samples`` (as pipeline.recipe.total_steps); 0: unknown."""
    if steps > 0:
        return steps
    return max(1, int(epochs * num_samples // global_batch)) if num_samples else 0


# --- the target -------------------------------------------------------------------------


@dataclass
class Target:
    device: str
    memory_gib: float  # per device (cpu: per rank)
    peak_tflops: float
    mfu: float
    mfu_source: str
    nodes: int
    per_node: int  # devices (ranks) per node
    cores_per_node: float
    decode_rate: float  # images per host core-second
    decode_source: str

    @property
    def world(self) -> int:
        return self.nodes * self.per_node


def calibration() -> dict:
    """The measured figures the plan uses (bench/train_plan_calibration.json), or {}."""
    return json.loads(CALIBRATION.read_text()) if CALIBRATION.is_file() else {}


def sbatch_shape(sbatch_args: str) -> dict[str, int]:
    """nodes and GPUs per node from sbatch flags ("--nodes=4 --gpus-per-node=8", "-N 4")."""
    out, words = {}, shlex.split(sbatch_args or "")
    for i, w in enumerate(words):
        key, _, value = w.partition("=")
        if not value and i + 1 < len(words):
            value = words[i + 1]
        if key in ("--nodes", "-N"):
            out["nodes"] = int(value.split("-")[-1])
        elif key == "--gpus-per-node":
            out["gpus_per_node"] = int(value.split(":")[-1])
    return out


def slurm_allocation(env: dict) -> str:
    """The shape of the SLURM allocation this runs in, as sbatch flags ("" outside one)."""
    if not env.get("SLURM_JOB_NUM_NODES"):
        return ""
    gpus = env.get("SLURM_GPUS_ON_NODE")
    return f"--nodes={env['SLURM_JOB_NUM_NODES']}" + (f" --gpus-per-node={gpus}" if gpus else "")


def gpu_mfu(configured: float, cal: dict, device: str, compiled: bool) -> tuple[float, str]:
    """(MFU, where it came from) of ``device``: ``plan.mfu``, else the measured compiled figure
    (``gpu_mfu_compiled``) when training compiles and one is recorded, else the measured eager
    one (``gpu_mfu``), else an assumption; the source says which."""
    if configured:
        return configured, "plan.mfu"
    eager, fast = cal.get("gpu_mfu", {}).get(device), cal.get("gpu_mfu_compiled", {}).get(device)
    if compiled and fast:
        return fast["mfu"], f"compiled (train.compile): {fast['source']}"
    note = f"; train.compile is on, but no compiled MFU for {device} is recorded: the eager figure" if compiled else ""
    if eager:
        return eager["mfu"], f"eager: {eager['source']}{note}"
    return ASSUMED_MFU, f"assumed: no measured MFU for {device} in bench/RESULTS.md{note}"


def cpu_rate(rates: list[dict], width: int) -> float:
    """Measured model GFLOP/s per thread of the calibrated model nearest in width (small
    matrices run slower: the demo's width 128 against ViT-B's 768), or 0."""
    return min(rates, key=lambda r: abs(r["width"] - width))["gflops_per_thread"] if rates else 0.0


def resolve_target(
    plan,
    use_gpu: bool,
    num_workers: int,
    cpus_per_worker: float,
    train_peak_tflops: float,
    width: int,
    sbatch_args: str = "",
    cal: dict | None = None,
    compiled: bool = False,
) -> Target:
    """The hardware the plan is for, from the ``plan`` settings, sbatch flags and the Ray keys;
    ``width`` picks the CPU calibration; ``compiled`` (``train.compile.enabled``): a GPU's
    measured compiled MFU when one is recorded."""
    cal = calibration() if cal is None else cal
    shape = sbatch_shape(sbatch_args)
    name = plan.device if plan.device != "auto" else ("H100" if use_gpu else "cpu")
    per_node = shape.get("gpus_per_node") or plan.gpus_per_node
    if name == "cpu":
        import psutil

        cpu = cal.get("cpu", {})
        per_node = num_workers if not plan.nodes and not shape else per_node
        nodes = shape.get("nodes") or plan.nodes or 1
        cores = plan.cpu_cores_per_node or float(os.cpu_count() or 1)
        mem = plan.memory_gib or psutil.virtual_memory().total / GIB / per_node
        # A CPU rank's "peak" is the measured model-FLOP rate of its threads (mfu 1 of that).
        peak = plan.peak_tflops or cpu_rate(cpu.get("rates", []), width) * cpus_per_worker / 1e3
        mfu, mfu_source = (plan.mfu or 1.0), cpu.get("source", "no CPU calibration: set plan.peak_tflops")
    else:
        if not shape and not plan.nodes:  # the config's own ranks: ray.num_workers GPUs, 8 (gpus_per_node) a node
            per_node = min(per_node, num_workers)
        nodes = shape.get("nodes") or plan.nodes or max(1, math.ceil(num_workers / per_node))
        known = devices.find(name)
        mem = plan.memory_gib or (known.memory_gib if known else 0.0)
        peak = plan.peak_tflops or train_peak_tflops or (known.peak_tflops if known else 0.0)
        if not mem or not peak:
            raise ValueError(
                f"plan.device: unknown GPU {name!r}; known: {', '.join(d.short for d in devices.DEVICES)}, "
                "cpu (or a name as CUDA reports it); or set plan.memory_gib and plan.peak_tflops"
            )
        mfu, mfu_source = gpu_mfu(plan.mfu, cal, known.short if known else name, compiled)
        cores = plan.cpu_cores_per_node or CORES_PER_GPU_DEFAULT * per_node
    decode = cal.get("decode", {})
    rate = plan.decode_rate or decode.get("images_per_core_s", 0.0)
    source = "plan.decode_rate" if plan.decode_rate else decode.get("source", "unknown: set plan.decode_rate")
    return Target(name, mem, peak, mfu, mfu_source, nodes, per_node, cores, rate, source)


# --- the plan ---------------------------------------------------------------------------


def corpus(cfg) -> tuple[int, int, str]:
    """(samples, classes, where they came from) of the training corpus: plan.* settings, the
    demo's generator, or the index when it is a local file; 0 for unknown."""
    samples, classes, source = cfg.plan.num_samples, cfg.model.num_classes or cfg.plan.num_classes, "plan.num_samples"
    if cfg.demo.enabled:
        samples = samples or cfg.demo.classes * cfg.demo.per_class
        classes = classes or cfg.demo.classes
        source = "demo corpus"
    url = str(cfg.data.train)
    if (not samples or not classes) and "://" not in url and Path(url).is_file():
        index = json.loads(Path(url).read_text())  # data_prep's: wids shardlist plus totals
        samples = samples or index.get("num_samples") or sum(s.get("nsamples", 0) for s in index.get("shardlist", []))
        classes = classes or index.get("num_classes") or len(index.get("classes", []))
        source = url
    return int(samples or 0), int(classes or 0), source if samples else "unknown (set plan.num_samples)"


def make_plan(cfg, sbatch_args: str = "", cal: dict | None = None) -> dict:
    """Everything the plan prints, as a dict (see the module docstring)."""
    m, d, t = cfg.model, cfg.deepspeed, cfg.train
    spec = get_spec(m.name, img_size=m.img_size, patch_size=m.patch_size)
    target = resolve_target(
        cfg.plan,
        cfg.ray.use_gpu,
        cfg.ray.num_workers,
        cfg.ray.cpus_per_worker,
        t.peak_tflops,
        spec.width,
        sbatch_args,
        cal,
        compiled=t.compile.enabled,
    )
    samples, classes, corpus_source = corpus(cfg)
    classes_for_count = classes or 1000
    params = vit_params(spec, classes_for_count, m.representation_size, str(m.pool))
    flops = train_flops(spec, classes_for_count, m.representation_size, m.grad_checkpointing)
    world, micro, glob = target.world, cfg.data.micro_batch_size, t.global_batch_size
    budget = target.memory_gib * GIB * cfg.plan.memory_fraction
    ips = images_per_second(flops, target.peak_tflops, target.mfu) if target.peak_tflops else 0.0
    compute_s = step_seconds(glob, world, ips) if ips else 0.0
    link = 0.0 if target.device == "cpu" else (cfg.plan.network_gbps if target.nodes > 1 else cfg.plan.nvlink_gbps)
    accum = glob / (micro * world)
    step_s = functools.partial(_step_s, cfg, params, world, accum, compute_s, link)
    stages = _memory_stages(cfg, spec, params, world, classes_for_count, budget, step_s)
    steps = train_steps(t.steps, t.epochs, samples, glob)
    step = step_s(d.zero_stage)
    wall_s = steps * step
    checkpoints, evaluation = _checkpoints_and_eval(cfg, spec, params, steps, ips, target)
    return {
        "config": _config_section(cfg, accum),
        "target": {**asdict(target), "world": world},
        "model": {
            "params": params,
            "classes": classes_for_count,
            "classes_known": bool(classes),
            "tokens_per_image": tokens_per_image(spec, str(m.pool)),
            "train_gflops_per_image": flops / 1e9,
            "forward_gflops_per_image": train_flops(spec, classes_for_count, m.representation_size) / 3e9,
        },
        "memory": {"budget_gib": budget / GIB, "stages": stages},
        "time": {
            "images_per_s_per_device": glob / world / step if step else 0.0,
            "images_per_s": glob / step if step else 0.0,
            "compute_step_s": compute_s,
            "step_s": step,
            "link_gbps": link,
            "steps": steps,
            "num_samples": samples,
            "corpus_source": corpus_source,
            "wall_h": wall_s / 3600,
            "gpu_hours": wall_s * world / 3600,
        },
        "host": {
            "cores_per_device": host_cores_per_device(glob / world / step, target.decode_rate)
            if target.decode_rate and step
            else 0.0,
            "cores_per_device_available": target.cores_per_node / target.per_node,
        },
        "checkpoints": checkpoints,
        "eval": evaluation,
    }


def _config_section(cfg, accum: float) -> dict:
    """The settings the plan is for (the plan's ``config`` section); ``accum``: micro-batches per step."""
    m, d, t = cfg.model, cfg.deepspeed, cfg.train
    return {
        "model": m.name,
        "zero_stage": d.zero_stage,
        "offload_optimizer": d.offload_optimizer,
        "offload_param": d.offload_param,
        "overlap_comm": d.overlap_comm,
        "precision": str(t.precision),
        "micro_batch_size": cfg.data.micro_batch_size,
        "global_batch_size": t.global_batch_size,
        "grad_accumulation": accum,
        "grad_checkpointing": m.grad_checkpointing,
        "ema": t.ema.decay > 0,
    }


def _step_s(cfg, params: int, world: int, accum: float, compute_s: float, link: float, stage: int) -> float:
    """Seconds of one optimizer step at ZeRO ``stage``: ``compute_s`` plus the step's communication
    over ``link`` GB/s, overlapped only with deepspeed.overlap_comm."""
    recompute, precision = cfg.model.grad_checkpointing, str(cfg.train.precision)
    comm = (
        comm_bytes_per_step(params, stage, world, max(1, round(accum)), precision, recompute) / (link * 1e9)
        if link
        else 0.0
    )
    return max(compute_s, comm) if cfg.deepspeed.overlap_comm else compute_s + comm


def _memory_stages(
    cfg, spec: ViTSpec, params: int, world: int, num_classes: int, budget: float, step_s: Callable[[int], float]
) -> dict[str, dict]:
    """The memory table, by ZeRO stage ("0" to "3"): each rank's model states on the device and
    the host, its activations at the configured micro-batch (also with activation checkpointing
    switched the other way), whether that fits ``budget`` bytes, the largest micro-batch that
    does, and ``step_s`` of the stage."""
    m, d, t = cfg.model, cfg.deepspeed, cfg.train
    micro, precision, ema = cfg.data.micro_batch_size, str(t.precision), t.ema.decay > 0

    def act(b: int, recompute: bool) -> float:
        return activation_bytes(spec, b, num_classes, str(m.pool), precision, m.dropout > 0, recompute)

    stages = {}
    for stage in (0, 1, 2, 3):
        states = model_state_bytes(
            params,
            stage,
            world,
            precision,
            d.offload_optimizer and stage >= 1,
            d.offload_param and stage == 3,
            ema,
            d.reduce_bucket_size,
        )
        fixed = sum(states["device"].values())
        total = fixed + act(micro, m.grad_checkpointing)
        stages[str(stage)] = {  # str: the same keys in the dict and its JSON
            "device_gib": {k: v / GIB for k, v in states["device"].items()},
            "host_gib": sum(states["host"].values()) / GIB,
            "activations_gib": act(micro, m.grad_checkpointing) / GIB,
            "activations_other_gib": act(micro, not m.grad_checkpointing) / GIB,
            "total_gib": total / GIB,
            "fits": total <= budget,
            "largest_micro_batch": largest_micro_batch(budget, fixed, act(1, m.grad_checkpointing)),
            "step_s": step_s(stage),
        }
    return stages


def _checkpoints_and_eval(
    cfg, spec: ViTSpec, params: int, steps: int, ips: float, target: Target
) -> tuple[dict[str, float], dict[str, float]]:
    """The plan's ``checkpoints`` (tags, size, upload time, storage kept) and ``eval`` (device time
    per checkpoint and for all of them) sections for a run of ``steps``; no evaluation time
    without a compute rate (``ips``, images/s per device, 0)."""
    t, ema = cfg.train, cfg.train.ema.decay > 0
    ckpts = (steps // t.checkpoint_every) + (1 if t.checkpoint_at_start else 0) if steps else 0
    ckpt = checkpoint_bytes(params, cfg.deepspeed.zero_stage, str(t.precision), ema)
    kept = t.keep_checkpoints or ckpts
    eval_images = cfg.plan.eval_images
    eval_flops = flops_per_image(spec, 0, training=False) * eval_images * (2 if ema else 1)
    eval_gpu_s = eval_flops / (target.mfu * target.peak_tflops * 1e12) if ips and eval_images else 0.0
    checkpoints = {
        "count": ckpts,
        "gb_per_tag": ckpt / 1e9,
        "upload_s": ckpt / (cfg.plan.storage_gbps * 1e9),
        "storage_gb": ckpt * kept / 1e9,
    }
    evaluation = {
        "images_per_checkpoint": eval_images,
        "device_s_per_checkpoint": eval_gpu_s,
        "device_hours_total": eval_gpu_s * ckpts / 3600,
    }
    return checkpoints, evaluation


def splits(global_batch: int, world: int, largest: int) -> int:
    """The largest micro-batch up to ``largest`` that splits ``global_batch`` over ``world`` ranks (0: none)."""
    return next((b for b in range(largest, 0, -1) if global_batch % (b * world) == 0), 0)


def refusal(plan: dict) -> str | None:
    """Why the configured micro-batch cannot run on the target, or None when it can."""
    cfg, mem, world = plan["config"], plan["memory"], plan["target"]["world"]
    stage = mem["stages"][str(cfg["zero_stage"])]
    micro, budget, glob = cfg["micro_batch_size"], mem["budget_gib"], cfg["global_batch_size"]
    if glob % (micro * world):
        good = splits(glob, world, stage["largest_micro_batch"])
        return (
            f"train.global_batch_size={glob} is not a multiple of data.micro_batch_size x ranks = {micro} x {world}; "
            + (f"data.micro_batch_size={good} splits it and fits" if good else "no micro-batch that fits splits it")
        )
    if stage["fits"]:
        return None
    fitting = [s for s, v in mem["stages"].items() if v["fits"]]
    best = max(mem["stages"].values(), key=lambda v: v["largest_micro_batch"])["largest_micro_batch"]
    where = (
        f"it fits at ZeRO-{', '.join(map(str, fitting))} (deepspeed.zero_stage=...)"
        if fitting
        else f"it fits at no ZeRO stage; the largest micro-batch that fits is {best}"
    )
    return (
        f"data.micro_batch_size={micro} needs {stage['total_gib']:.1f} GiB per rank at ZeRO-{cfg['zero_stage']}, over "
        f"the {budget:.1f} GiB budget; the largest micro-batch that fits at ZeRO-{cfg['zero_stage']} is "
        f"{stage['largest_micro_batch']}; {where}"
    )


def _hours(h: float) -> str:
    return f"{h * 60:.1f} min" if h < 1 else (f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days")


def format_plan(p: dict) -> str:
    c, tg, mo, me, ti, ho, ck, ev = (
        p[k] for k in ("config", "target", "model", "memory", "time", "host", "checkpoints", "eval")
    )
    unit = "rank" if tg["device"] == "cpu" else "GPU"
    lines = [
        f"target: {tg['nodes']} node(s) x {tg['per_node']} {tg['device']} = {tg['world']} ranks, "
        f"{tg['memory_gib']:.0f} GiB "
        f"and {tg['peak_tflops'] * 1e3 if tg['device'] == 'cpu' else tg['peak_tflops']:.0f} "
        f"{'GFLOP/s (measured)' if tg['device'] == 'cpu' else 'TFLOP/s peak'} per {unit}, "
        f"{tg['cores_per_node']:.0f} host cores per node",
        f"model: {c['model']}, {mo['params'] / 1e6:.1f}M params ({mo['classes']} "
        f"classes{'' if mo['classes_known'] else ', assumed: set plan.num_classes'}), "
        f"{mo['tokens_per_image']} tokens/image, {mo['forward_gflops_per_image']:.1f} GFLOP forward, "
        f"{mo['train_gflops_per_image']:.1f} GFLOP to train per image"
        f"{' (with activation recomputation)' if c['grad_checkpointing'] else ''}",
        f"batch: {c['micro_batch_size']} per {unit} x {tg['world']} x {c['grad_accumulation']:g} accumulation = "
        f"{c['global_batch_size']}",
        f"memory per {unit} at micro-batch {c['micro_batch_size']} (GiB; budget {me['budget_gib']:.1f} = "
        "plan.memory_fraction of "
        f"{tg['memory_gib']:.0f}):",
        "  ZeRO | weights  grads  optim    ema  bucket | activations (other ckpt) | total | host | fits | largest "
        "micro-batch | s/step",
    ]
    for s, v in me["stages"].items():
        dv = v["device_gib"]
        mark = "*" if s == str(c["zero_stage"]) else " "
        lines.append(
            f" {mark}{s:>3} | {dv['weights']:7.2f} {dv['gradients']:6.2f} {dv['optimizer']:6.2f} {dv['ema']:6.2f} "
            f"{dv['buckets']:6.2f} | {v['activations_gib']:11.2f} ({v['activations_other_gib']:6.2f})"
            f"   | {v['total_gib']:5.1f} | {v['host_gib']:4.1f} | {'yes' if v['fits'] else 'NO ':>4} | "
            f"{v['largest_micro_batch']:>19,} | {v['step_s']:.3f}"
        )
    comm = (
        f" + communication at {ti['link_gbps']:.0f} GB/s per {unit} "
        f"({'overlapped' if c['overlap_comm'] else 'not overlapped'})"
        if ti["link_gbps"]
        else " (communication not modelled on CPU ranks)"
    )
    rate = "the measured CPU rate" if tg["device"] == "cpu" else f"{tg['mfu']:.2f} of peak"
    lines.append(
        f"time: {ti['compute_step_s']:.3f} s/step compute at {rate} ({tg['mfu_source']}){comm} = "
        f"{ti['step_s']:.3f} s/step, {ti['images_per_s_per_device']:,.0f} images/s per {unit}, "
        f"{ti['images_per_s']:,.0f} in all"
    )
    if ti["steps"]:
        lines.append(
            f"  {ti['steps']:,} steps ({ti['num_samples']:,} samples from {ti['corpus_source']}): "
            f"{_hours(ti['wall_h'])} "
            f"wall, {ti['gpu_hours']:,.{0 if ti['gpu_hours'] >= 10 else 2}f} {unit}-hours"
        )
    else:
        lines.append("  steps unknown: train.epochs needs the corpus size (plan.num_samples=...)")
    lines.append(
        f"host cores per {unit} to decode for that rate: {ho['cores_per_device']:.1f} needed, "
        f"{ho['cores_per_device_available']:.1f} available ({tg['decode_rate']:.0f} images per core-second: "
        f"{tg['decode_source']})"
    )
    lines.append(
        f"checkpoints: {ck['count']} tags of {ck['gb_per_tag']:.2f} GB, {ck['upload_s']:.0f} s each to upload at "
        f"plan.storage_gbps, {ck['storage_gb']:,.0f} GB kept (train.keep_checkpoints)"
    )
    if ev["images_per_checkpoint"]:
        lines.append(
            f"evaluation: {ev['images_per_checkpoint']:,} images per checkpoint, "
            f"{ev['device_s_per_checkpoint'] / 60:.1f} "
            f"{unit}-min each, {ev['device_hours_total']:,.1f} {unit}-hours for all checkpoints"
        )
    else:
        lines.append("evaluation: images per checkpoint unknown (plan.eval_images=...)")
    return "\n".join(lines)


def plan_params(plan: dict) -> dict[str, float | int | str]:
    """The plan's headline figures as flat ``plan/...`` keys (MLflow params)."""
    stage = plan["memory"]["stages"][str(plan["config"]["zero_stage"])]
    return {
        "plan/params": plan["model"]["params"],
        "plan/train_gflops_per_image": round(plan["model"]["train_gflops_per_image"], 2),
        "plan/memory_gib_per_rank": round(stage["total_gib"], 2),
        "plan/largest_micro_batch": stage["largest_micro_batch"],
        "plan/images_per_s": round(plan["time"]["images_per_s"], 1),
        "plan/step_s": round(plan["time"]["step_s"], 4),
        "plan/wall_h": round(plan["time"]["wall_h"], 2),
        "plan/mfu": plan["target"]["mfu"],
        "plan/mfu_source": plan["target"]["mfu_source"][:250],
    }


def run_plan(cfg) -> dict:
    """:func:`plan_params` of a run about to start; a plan that cannot be made is one
    ``plan/error`` param, never an error of the run."""
    try:
        return plan_params(make_plan(cfg))
    except Exception as e:  # noqa: BLE001 - the plan is advice
        return {"plan/error": f"{type(e).__name__}: {e}"[:250]}


def planned_vs_measured(planned: dict, images_per_s: float | None, tracker=None) -> list[str]:
    """Summary lines putting the plan next to the run: images/s, step time (the global batch
    over ``images_per_s``), peak memory (``train/memory_gib_max_rank`` read from ``tracker``
    when given)."""
    if "plan/images_per_s" not in planned:
        return []
    memory = None
    try:
        memory = max(m.value for m in tracker.metric_history("train/memory_gib_max_rank")) if tracker else None
    except Exception:  # noqa: BLE001 - the server may be away: the line then says so
        pass
    batch = planned["plan/images_per_s"] * planned["plan/step_s"]  # the global batch
    lines = [
        f"planned / measured  : images/s {planned['plan/images_per_s']:.1f} / "
        f"{'n/a' if not images_per_s else f'{images_per_s:.1f}'}; step {planned['plan/step_s']:.3f} s / "
        f"{'n/a' if not images_per_s or not batch else f'{batch / images_per_s:.3f} s'}; "
        f"memory per rank {planned['plan/memory_gib_per_rank']:.2f} GiB (+ imports, CUDA context) / "
        f"{'n/a' if memory is None else f'{memory:.2f} GiB'}"
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="experiment YAML (default: the demo)")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.add_argument(
        "--sbatch-args",
        default=os.environ.get("PLAN_SBATCH_ARGS", ""),
        help='the SLURM shape, as for launch/pretrain.sh --slurm ("--nodes=64 --gpus-per-node=8")',
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        cfg = load_config(
            args.config or Path(__file__).resolve().parents[1] / "configs/experiment/demo.yaml", args.overrides
        )
        plan = make_plan(cfg, args.sbatch_args or slurm_allocation(os.environ))
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    why = refusal(plan)
    if why:
        print(f"refused: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
