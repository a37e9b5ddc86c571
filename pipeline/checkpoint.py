"""The one owner of a run's training state on disk: save, resume, list and load checkpoints.

A tag (``<run dir>/checkpoints/step_00000400``; the run dir's layout is ``pipeline.rundir``'s)
holds DeepSpeed's own files, then ours:

* ``rank_<r>.pt`` — rank r's RNG states, data-stream position and EMA pieces: tensors and
  plain values only, read with ``torch.load(weights_only=True)`` so a file cannot run code;
* ``ema.safetensors`` — the whole fp32 EMA weights (the ``ema`` variant evaluators read);
* ``config.yaml`` — the resolved config;
* ``meta.json`` — step, samples seen, world size, the run's MLflow run, and the manifest
  (``files``): the size and sha256 of every other file of the tag;
* ``COMPLETE`` — written last: nothing reads a tag without it.

Every loader checks the files it reads against the manifest and refuses a corrupt or
altered one with :class:`CorruptCheckpoint` naming it. The checksums catch corruption
(storage, a partial copy, a flipped bit); they do not stop someone who can rewrite the
manifest too: DeepSpeed's own ``*_states.pt`` files are still pickles that DeepSpeed loads
with ``weights_only=False`` (see the README).

:class:`CheckpointManager` is what training uses: built from the run dir, the host's
staging dir and the stateful parts (engine, EMA, data stream), it saves (stage, checksum,
publish, marker last, prune once) and resumes. The functions below it are its pieces, also
used by evaluation and export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.rundir import CHECKPOINTS, MARKER, Checkpoints, RunDir, is_local, step_of, tag_for  # noqa: F401  (tags are the run dir's)

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
META_FILE = "meta.json"  # also the manifest: the one file it cannot cover is itself (plain JSON, checked on read)
CONFIG_FILE = "config.yaml"
UNIVERSAL = "universal"  # a host's conversions for another world size, under its staging dir
VARIANTS = ("raw", "ema")  # the weights of a checkpoint an evaluator can read
_HASH_CHUNK = 8 << 20


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that is missing, or differs from the size or sha256 its manifest records.

    ``problem``: the first file at fault and why, in one line (``<path>: <why>``)."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def variants(tag_dir: str | os.PathLike) -> list[str]:
    """The weight variants a (local) checkpoint holds: ``raw``, plus ``ema`` when it has an EMA."""
    return ["raw"] + (["ema"] if (Path(tag_dir) / EMA_FILE).is_file() else [])


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tags of the complete checkpoints in a local ``ckpt_dir``, oldest first."""
    return Checkpoints(str(ckpt_dir)).complete_tags()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def staging_dir(output_dir: str) -> str:
    """This host's staging dir: DeepSpeed writes and reads checkpoint files here."""
    return str(Path(output_dir) / CHECKPOINTS)  # the run dir's layout, so a local run dir is its own staging dir


def universal_dir(staging: str) -> str:
    """Where a host keeps its universal conversions (``<staging>/universal/<tag>``): not a tag
    name, so the run's listing, publishing and pruning never see them."""
    return str(Path(staging) / UNIVERSAL)


def is_universal(tag_dir: str | os.PathLike) -> bool:
    """A checkpoint converted by ``to_universal`` (loads on any world size)."""
    return (Path(tag_dir) / "zero").is_dir()


def read_meta(tag_dir: str | os.PathLike) -> dict:
    """A complete local checkpoint's ``meta.json`` (its manifest included)."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {MARKER} marker)")
    try:
        meta = json.loads((tag_dir / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{tag_dir / META_FILE}: not a readable checkpoint manifest ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
        raise CorruptCheckpoint(
            f"{tag_dir / META_FILE}: not a checkpoint manifest (expected a JSON object with 'files')"
        )
    return meta


def saved_config(tag_dir: str | os.PathLike):
    """A complete local checkpoint's resolved config (checked against its manifest) and meta."""
    from omegaconf import OmegaConf

    from pipeline.config import from_container

    meta = read_meta(tag_dir)
    check_files(tag_dir, [CONFIG_FILE])
    return from_container(OmegaConf.to_container(OmegaConf.load(Path(tag_dir) / CONFIG_FILE))), meta


# ---------------------------------------------------------------- integrity


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload(tag_dir: Path) -> list[str]:
    """The files a manifest covers: every file of the tag but the marker, meta.json and temporaries."""
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name not in (MARKER, META_FILE) and not p.name.endswith(".tmp")
    )


