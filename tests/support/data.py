"""Small real data: JPEG shards written the way data_prep writes them, digits shards, checkpoints."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_shards(
    out: Path,
    num_classes: int = 4,
    per_shard: list[int] | None = None,
    size: int = 16,
    seed: int = 0,
    corrupt_keys: tuple[str, ...] = (),
    split: str = "train",
) -> str:
    """Write class-coloured JPEG shards plus a ``{split}_index.json``; returns the index path.

    Each class is a distinct colour pattern so a tiny model can learn it in a few steps.
    """
    import webdataset as wds

    per_shard = per_shard or [24, 24]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shardlist, key = [], 0
    for s, n in enumerate(per_shard):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for _ in range(n):
                label = key % num_classes
                img = np.zeros((size, size, 3), np.uint8)
                img[..., label % 3] = 60 + 60 * (label // 3)
                img[: size // 2, :, (label + 1) % 3] = 200 if label % 2 else 0
                img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=95)
                k = f"{key:09d}"
                data = b"\xff\xd8 not a jpeg" if k in corrupt_keys else buf.getvalue()
                sink.write(
                    {
                        "__key__": k,
                        "jpg": data,
                        "cls": str(label).encode(),
                        "json": json.dumps({"labels": [label]}).encode(),
                    }
                )
                key += 1
        shardlist.append({"url": name, "nsamples": n, "filesize": (out / name).stat().st_size, "md5sum": ""})
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": split,
        "shardlist": shardlist,
        "num_samples": sum(per_shard),
        "num_classes": num_classes,
        "classes": [f"c{i}" for i in range(num_classes)],
        "multi_label": False,
    }
    path = out / f"{split}_index.json"
    path.write_text(json.dumps(index))
    return str(path)


def write_digits_shards(out: Path, size: int = 32) -> tuple[str, str]:
    """scikit-learn's digits as data_prep would shard them: 1297 train, 500 test; index paths."""
    import webdataset as wds
    from PIL import Image

    from data_prep.demo import load_digits_images

    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_images(size)
    order = np.random.default_rng(0).permutation(len(labels))
    paths = []
    for split, idx in (("train", order[500:]), ("test", order[:500])):
        with wds.TarWriter(str(out / f"{split}-000000.tar")) as sink:
            for i in idx:
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"digit{i:05d}", "jpg": buf.getvalue(), "cls": str(int(labels[i])).encode()})
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "shardlist": [{"url": f"{split}-000000.tar", "nsamples": len(idx)}],
            "classes": [str(c) for c in range(10)],
            "num_classes": 10,
        }
        (out / f"{split}_index.json").write_text(json.dumps(index))
        paths.append(str(out / f"{split}_index.json"))
    return paths[0], paths[1]


def make_checkpoints(
    out: Path,
    steps: list[int],
    model: str = "vit_tiny_test",
    num_classes: int = 12,
    overrides: tuple[str, ...] = (),
    **model_kw,
) -> str:
    """Real checkpoints of a 1-rank ZeRO-2 engine at ``steps`` (weights nudged between them);
    ``overrides``: more config ``key=value`` settings."""
    from pipeline import checkpoint
    from pipeline.config import load_config, to_yaml
    from pipeline.engine import dist_setup
    from pipeline.recipe import build_engine

    _, _, device = dist_setup(standalone=True)
    overrides = [
        f"model.name={model}",
        "data.train=unused",
        f"output_dir={out}",
        "train.steps=10",
        "train.global_batch_size=8",
        "data.micro_batch_size=8",
        "ray.num_workers=1",
        "deepspeed.zero_stage=2",
        "train.precision=fp32",
        *[f"model.{k}={v}" for k, v in model_kw.items()],
        *overrides,
    ]
    cfg = load_config(None, overrides)
    engine, _ = build_engine(cfg, num_classes, 10, 1, device)
    ckpt_dir = out / "checkpoints"
    for step in steps:
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        meta = {
            "samples_seen": 8 * step,
            "world_size": 1,
            "total_steps": 10,
            "num_classes": num_classes,
            "model": model,
            "image_size": engine.module.spec.img_size,
            "mlflow_run_id": None,
        }
        checkpoint.save(engine, str(ckpt_dir), step, meta, {}, to_yaml(cfg))
    return str(ckpt_dir)


def copy_tags(src: str, dst: Path, tags: list[str], run_id: str | None = None, complete: bool = True) -> str:
    """Copy checkpoint tags into ``dst`` (without the marker: an unfinished save); set the run id."""
    from pipeline import checkpoint

    for tag in tags:
        shutil.copytree(Path(src) / tag, dst / tag)
        meta = json.loads((dst / tag / "meta.json").read_text())
        (dst / tag / "meta.json").write_text(json.dumps({**meta, "mlflow_run_id": run_id}))
        if not complete:
            (dst / tag / checkpoint.MARKER).unlink()
    return str(dst)


def eval_cfg(digits, finetune: bool = False):
    """An evaluation config over digits shards: few-shot 1/5, and a 3-step fine-tune when asked."""
    from omegaconf import OmegaConf

    from pipeline.config import EvalConfig

    train, test = digits
    fewshot = {
        "name": "digits",
        "train": train,
        "test": test,
        "shots": [1, 5],
        "seeds": 1,
        "crop_ratio": 1.0,
        "batch_size": 250,
    }
    ft = {
        "name": "digits",
        "train": train,
        "test": test,
        "image_size": 24,
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 32,
        "lrs": [0.1],
        "dev_fraction": 0.0,
        "precision": "fp32",
        "crop_min_area": 0.8,
        "flip": False,
        "num_workers": 0,
        "shuffle_buffer": 64,
        "eval_batch_size": 250,
    }
    return OmegaConf.merge(
        OmegaConf.structured(EvalConfig),
        {"fewshot": [fewshot], "finetune": [ft] if finetune else [], "poll_seconds": 0.1},
    )
