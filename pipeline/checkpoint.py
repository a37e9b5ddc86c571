"""The one checkpoint writer and reader.

Layout: DeepSpeed's own (``<dir>/<tag>/...``, ``<dir>/latest``) plus, per tag,
``rank_<r>.pt`` (RNG states, data-stream position and EMA pieces of each rank), ``meta.json``
(step, samples seen, world size), ``config.yaml`` and, with an EMA, ``ema.safetensors`` (its
whole fp32 weights: the ``ema`` variant evaluators read), then ``COMPLETE`` written last. Nothing here
reads a checkpoint without its marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.rundir import MARKER, Checkpoints, step_of, tag_for  # noqa: F401  (tags are the run dir's)

EMA_FILE = "ema.safetensors"
VARIANTS = ("raw", "ema")  # the weights of a checkpoint an evaluator can read


def variants(tag_dir: str | os.PathLike) -> list[str]:
    """The weight variants a (local) checkpoint holds: ``raw``, plus ``ema`` when it has an EMA."""
    return ["raw"] + (["ema"] if (Path(tag_dir) / EMA_FILE).is_file() else [])


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tags of the complete checkpoints in a local ``ckpt_dir``, oldest first."""
    return Checkpoints(str(ckpt_dir)).complete_tags()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def is_universal(tag_dir: str | os.PathLike) -> bool:
    """A checkpoint converted by ``to_universal`` (loads on any world size)."""
    return (Path(tag_dir) / "zero").is_dir()


