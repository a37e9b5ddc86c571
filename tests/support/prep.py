"""Running data_prep and reading back what it wrote."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.config import ImageConfig, PlanningConfig, PrepConfig


def cfg_for(source, output, **kw) -> PrepConfig:
    image = kw.pop("image", ImageConfig())
    return PrepConfig(source=str(source), output=str(output), image=image, **kw)


def run_prep(cfg: PrepConfig) -> dict:
    """`data_prep.job.run_prep`, imported (with Ray) only by the tests that run it."""
    from data_prep.job import run_prep as run

    return run(cfg)


def tar_samples(shard: Path | bytes) -> list[dict]:
    """The samples of one shard as webdataset groups them (key = basename up to first dot)."""
    samples: dict[str, dict] = {}
    source = {"fileobj": io.BytesIO(shard)} if isinstance(shard, bytes) else {"name": shard}
    with tarfile.open(**source) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return list(samples.values())


def all_samples(out: Path, split: str = "train") -> list[dict]:
    index = json.loads((out / f"{split}_index.json").read_text())
    return [s for shard in index["shardlist"] for s in tar_samples(out / shard["url"])]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root; `_stats.json` without its timings."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith("_stats.json"):
                stats = json.loads(data)
                stats.pop("seconds"), stats.pop("cpu_seconds")
                data = json.dumps(stats, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


# A config that plans on Ray whatever the source size (data_prep.plan_ray).
def on_ray(
    source,
    output,
    range_bytes: int = 64 << 20,
    max_tasks: int = 0,
    bucket_bytes: int = 128 << 20,
    folders_per_task: int = 100,
    **kw,
):
    cfg = cfg_for(source, output, **kw)
    cfg.planning = PlanningConfig(
        on_ray_bytes=1,
        on_ray_folders=1,
        range_bytes=range_bytes,
        max_tasks=max_tasks,
        bucket_bytes=bucket_bytes,
        folders_per_task=folders_per_task,
    )
    return cfg


CLASSES = ("cat", "dog", "eel")


PER_CLASS = 8


ODD_NAMES = ("a.b.c photo.jpg", "caf\u00e9 \u00fc\u00f1\u00ee.jpeg", "x y.JPG")


def jpeg(
    w: int = 40, h: int = 30, seed: int = 0, mode: str = "RGB", quality: int = 90, exif_orientation: int | None = None
) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(out, "JPEG", quality=quality, **kwargs)
    return out.getvalue()


def make_folders(root: Path, per_class: int = PER_CLASS, classes=CLASSES, w: int = 40, h: int = 30) -> list[Path]:
    """Class folders of small noisy JPEGs; a few names have dots, spaces and accents."""
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fname = ODD_NAMES[i] if c == 0 and i < len(ODD_NAMES) else f"img_{i:03d}.jpg"
            p = root / name / fname
            p.write_bytes(jpeg(w, h, seed=100 * c + i))
            paths.append(p)
    (root / "README.txt").write_text("not a sample")
    (root / "dog" / ".hidden.jpg").write_bytes(jpeg(seed=9))
    return paths
