"""A real world-size-1 DeepSpeed ZeRO-2 engine (gloo, in this process) and the data stream it
trains on: checkpoints as training writes them, without a process group to start."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def tiny_engine(out: Path, tiny_shards: str):
    """A fresh 1-rank engine and the real data stream it trains on."""
    from pipeline.config import load_config, to_yaml
    from pipeline.data import StreamSpec, TrainStream
    from pipeline.engine import dist_setup
    from pipeline.recipe import build_engine

    _, _, device = dist_setup(standalone=True)
    cfg = load_config(
        None,
        [
            "model.name=vit_tiny_test",
            f"data.train={tiny_shards}",
            f"output_dir={out}",
            "train.steps=10",
            "train.global_batch_size=8",
            "data.micro_batch_size=8",
            "ray.num_workers=1",
            "deepspeed.zero_stage=2",
            "train.precision=fp32",
        ],
    )
    engine, _ = build_engine(cfg, 4, 10, 1, device)
    spec = StreamSpec(
        index_url=tiny_shards,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=8,
        image_size=16,
        num_classes=4,
        seed=0,
        shuffle_block=16,
        crop_area=(0.5, 1.0),
        flip=True,
    )
    return engine, TrainStream(spec), to_yaml(cfg), device


def train_step(engine, stream, device) -> None:
    """One training step as the training loop takes it (``micro_step``)."""
    from pipeline.engine import loss_fn, micro_step

    micro_step(engine, next(stream), functools.partial(loss_fn, kind="softmax"), torch.float32, device)