def _my_share(names: list[str]) -> list[str]:
    """This rank's share of a host's files: the ranks of a host hash or check them in parallel."""
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not dist.is_initialized():
        local, local_world = 0, 1
    return names[local :: max(1, local_world)]


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def manifest(tag_dir: str | os.PathLike, collective: bool = True) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` of every payload file of a tag, over all hosts (a
    collective when distributed: each rank hashes its share of its host's files); with
    ``collective=False`` this process hashes every file of its local copy alone."""
    tag_dir = Path(tag_dir)
    names = _payload(tag_dir)
    mine = {
        name: {"size": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)}
        for name in (_my_share(names) if collective else names)
    }
    merged: dict[str, dict] = {}
    for part in _gather(mine) if collective else [mine]:
        for name, entry in part.items():
            merged.setdefault(name, entry)  # the lowest rank's copy, as publish's order has it
    return dict(sorted(merged.items()))


def check_files(tag_dir: str | os.PathLike, names: list[str] | None = None, collective: bool = False) -> None:
    """Check a tag's files (all it lists, or ``names``) against its manifest; raise
    :class:`CorruptCheckpoint` naming the first that does not match. ``collective``: every rank
    calls it and checks a share of its host's files; all raise the same error."""
    tag_dir = Path(tag_dir)
    errors: list[str] = []
    try:
        files = read_meta(tag_dir).get("files")
    except CorruptCheckpoint as e:  # into the gather below, so that no rank waits there alone
        files, errors = {}, [str(e)]
    if files is None:
        log.warning("%s has no checksums (written before they were recorded): not checked", tag_dir)
    elif not errors:
        wanted = sorted(files) if names is None else sorted(names)
        for name in _my_share(wanted) if collective else wanted:
            if (problem := _problem(tag_dir, name, files.get(name))) is not None:
                errors.append(problem)
                break
    if collective:
        errors = [e for part in _gather(errors) for e in part]
    if errors:
        raise CorruptCheckpoint(
            f"{errors[0]}; the checkpoint cannot be trusted: resume from an earlier tag "
            "(delete this one) or restore the file from a copy",
            problem=errors[0],
        )


def verify(tag_dir: str | os.PathLike, collective: bool = False) -> str | None:
    """The first problem of a tag's files (``<path>: <why>``), None when every file matches
    its manifest (``collective``: as :func:`check_files`, every rank gets the same answer)."""
    try:
        check_files(tag_dir, collective=collective)
    except CorruptCheckpoint as e:
        return e.problem
    return None


def _problem(tag_dir: Path, name: str, entry: dict | None) -> str | None:
    path = tag_dir / name
    if entry is None:
        return f"{path}: not in the checkpoint's manifest ({tag_dir / META_FILE})"
    if not path.is_file():
        return f"{path}: missing (the manifest lists it)"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest says {entry['size']}"
    if sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 differs from the manifest's (the file is corrupt or was altered)"
    return None


def _listed_rank_files(tag_dir: Path, meta: dict) -> list[Path]:
    files = meta.get("files")
    names = (
        [n for n in files if n.startswith("rank_") and n.endswith(".pt")]
        if files is not None
        else [p.name for p in tag_dir.glob("rank_*.pt")]
    )
    return sorted((tag_dir / n for n in names), key=lambda p: int(p.stem.split("_")[1]))


# ---------------------------------------------------------------- RNG and our per-rank file


def rng_state() -> dict:
    """The RNG states of this process, as tensors and plain values (loadable with weights_only)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(
            (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    else:  # a rank file from before the RNG state was plain values
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_rank_file(path: Path) -> dict:
    """Our own per-rank state: tensors and plain values only; a file that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpoint(
            f"{path}: refused, not plain checkpoint data ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


# ---------------------------------------------------------------- save and load (every rank calls them)


def save(
    engine,
    ckpt_dir: str,
    step: int,
    meta: dict,
    rank_state: dict,
    config_yaml: str,
    keep: int = 0,
    ema=None,
    one_dir: bool = True,
    expected: float = 0,
) -> str:
    """Save a checkpoint from every rank (all ranks must call this) into the local ``ckpt_dir``,
    with its manifest, and mark it complete; prune ``ckpt_dir`` to the ``keep`` newest.

    The tag dir is emptied first (``one_dir``: every host's ``ckpt_dir`` is the same directory,
    so global rank 0 empties and prunes it; else each host's local rank 0 its own): DeepSpeed
    never clears it, and files of an earlier attempt at this step (a failed save, another world
    size or precision, another run sharing the dir) would join the manifest. A tag whose files
    are not one save's (:func:`layout_problem`) is refused with :class:`CorruptCheckpoint`,
    unmarked. A full disk (``expected``: the bytes a tag needs, see ``data_prep.disk``) removes
    what was written and raises :class:`~data_prep.disk.DiskFull` in one line.
    ``ema`` (a :class:`pipeline.ema.EMA`): its pieces go into each rank's file (exact resume),
    its whole weights into ``ema.safetensors`` (evaluation)."""
    from data_prep.disk import DiskFull, full_message, is_full

    tag = tag_for(step)
    tag_dir = Path(ckpt_dir) / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = rank == 0 if one_dir else int(os.environ.get("LOCAL_RANK", 0)) == 0
    _empty(tag_dir, mine)
    try:
        _write_tag(engine, ckpt_dir, tag, meta, rank_state, config_yaml, ema, rank)
        files = manifest(tag_dir)  # a collective: each rank hashes a share of its host's files
        world = int(meta.get("world_size") or (dist.get_world_size() if dist.is_initialized() else 1))
        if (problem := layout_problem(list(files), world)) is not None:  # the same verdict on every rank
            raise CorruptCheckpoint(
                f"{tag_dir}: not published, its files are not one save's: {problem}", f"{tag_dir}: {problem}"
            )
        if rank == 0:
            _write_atomic(tag_dir / META_FILE, json.dumps({**meta, "step": step, "tag": tag, "files": files}, indent=2))
            _write_atomic(tag_dir / MARKER, "")
    except Exception as e:
        if not is_full(e, ckpt_dir, expected):
            raise
        (tag_dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir, ignore_errors=True)  # nothing of it stays visible or takes room
        latest = latest_tag(ckpt_dir)
        raise DiskFull(
            full_message(
                tag_dir, e, expected, f"its partial files were removed; the newest complete checkpoint is {latest}"
            )
        ) from None
    if mine and keep > 0:
        # The tag just saved is kept whatever its step: a scratch dir may still hold higher tags
        # of another run or of a timeline a rollback left, which would otherwise outrank it.
        others = [t for t in complete_tags(ckpt_dir) if t != tag]
        for old in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _empty(tag_dir: Path, mine: bool) -> None:
    """An empty ``tag_dir`` for a save to write into (``mine``: this process empties it); all wait."""
    if mine and tag_dir.exists():
        (tag_dir / MARKER).unlink(missing_ok=True)  # no reader takes a tag being emptied for complete
        left = [p.name for p in tag_dir.rglob("*") if p.is_file()]
        shutil.rmtree(tag_dir)
        if left:
            log.warning(
                "%s held %d file(s) of an earlier save at this step (%s): removed before this save",
                tag_dir,
                len(left),
                ", ".join(sorted(left)[:4]) + (", ..." if len(left) > 4 else ""),
            )
    if dist.is_initialized():
        dist.barrier()


def _write_tag(engine, ckpt_dir: str, tag: str, meta: dict, rank_state: dict, config_yaml: str, ema, rank: int) -> None:
    """Every file of a save: DeepSpeed's, the EMA's, this rank's own, the config (all ranks; all wait)."""
    from safetensors.torch import save_file

    # universal_checkpoint_info lets ds_to_universal convert this for another world size.
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"universal_checkpoint_info": {}, "meta": meta})
    tag_dir = Path(ckpt_dir) / tag
    if ema is not None:
        rank_state = {**rank_state, "ema": ema.state_dict()}
        weights = ema.full_state_dict()  # a collective: every rank
        if rank == 0:
            save_file(
                weights,
                str(tag_dir / EMA_FILE),
                metadata={
                    "format": "pt",
                    "tag": tag,
                    "variant": "ema",
                    "decay": str(ema.decay),
                    "updates": str(ema.updates),
                },
            )
    torch.save({**rank_state, "rng": rng_state()}, tag_dir / rank_file(rank))
    if rank == 0:
        (tag_dir / CONFIG_FILE).write_text(config_yaml)
    if dist.is_initialized():
        dist.barrier()


_ZERO_FILE = re.compile(r"^(?P<prefix>.*?)zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?P<kind>optim|model)_states\.pt$")
_RANK_FILE = re.compile(r"^rank_(?P<rank>\d+)\.pt$")


def layout_problem(names: list[str], world_size: int) -> str | None:
    """Why the files of a tag are not one save's at ``world_size``, None when they are: our rank
    files and DeepSpeed's ZeRO shards must come one per rank ``0..world_size-1``, each kind under
    one name prefix (``bf16_`` or none: one precision)."""
    ranks = sorted(int(m["rank"]) for n in names if (m := _RANK_FILE.match(n)))
    if ranks and ranks != list(range(world_size)):
        return f"rank files of ranks {ranks}, the save's world size is {world_size}"
    shards: dict[str, dict[str, list[int]]] = {}
    for n in names:
        if m := _ZERO_FILE.match(n):
            shards.setdefault(m["kind"], {}).setdefault(m["prefix"], []).append(int(m["rank"]))
    for kind, by_prefix in shards.items():
        if len(by_prefix) > 1:
            return (
                f"{kind} shards of {len(by_prefix)} kinds ({', '.join(repr(p) for p in sorted(by_prefix))} prefixes: "
                "two precisions or two runs)"
            )
        [(prefix, got)] = by_prefix.items()
        if sorted(got) != list(range(world_size)):
            return f"{prefix}zero_pp_rank_* {kind} shards of ranks {sorted(got)}, the save's world size is {world_size}"
    return None


def load(engine, ckpt_dir: str, tag: str, checked: bool = False) -> tuple[dict, dict | None]:
    """Load engine state (model, optimizer, scheduler) and this rank's own state, after checking
    every file against the manifest (a collective: every rank checks a share; ``checked``: the
    caller just did).

    Returns ``(meta, rank_state)``. On the world size it was saved with, ``rank_state`` is this
    rank's own (data-stream position; RNG states restored). On another world size (a universal
    checkpoint) it holds only ``{"data": ...}`` merged from every saved rank, RNG states are
    left alone, and the data stream, seeing another world size, starts at the pass after the
    furthest one any reader had begun: the rest of an interrupted pass is skipped, no sample
    of it is repeated. ``rank_state`` is None when no rank file is there.
    """
    tag_dir = Path(ckpt_dir) / tag
    meta = read_meta(tag_dir)
    if not checked:
        check_files(tag_dir, collective=True)
    # per source, not per engine: a rollback after a universal resume loads a plain tag
    engine._config.load_universal_checkpoint = is_universal(tag_dir)
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    _replay_cpu_adam_beta_powers(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = tag_dir / rank_file(rank)
    rank_state = None
    if own.is_file() and meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        rank_state = _load_rank_file(own)
        set_rng_state(rank_state.pop("rng"))
    elif rank_files := _listed_rank_files(tag_dir, meta):
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
    """Every saved rank's data-stream state in one (as saved: old world size)."""
    from pipeline.data import merge_states

    return merge_states([_load_rank_file(f).get("data") or {} for f in rank_files])


def load_ema_full(tag_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int] | None:
    """A checkpoint's whole EMA weights and their update count (checked), or None without an EMA."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(tag_dir) / EMA_FILE
    if not path.is_file():
        return None
    check_files(tag_dir, [EMA_FILE])
    with safe_open(str(path), "pt") as f:
        updates = int((f.metadata() or {}).get("updates", 0))
    return load_file(str(path)), updates


def load_fp32_weights(ckpt_dir: str, tag: str, variant: str = "raw") -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a complete local checkpoint, on CPU, after checking its files.

    Works for every ZeRO stage (for stage 0 the module's own weights are read). ``variant``
    ``ema`` reads the checkpoint's EMA weights instead.
    """
    tag_dir = Path(ckpt_dir) / tag
    read_meta(tag_dir)
    if variant not in VARIANTS:
        raise ValueError(f"unknown weights variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "ema":
        ema = load_ema_full(tag_dir)
        if ema is None:
            raise FileNotFoundError(f"{tag_dir} has no EMA weights ({EMA_FILE}); was train.ema.decay 0?")
        return ema[0]
    check_files(tag_dir, [n for n in _payload(tag_dir) if n.endswith(".pt") and not n.startswith("rank_")])
    if any(tag_dir.glob("*optim_states.pt")):
        from pipeline.ds_ops import import_deepspeed

        import_deepspeed()  # not MLflow with it: an evaluation task that publishes nothing needs none
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def export_safetensors(ckpt_dir: str, tag: str, out_path: str, variant: str = "raw") -> str:
    """Write a checkpoint's consolidated fp32 weights (timm names) as safetensors."""
    return write_weights(load_fp32_weights(ckpt_dir, tag, variant), out_path, tag, variant)


def write_weights(state: dict[str, torch.Tensor], out_path: str, tag: str, variant: str) -> str:
    """The one writer of exported weights (timm names): every export form holds these bytes."""
    from safetensors.torch import save_file

    save_file(state, out_path, metadata={"format": "pt", "tag": tag, "variant": variant})
    # safetensors writes the metadata keys in a hash map's order, which varies from run to run:
    # sorted, the same weights are the same bytes (the header keeps its length and padding).
    with open(out_path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text.ljust(size))
    return out_path


def to_universal(ckpt_dir: str, tag: str, out_dir: str) -> str:
    """Convert a complete checkpoint to DeepSpeed's universal format for another world size.

    Runs DeepSpeed's own ``ds_to_universal`` on the checked files, carries our files along
    with a new manifest and the marker; resume from the returned tag dir with
    ``train.resume_from=<it>``.
    """
    import subprocess
    import sys

    src = Path(ckpt_dir) / tag
    meta = read_meta(src)
    check_files(src)
    dst = Path(out_dir) / tag
    if dst.exists():  # an interrupted conversion: its marker was never written
        shutil.rmtree(dst)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.ds_ops",  # DeepSpeed's script, DeepSpeed imported without MLflow
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(src),
            "--output_folder",
            str(dst),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        check=True,
    )
    # Rank files too: their data-stream positions tell a resume on another world size where
    # the next pass starts (see ``load``).
    for path in [src / CONFIG_FILE, *_listed_rank_files(src, meta), *src.glob(EMA_FILE)]:
        shutil.copy2(path, dst / path.name)
    _write_atomic(dst / META_FILE, json.dumps({**meta, "files": manifest(dst, collective=False)}, indent=2))
    _write_atomic(dst / MARKER, "")
    return str(dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the manager training uses


@dataclass(frozen=True)
class SaveSchedule:
    """When training saves: every ``every`` steps, at the ``last`` step, at ``stop_at``
    (``train.stop_at_step``; 0: never) and when the ranks stop; ``at_start``: step 0 of a run
    that has no checkpoint yet (``train.checkpoint_at_start``)."""

    every: int
    last: int
    stop_at: int = 0
    at_start: bool = False

    def due(self, step: int) -> bool:
        """Whether ``step`` is a save step of the schedule (a stop aside)."""
        return step % self.every == 0 or step == self.last or step == self.stop_at


class CheckpointManager:
    """A run's checkpoints as training sees them: the run dir (the system of record), this
    host's staging dir (where DeepSpeed writes and reads), the stateful parts that a
    checkpoint holds (the engine, an EMA, the data stream's position, the RNG states, the
    guard), and when training saves (``schedule``, with the guard's veto: :meth:`should_save`).

    Every rank calls :meth:`prepare`, :meth:`resume` and :meth:`save` together.
    """

    def __init__(
        self,
        run: RunDir,
        staging: str,
        resume_from: str | None = None,
        keep: int = 0,
        on_corrupt: str = "set_aside",
        schedule: SaveSchedule | None = None,
    ):
        self.run, self.staging, self.resume_from, self.keep = run, staging, resume_from, keep
        self.schedule = schedule
        self.on_corrupt = str(on_corrupt)  # train.on_corrupt_checkpoint: set_aside | refuse
        self.engine = self.ema = self.stream = self.guard = None
        self.source: tuple[str, str] | None = None  # what prepare() found; resume() loads it
        self.checked = False  # whether prepare() checked the source's files (resume() need not again)
        self.set_aside: list[dict] = []  # the corrupt tags prepare() moved aside: tag, problem, moved_to
        self.tag_bytes = 0.0  # this host's share of one tag, as planned (data_prep.disk): a full disk's message

    @property
    def shared(self) -> bool:
        """Whether the run dir's checkpoints are this host's staging dir (one host, or a shared disk)."""
        return self.run.checkpoints.url == self.staging

    def track(self, engine=None, ema=None, stream=None, guard=None) -> None:
        """Register the stateful parts (``stream``: anything with ``state_dict()``; ``guard``:
        with ``state_dict()`` and ``load_state_dict()``, the same on every rank)."""
        self.engine = engine or self.engine
        self.ema = ema or self.ema
        self.stream = stream or self.stream
        self.guard = guard or self.guard

    def latest(self) -> str | None:
        """The run's newest complete tag (the run dir decides, not a host's scratch)."""
        return self.run.checkpoints.latest()

    def save_at_start(self, step: int) -> bool:
        """Whether a run starting at ``step`` saves first: step 0 of a run with no checkpoint yet,
        when the schedule says so. The run dir decides, as every rank sees the same one: a host's
        scratch dir may hold an earlier run's tags (same output_dir), and ranks that disagreed
        would hang in :meth:`save`."""
        return self.schedule.at_start and step == 0 and self.latest() is None

    def should_save(self, step: int, stopping: bool, healthy: bool) -> bool:
        """Whether to save after ``step``: a save step of the schedule, or a stop (``stopping``),
        unless the guard vetoes it (an unhealthy step within ``train.guard.bad_window``); the
        last step is saved when it was ``healthy`` itself. The same on every rank."""
        if not (self.schedule.due(step) or stopping):
            return False
        if self.guard is None or self.guard.may_checkpoint(step) or (step == self.schedule.last and healthy):
            return True
        log.warning(
            "step %d: no checkpoint, an unhealthy step is within train.guard.bad_window=%d steps",
            step,
            self.guard.cfg.bad_window,
        )
        return False

    def prepare(self) -> tuple[str, str] | None:
        """Bring the tag to resume from onto this host (each host's local rank 0 fetches; all
        wait) and return it as ``(local dir, tag)``, or None for a fresh start. A checkpoint
        saved at another world size comes back converted to the universal format (see
        :meth:`_reshard`). Call before the engine is built: a universal source changes its
        config (:func:`is_universal`).

        The tag is checked against its manifest first; a corrupt one of the run's own is set
        aside (:meth:`_set_aside`) and the next newest is tried, unless ``on_corrupt`` is
        ``refuse``: then, as for a corrupt ``resume_from``, :class:`CorruptCheckpoint` is raised."""
        self.source = self._first_sound_source()
        self.checked = self.source is not None
        if self.source is not None:
            found = self.source
            self.source = self._reshard(*self.source)
            self.checked = self.source == found  # a conversion reused from disk is checked when loaded
        return self.source

    def _first_sound_source(self) -> tuple[str, str] | None:
        refetched: set[str] = set()
        while True:
            fetch_resume_checkpoint(self.staging, self.run, self.resume_from)
            ours = self.run.checkpoints.latest() is not None  # resume_source prefers the run's own tag
            source = resume_source(self.staging, self.run, self.resume_from)
            if source is None:
                return None
            if (problem := verify(Path(*source), collective=True)) is None:
                return source
            tag = source[1]
            if not ours or self.on_corrupt == "refuse":
                raise CorruptCheckpoint(
                    f"{problem}; the checkpoint cannot be trusted "
                    f"({'train.on_corrupt_checkpoint=refuse' if ours else 'train.resume_from'}): "
                    f"move {Path(*source)} aside or restore the file from a copy, then rerun",
                    problem,
                )
            if not self.shared and tag not in refetched:  # perhaps only this host's copy went bad: fetch it once more
                refetched.add(tag)
                self._drop_local(tag)
                continue
            self._set_aside(tag, problem)

    def _drop_local(self, tag: str) -> None:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            shutil.rmtree(Path(self.staging) / tag, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def _set_aside(self, tag: str, problem: str) -> None:
        """Move the run's corrupt tag ``tag`` to ``checkpoints/_corrupt`` (global rank 0; each
        host drops its local copy); all ranks then look for the next newest."""
        event = {"tag": tag, "problem": problem, "moved_to": None}
        if not dist.is_initialized() or dist.get_rank() == 0:
            note = {
                **event,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            event["moved_to"] = self.run.checkpoints.set_aside(tag, note)
            log.warning(
                "checkpoint %s/%s is corrupt (%s): set aside in %s; resuming from the newest checkpoint that "
                "verifies (train.on_corrupt_checkpoint=refuse stops instead)",
                self.run.checkpoints.url,
                tag,
                problem,
                event["moved_to"],
            )
        if dist.is_initialized():
            dist.barrier()
        if not self.shared:
            self._drop_local(tag)
        self.set_aside.append(event)

    def _reshard(self, ckpt_dir: str, tag: str) -> tuple[str, str]:
        """``(ckpt_dir, tag)`` itself when it loads at this world size, else its universal
        conversion in this host's :func:`universal_dir`: each host's local rank 0 converts
        (every host has the whole tag after the fetch) unless a complete one is there; all wait."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved = read_meta(Path(ckpt_dir) / tag).get("world_size")
        if is_universal(Path(ckpt_dir) / tag) or saved in (None, world):
            return ckpt_dir, tag
        out = universal_dir(self.staging)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            if (Path(out) / tag / MARKER).is_file():
                log.warning(
                    "checkpoint %s saved at world size %s, resuming at %d: its universal conversion %s/%s is reused",
                    tag,
                    saved,
                    world,
                    out,
                    tag,
                )
            else:
                for old in Path(out).glob("*"):  # conversions of older tags are of no further use
                    if old.name != tag and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
                t0 = time.perf_counter()
                to_universal(ckpt_dir, tag, out)
                log.warning(
                    "checkpoint %s saved at world size %s, resuming at %d: converted to universal in %s/%s (%.1f s)",
                    tag,
                    saved,
                    world,
                    out,
                    tag,
                    time.perf_counter() - t0,
                )
        if dist.is_initialized():
            dist.barrier()
        return out, tag

    def resume(self) -> tuple[dict, dict | None]:
        """Load the engine, EMA and RNG states from the source :meth:`prepare` found; returns
        ``(meta, data-stream state)``, ``({}, None)`` for a fresh start."""
        if self.source is None:
            return {}, None
        meta, rank_state = self._load(*self.source, checked=self.checked)
        log.info("resumed from %s/%s at step %d", *self.source, self.engine.global_steps)
        return meta, (rank_state or {}).get("data")

    def rollback(self, tag: str) -> dict:
        """Load complete checkpoint ``tag`` of the run (fetched here if this host lacks it) into
        every tracked part but the data stream, which goes on from where it is; returns its meta."""
        if not self.shared:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                self.run.checkpoints.fetch(tag, self.staging)  # a complete local copy is kept as it is
            if dist.is_initialized():
                dist.barrier()
        meta, _ = self._load(*self._reshard(self.staging, tag))  # saved before a resize: converted
        log.info("rolled back to %s/%s", self.run.checkpoints.url, tag)
        return meta

    def _load(self, ckpt_dir: str, tag: str, checked: bool = False) -> tuple[dict, dict | None]:
        meta, rank_state = load(self.engine, ckpt_dir, tag, checked)
        if self.ema is not None:
            _restore_ema(self.ema, rank_state, Path(ckpt_dir) / tag)
        if self.guard is not None and rank_state and "guard" in rank_state:
            self.guard.load_state_dict(rank_state["guard"])
        return meta, rank_state

    def save(self, step: int, meta: dict, config_yaml: str) -> str:
        """Stage a checkpoint of every tracked part, publish it to the run dir (files, then the
        marker), prune to ``keep``; returns its tag."""
        data = {"data": self.stream.state_dict()} if self.stream is not None else {}
        if self.guard is not None:
            data["guard"] = self.guard.state_dict()
        # A remote run dir's tags are kept there: this host keeps its newest copy (a fast local resume).
        tag = save(
            self.engine,
            self.staging,
            step,
            meta,
            data,
            config_yaml,
            self.keep if self.shared else 1,
            ema=self.ema,
            one_dir=self.shared,
            expected=self.tag_bytes,
        )
        publish_checkpoint(self.run, self.staging, tag, self.keep)
        log.info("checkpoint %s/%s complete", self.run.checkpoints.url, tag)
        return tag


def _restore_ema(ema, rank_state: dict | None, tag_dir: Path) -> None:
    """This rank's EMA pieces from its own rank file, else (another world size) cut from the
    checkpoint's whole EMA weights; a checkpoint without an EMA starts it from the weights."""
    if rank_state and "ema" in rank_state:
        ema.load_state_dict(rank_state.pop("ema"))
    elif (full := load_ema_full(tag_dir)) is not None:
        ema.load_full(*full)
    else:
        log.warning("%s has no EMA: the EMA starts from the loaded weights", tag_dir)
        ema.reset()


def resume_source(own: str, run: RunDir, resume_from: str | None) -> tuple[str, str] | None:
    """``(local checkpoint dir, tag)`` to start from: the run's own latest complete checkpoint
    (a rerun after a stop or preemption keeps its progress; ``own`` is this host's staging
    dir), else ``resume_from`` (``train.resume_from``), else None. Call
    :func:`fetch_resume_checkpoint` first so the run dir's latest is here."""
    # The run dir decides: a tag in this host's scratch dir that the run dir lacks is another run's.
    tag = latest_tag(own) if run.checkpoints.url == own else run.checkpoints.latest()
    if tag is not None:
        return own, tag
    if resume_from:
        src = resume_from.rstrip("/")
        if not is_local(src):  # a tag dir on object storage: its local copy
            return own, src.rsplit("/", 1)[1]
        return str(Path(src).parent), Path(src).name
    return None


def fetch_resume_checkpoint(own: str, run: RunDir, resume_from: str | None) -> None:
    """Each host's local rank 0 copies the run dir's latest complete checkpoint (or an object-
    storage ``resume_from``) into its staging dir ``own`` when it has none as new; all wait."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        local = latest_tag(own)
        if run.checkpoints.url != own:
            local = run.checkpoints.latest()
            if local is not None:
                run.checkpoints.fetch(local, own)  # a complete local copy is kept as it is
        if local is None and resume_from and not is_local(resume_from):
            parent, tag = resume_from.rstrip("/").rsplit("/", 1)
            Checkpoints(parent).fetch(tag, own)
    if dist.is_initialized():
        dist.barrier()


def publish_checkpoint(run: RunDir, ckpt_dir: str, tag: str, keep: int) -> None:
    """Put a saved checkpoint into the run dir when that is not this host's staging dir: every
    host's local rank 0 its files, then, after a barrier, global rank 0 the marker (all ranks
    call this)."""
    if run.checkpoints.url == ckpt_dir:
        return
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:  # an earlier attempt's upload at this step (no marker): its files are not this save's
        run.checkpoints.remove(tag, missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        _upload(run, Path(ckpt_dir) / tag, tag)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        listed = set(json.loads((Path(ckpt_dir) / tag / META_FILE).read_text())["files"]) | {META_FILE}
        if (there := run.checkpoints.files(tag)) != listed:
            raise CorruptCheckpoint(
                f"{run.checkpoints.tag_url(tag)}: not marked complete, its files differ from its "
                f"manifest (extra {sorted(there - listed)}, missing {sorted(listed - there)})"
            )
        run.checkpoints.publish(Path(ckpt_dir) / tag, tag, marker=True)
        run.checkpoints.keep_latest(keep)
    if dist.is_initialized():
        dist.barrier()


def _upload(run: RunDir, tag_dir: Path, tag: str) -> None:
    """This host's files of a tag to the run dir; a full store or quota removes the partial
    upload and raises :class:`~data_prep.disk.DiskFull` in one line."""
    from data_prep.disk import DiskFull, full_message, is_full

    try:
        run.checkpoints.publish(tag_dir, tag, marker=False)
    except Exception as e:
        if not is_full(e):
            raise
        try:
            run.checkpoints.remove(tag, missing_ok=True)
        except Exception as cleanup:  # the store may refuse even that: the tag has no marker either way
            log.warning("could not remove the partial upload %s: %s", run.checkpoints.tag_url(tag), cleanup)
        raise DiskFull(full_message(run.checkpoints.tag_url(tag), e, then="the partial upload was removed")) from None


USAGE = """usage: python -m pipeline.checkpoint COMMAND ...
  verify <tag dir>                    check every file of a local checkpoint against its manifest
  universal <ckpt dir> <tag> <out>    convert a checkpoint for another world size (DeepSpeed's
                                      universal format); resume with train.resume_from=<out>/<tag>
  export <run dir | ckpt dir> <tag|latest> <out> [raw|ema] [--format timm|hf|mlflow]
         [--register NAME [--tracking-uri URI]]
                                      consolidated fp32 weights (any fsspec URL, from any host):
                                      timm: <out> is a .safetensors file (timm names);
                                      hf: <out> a transformers folder (config.json,
                                      model.safetensors, preprocessor_config.json, README.md);
                                      mlflow: <out> an MLflow Model folder; --register logs it
                                      to the run's MLflow run and registers it as NAME"""


def main(argv: list[str] | None = None) -> int:
    """A checkpoint from the shell; exits 1 with the file named when one is corrupt."""
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if cmd == "verify" and len(args) == 1:
            check_files(args[0])
            print(f"{args[0]}: every file matches its manifest")
        elif cmd == "universal" and len(args) == 3:
            print(to_universal(*args))
        elif cmd == "export" and args:
            # by name: the export command needs this module, pipeline.export and pipeline.mlflow_model
            return importlib.import_module("pipeline.export_cli").main(args)
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except (CorruptCheckpoint, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