def to_universal(ckpt_dir: str, tag: str, out_dir: str) -> str:
    """Convert a complete checkpoint to DeepSpeed's universal format for another world size.

    Runs DeepSpeed's own ``ds_to_universal`` and carries our metadata and marker along;
    resume from the returned tag dir with ``train.resume_from=<it>``.
    """
    import subprocess
    import sys

    src = Path(ckpt_dir) / tag
    if not (src / MARKER).is_file():
        raise FileNotFoundError(f"{src} is not a complete checkpoint (no {MARKER} marker)")
    dst = Path(out_dir) / tag
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src), "--output_folder", str(dst),
         "--num_extract_workers", "1", "--num_merge_workers", "1"],
        check=True,
    )
    # Rank files too: their data-stream positions tell a resume on another world size where
    # the next pass starts (see ``load``).
    for path in [src / "meta.json", src / "config.yaml", *sorted(src.glob("rank_*.pt")), *src.glob(EMA_FILE)]:
        shutil.copy2(path, dst / path.name)
    _write_atomic(dst / MARKER, "")
    return str(dst)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, meta: dict, rank_state: dict, config_yaml: str, keep: int = 0, ema=None) -> str:
    """Save a checkpoint from every rank (all ranks must call this) and mark it complete.

    ``ema`` (a :class:`pipeline.ema.EMA`): its pieces go into each rank's file (exact resume),
    its whole weights into ``ema.safetensors`` (evaluation)."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # universal_checkpoint_info lets ds_to_universal convert this for another world size.
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"universal_checkpoint_info": {}, "meta": meta})
    tag_dir = Path(ckpt_dir) / tag
    if ema is not None:
        rank_state = {**rank_state, "ema": ema.state_dict()}
        weights = ema.full_state_dict()  # a collective: every rank
        if rank == 0:
            save_file(weights, str(tag_dir / EMA_FILE), metadata={"format": "pt", "tag": tag, "variant": "ema",
                                                                  "decay": str(ema.decay), "updates": str(ema.updates)})
    torch.save({**rank_state, "rng": rng_state()}, tag_dir / f"rank_{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (tag_dir / "config.yaml").write_text(config_yaml)
        _write_atomic(tag_dir / "meta.json", json.dumps({**meta, "step": step, "tag": tag}, indent=2))
        _write_atomic(tag_dir / MARKER, "")
        if keep > 0:
            for old in complete_tags(ckpt_dir)[:-keep]:
                shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> tuple[dict, dict | None]:
    """Load engine state (model, optimizer, scheduler) and this rank's own state.

    Returns ``(meta, rank_state)``. On the world size it was saved with, ``rank_state`` is this
    rank's own (data-stream position; RNG states restored). On another world size (a universal
    checkpoint) it holds only ``{"data": ...}`` merged from every saved rank, RNG states are
    left alone, and the data stream, seeing another world size, starts at the pass after the
    furthest one any reader had begun: the rest of an interrupted pass is skipped, no sample
    of it is repeated. ``rank_state`` is None when no rank file is there.
    """
    tag_dir = Path(ckpt_dir) / tag
    if not (tag_dir / MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {MARKER} marker)")
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    _replay_cpu_adam_beta_powers(engine)
    meta = json.loads((tag_dir / "meta.json").read_text()) if (tag_dir / "meta.json").is_file() else {}
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = tag_dir / f"rank_{rank}.pt"
    rank_state = None
    if rank_file.is_file() and meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
    elif rank_files := sorted(tag_dir.glob("rank_*.pt")):
        rank_state = {"data": _merged_data_state(rank_files)}
    return meta, rank_state


def _replay_cpu_adam_beta_powers(engine) -> None:
    """Bring DeepSpeedCPUAdam's C++ bias-correction state to where an uninterrupted run has it.

    The C++ optimizer (``cpu_adam.h``, ``IncrementStep``) keeps ``beta**t`` in float32 and
    multiplies it by ``beta`` each step, but a fresh optimizer meeting a loaded step ``t``
    sets it to ``pow(beta, t)`` instead; the two differ in the last bit for some ``t``
    (``0.999**3``: 0.9970031 vs 0.997003), which shifts every update after a resume by an
    ulp, and Adam blows that up where gradients are ~0 (e.g. the key bias). Stepping the
    C++ state from 1 to ``t`` on a one-element dummy reproduces the products exactly.
    """
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not hasattr(opt, "ds_opt_adam") or not hasattr(opt, "opt_id"):
        return
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    if not steps:
        return
    group = opt.param_groups[0]
    beta1, beta2 = (float(b) for b in group["betas"])
    dummy = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq

    def update(step: int, b1: float) -> None:
        opt.ds_opt_adam.adam_update(opt.opt_id, step, 0.0, b1, beta2, 1.0, 0.0, False, *dummy)

    update(0, 0.5 if beta1 != 0.5 else 0.25)  # other betas: the C++ state restarts at step 0,
    update(0, beta1)  # and again with ours: beta**0 = 1, exactly as a new optimizer's
    for step in range(1, max(steps) + 1):
        update(step, beta1)


def _merged_data_state(rank_files: list[Path]) -> dict:
    """Every saved reader's position in one data-stream state (as saved: old world size)."""
    states = [torch.load(f, weights_only=False).get("data") or {} for f in rank_files]
    positions = [pos for s in states for pos in s.get("positions", {}).values()]
    return {"batches": 0, "positions": {str(i): list(p) for i, p in enumerate(positions)},
            "world_size": states[0].get("world_size"), "num_workers": states[0].get("num_workers")}


def load_fp32_weights(ckpt_dir: str, tag: str, variant: str = "raw") -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a checkpoint, on CPU, through DeepSpeed's own utility.

    Works for every ZeRO stage (for stage 0 the module's own weights are read). ``variant``
    ``ema`` reads the checkpoint's EMA weights instead.
    """
    tag_dir = Path(ckpt_dir) / tag
    if not (tag_dir / MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {MARKER} marker)")
    if variant not in VARIANTS:
        raise ValueError(f"unknown weights variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "ema":
        from safetensors.torch import load_file

        if not (tag_dir / EMA_FILE).is_file():
            raise FileNotFoundError(f"{tag_dir} has no EMA weights ({EMA_FILE}); was train.ema.decay 0?")
        return load_file(str(tag_dir / EMA_FILE))
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def export_safetensors(ckpt_dir: str, tag: str, out_path: str, variant: str = "raw") -> str:
    """Write a checkpoint's consolidated fp32 weights (timm names) as safetensors."""
    from safetensors.torch import save_file

    save_file(load_fp32_weights(ckpt_dir, tag, variant), out_path, metadata={"format": "pt", "tag": tag, "variant": variant})
    return out_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
