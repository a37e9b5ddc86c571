"""Shared fixtures: small real data (JPEG shards written the way data_prep writes them)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def write_shards(out: Path, num_classes: int = 4, per_shard: list[int] | None = None, size: int = 16,
                 seed: int = 0, corrupt_keys: tuple[str, ...] = (), split: str = "train") -> str:
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
                sink.write({"__key__": k, "jpg": data, "cls": str(label).encode(),
                            "json": json.dumps({"labels": [label]}).encode()})
                key += 1
        shardlist.append({"url": name, "nsamples": n, "filesize": (out / name).stat().st_size, "md5sum": ""})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split, "shardlist": shardlist,
             "num_samples": sum(per_shard), "num_classes": num_classes,
             "classes": [f"c{i}" for i in range(num_classes)], "multi_label": False}
    path = out / f"{split}_index.json"
    path.write_text(json.dumps(index))
    return str(path)


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test must not leak environment (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """A moto S3 endpoint on 127.0.0.1 with ``buckets`` made; yields (endpoint, environment for it).

    fsspec keeps one S3FileSystem per set of arguments for the life of the process, and one made
    with no endpoint argument keeps the endpoint of the environment it was made in: a later test
    would reach a stopped server. The cache is cleared on the way in and on the way out.
    """
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint, env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
