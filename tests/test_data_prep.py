"""data_prep: shards, indexes, bad input, resume and object storage, on real Ray and real files.

Tests without the `ray_local` fixture run in-process (on local disk or `memory://`); the
others share one local Ray cluster started once for this module, after a moto S3 server so
that Ray's workers inherit its endpoint and dummy credentials from the environment.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import failures as F
from data_prep.__main__ import main
from data_prep.config import ConfigError, HoldoutConfig, ImageConfig, load_config
from data_prep.index import write_indexes
from data_prep.plan import build_plan
from data_prep.plan_format import load_plan, read_shard_plan
from data_prep.process import process_image, target_size
from data_prep.shard import write_shard
from tests.support.prep import (
    CLASSES,
    all_samples,
    cfg_for,
    jpeg,
    make_folders,
    run_prep,
    tar_samples,
    tree_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
# ---------------------------------------------------------------- building real data


def png(mode: str, w: int = 24, h: int = 20) -> bytes:
    if mode == "I;16":
        img = Image.fromarray((np.arange(w * h).reshape(h, w) * 97 % 65536).astype(np.uint16))
    elif mode == "RGBA":
        a = np.zeros((h, w, 4), np.uint8)
        a[..., 0] = 200
        a[: h // 2, :, 3] = 255  # bottom half fully transparent
        img = Image.fromarray(a, "RGBA")
    elif mode == "P":
        img = Image.new("P", (w, h), 1)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.info["transparency"] = 0
    else:
        img = Image.new(mode, (w, h))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------- per-sample processing


def test_a_rgb_jpeg_within_size_keeps_its_original_bytes():
    data = jpeg(40, 30)
    out = process_image(data, ImageConfig(resize_mode="shorter", size=64))
    assert out.kept_original and out.data == data and (out.width, out.height) == (40, 30)


def test_keep_original_false_always_re_encodes():
    data = jpeg(40, 30)
    out = process_image(data, ImageConfig(keep_original=False, quality=50))
    assert not out.kept_original and out.data != data
    assert Image.open(io.BytesIO(out.data)).size == (40, 30)


def test_resizing_bounds_the_chosen_side_and_records_the_original_size():
    data = jpeg(400, 300)
    shorter = process_image(data, ImageConfig(resize_mode="shorter", size=64))
    longer = process_image(data, ImageConfig(resize_mode="longer", size=64))
    assert Image.open(io.BytesIO(shorter.data)).size == (85, 64)
    assert Image.open(io.BytesIO(longer.data)).size == (64, 48)
    assert (shorter.width, shorter.height) == (400, 300) and not shorter.kept_original
    assert target_size(100, 50, "shorter", 64) is None
    assert target_size(1600, 1200, "shorter", 256) == (341, 256)


def test_exif_orientation_is_applied():
    out = process_image(jpeg(40, 30, exif_orientation=6), ImageConfig())
    assert not out.kept_original
    assert Image.open(io.BytesIO(out.data)).size == (30, 40) == (out.width, out.height)


@pytest.mark.parametrize(
    "data, mode",
    [
        (jpeg(mode="CMYK"), "CMYK"),
        (jpeg(mode="L"), "L"),
        (png("RGBA"), "RGBA"),
        (png("P"), "P"),
        (png("LA"), "LA"),
        (png("I;16"), "I;16"),
    ],
)
def test_any_mode_becomes_an_rgb_jpeg(data, mode):
    out = process_image(data, ImageConfig())
    img = Image.open(io.BytesIO(out.data))
    assert out.mode == mode and img.format == "JPEG" and img.mode == "RGB"


def test_alpha_is_composited_on_white_and_16_bit_is_scaled_not_clipped():
    rgba = np.asarray(Image.open(io.BytesIO(process_image(png("RGBA"), ImageConfig()).data)))
    assert rgba[-1].mean() > 240 and rgba[0, :, 0].mean() > 180 and rgba[0, :, 1].mean() < 60
    gray = np.asarray(Image.open(io.BytesIO(process_image(png("I;16"), ImageConfig()).data)))
    assert 60 < gray.mean() < 200  # clipping would make almost every pixel 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", F.EMPTY_FILE),
        (b"this is a text file named .jpg\n", F.NOT_AN_IMAGE),
        (jpeg(64, 48)[:900], F.TRUNCATED_IMAGE),
        (jpeg(300, 300), F.TOO_MANY_PIXELS),
    ],
)
def test_bad_bytes_raise_a_named_sample_error(data, reason):
    with pytest.raises(F.SampleError) as e:
        process_image(data, ImageConfig(max_pixels=50_000))
    assert e.value.reason == reason


# ---------------------------------------------------------------- config and CLI


def test_config_merges_yaml_then_overrides(tmp_path):
    yaml = tmp_path / "prep.yaml"
    yaml.write_text("source: /data/in\noutput: /data/out\nshard_size: 50\nimage:\n  size: 128\n")
    cfg = load_config(str(yaml), ["image.resize_mode=shorter", "holdout.count=7"])
    assert (cfg.source, cfg.shard_size, cfg.image.size, cfg.holdout.count) == ("/data/in", 50, 128, 7)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["shard_size=ten"], "shard_size"),
        (["image.sise=3"], "image.sise"),
        (["bogus=1"], "bogus"),
        (["image.resize_mode=shorter"], "image.size"),
        (["holdout.name=train"], "holdout.name"),
        ([], "source"),
    ],
)
def test_a_bad_config_is_an_error_naming_the_key(overrides, key, capsys):
    base = [] if key == "source" else ["source=/in", "output=/out"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, base + overrides)
    assert main(base + overrides) == 2
    assert key in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    make_folders(tmp_path / "src")
    out = tmp_path / "out"
    assert main([f"source={tmp_path / 'src'}", f"output={out}", "shard_size=5", "holdout.count=4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "24 samples listed" in text and "classes  3" in text
    assert "val" in text and "train" in text and not out.exists()


def test_example_config_loads():
    cfg = load_config(str(ROOT / "configs" / "data" / "prep_example.yaml"))
    assert cfg.image.resize_mode in ("shorter", "longer", "none")


# ---------------------------------------------------------------- planning


def test_plan_is_a_seeded_shuffle_of_every_sample_across_many_buckets(tmp_path, monkeypatch):
    import data_prep.plan as plan_module

    monkeypatch.setattr(plan_module, "BUCKET_RECORDS", 5)  # force the external shuffle
    files = make_folders(tmp_path / "src")

    def urls(seed: int, out: str) -> tuple[list[str], list[str], object]:
        cfg = cfg_for(tmp_path / "src", tmp_path / out, seed=seed, shard_size=4)
        cfg.holdout.count = 3
        plan = build_plan(cfg)
        recs = {
            s: [r for i in range(sp.num_shards) for r in read_shard_plan(cfg, s, i)] for s, sp in plan.splits.items()
        }
        return [r["url"] for r in recs["val"]], [r["url"] for r in recs["train"]], plan

    val, train, plan = urls(0, "a")
    assert sorted(val + train) == sorted(str(p) for p in files)
    assert len(val) == 3 and plan.splits["train"].shard_counts == [4, 4, 4, 4, 4, 1]
    assert (val, train) == urls(0, "b")[:2]
    assert (val, train) != urls(1, "c")[:2]
    assert train != sorted(train)
    assert plan.ignored == 2 and plan.classes == list(CLASSES)


def test_integer_labels_are_class_indices(tmp_path):
    rows = [{"path": f"{i}.jpg", "labels": [i % 4, 3]} for i in range(6)]
    rows.append({"path": "x.jpg", "label": 7})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = build_plan(cfg_for(tmp_path / "m.jsonl", tmp_path / "out"), write=False)
    assert plan.classes == [str(i) for i in range(8)] and plan.multi_label
    (tmp_path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(4)))
    plan = build_plan(
        cfg_for(tmp_path / "m.jsonl", tmp_path / "out", classes_file=str(tmp_path / "classes.txt")), write=False
    )
    assert plan.failures == {F.UNKNOWN_LABEL: 1} and plan.splits["train"].num_samples == 6


def test_shard_bytes_caps_a_shards_estimated_size(tmp_path):
    files = make_folders(tmp_path / "src")
    biggest = max(p.stat().st_size for p in files)
    cfg = cfg_for(tmp_path / "src", tmp_path / "out", shard_size=100, shard_bytes=3 * biggest)
    plan = build_plan(cfg, write=False)
    assert all(b <= 3 * biggest for b in plan.splits["train"].shard_bytes)
    assert plan.splits["train"].num_shards >= 8 and plan.splits["train"].num_samples == 24


def test_a_rerun_with_other_settings_refuses_the_existing_output(tmp_path):
    make_folders(tmp_path / "src")
    build_plan(cfg_for(tmp_path / "src", tmp_path / "out", seed=0))
    with pytest.raises(ConfigError, match="other settings"):
        load_plan(cfg_for(tmp_path / "src", tmp_path / "out", seed=1))


def test_the_whole_job_runs_in_process_on_memory_storage():
    mem = fsspec.filesystem("memory")
    for c in CLASSES:
        for i in range(5):
            mem.pipe_file(f"/mp/src/{c}/{i}.jpg", jpeg(seed=i + 10 * len(c)))
    cfg = cfg_for("memory://mp/src", "memory://mp/out", shard_size=4)
    plan = build_plan(cfg)
    stats = {"train": [write_shard(cfg, "train", i) for i in range(plan.splits["train"].num_shards)]}
    write_indexes(cfg, plan, stats)
    index = json.loads(mem.cat_file("/mp/out/train_index.json"))
    assert index["num_samples"] == 15 and len(index["shardlist"]) == 4
    keys = []
    for shard in index["shardlist"]:
        with tarfile.open(fileobj=io.BytesIO(mem.cat_file(f"/mp/out/{shard['url']}"))) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers()]
    assert sorted(set(keys)) == [f"{i:09d}" for i in range(15)]
    mem.rm("/mp", recursive=True)


def test_shards_have_the_bytes_webdatasets_own_tar_writer_gives_and_a_task_imports_no_torch(tmp_path):
    """data_prep writes its tars with the standard library (``data_prep.shard.TarShard``):
    webdataset's writer would bring torch into every shard task."""
    from data_prep.shard import TAR_MODE, TAR_MTIME, TAR_USER, TarShard

    meta = json.dumps({"k": "\u00e9"}).encode()
    samples = [{"__key__": f"{i:09d}", "jpg": jpeg(seed=i), "cls": b"3", "json": meta} for i in range(5)]
    samples.append({"__key__": "a" * 120, "jpg": b"", "txt": b"x" * 600_000, "cls": b"0"})  # long name, empty, big
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = TarShard(ours)
    for sample in samples:
        writer.write(sample)
    writer.close()
    reference = wds.TarWriter(theirs, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER, mode=TAR_MODE)
    for sample in samples:
        reference.write(sample)
    reference.close()
    assert ours.getvalue() == theirs.getvalue()
    probe = "import sys, data_prep.job, data_prep.shard; print(sorted({'torch', 'webdataset'} & set(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def missing_manifest(root: Path, n: int, good_every: int = 0) -> Path:
    """A JSONL manifest of `n` paths that do not exist, but every `good_every`-th, which
    is a real JPEG."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if good_every and i % good_every == 0:
            (root / "img" / f"{i}.jpg").write_bytes(jpeg(seed=i))
        lines.append(json.dumps({"path": f"img/{i}.jpg", "label": "x"}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return root / "m.jsonl"


def test_a_shard_whose_first_samples_all_fail_gives_up_and_writes_nothing(tmp_path):
    cfg = cfg_for(missing_manifest(tmp_path, 30), tmp_path / "out", shard_size=30)
    build_plan(cfg)
    stats = write_shard(cfg, "train", 0, give_up_after=10)
    assert stats["gave_up"] is True and stats["count"] == 10 and stats["successes"] == 0
    assert stats["failures"] == {F.MISSING_FILE: 10}
    assert str(tmp_path / "img") in stats["examples"][F.MISSING_FILE]
    assert sorted(os.listdir(tmp_path / "out")) == ["_plan"], "no tar, no stats, no temp file"
    assert write_shard(cfg, "train", 0)["failures"] == {F.MISSING_FILE: 30}
    assert (tmp_path / "out" / "train-000000_stats.json").exists()


def test_a_shard_with_one_good_sample_among_its_first_does_not_give_up(tmp_path):
    cfg = cfg_for(missing_manifest(tmp_path, 30, good_every=7), tmp_path / "out", shard_size=30)
    build_plan(cfg)
    stats = write_shard(cfg, "train", 0, give_up_after=29)
    assert "gave_up" not in stats and stats["count"] == 30 and stats["successes"] == 5


def test_failure_watch_stops_when_certain_or_overwhelmingly_likely():
    watch = F.FailureWatch(listed=1000, max_fraction=0.1, remaining=1000)
    assert watch.verdict() is None
    watch.finished(
        "a",
        {
            "count": 100,
            "successes": 91,
            "failures": {F.MISSING_FILE: 9},
            "examples": {F.MISSING_FILE: "/x/0.jpg: gone"},
        },
    )
    assert watch.verdict() is None, "9% failed: within 10%"
    watch.gave_up("b", {"count": 100, "successes": 0, "failures": {F.MISSING_FILE: 100}, "examples": {}})
    assert watch.verdict() == "likely", "109 of 200 read failed: the rest will exceed 10%"
    message = watch.message("/m.jsonl", "likely", 10)
    assert "missing_file: 109 (e.g. /x/0.jpg: gone)" in message
    assert "1 of 10 shards finished and are kept" in message
    watch.finished("b", {"count": 100, "successes": 100, "failures": {}, "examples": {}})
    assert watch.verdict() is None, "the redone shard was fine after all"
    watch.finished("c", {"count": 100, "successes": 8, "failures": {F.READ_ERROR: 92}, "examples": {}})
    assert watch.verdict() == "certain" and 101 > 0.1 * 1000
    # A few failed samples are weak evidence: Hoeffding's margin is wide for small n.
    small = F.FailureWatch(listed=10_000, max_fraction=0.5, remaining=10_000)
    small.gave_up("a", {"count": 5, "successes": 0, "failures": {F.MISSING_FILE: 5}, "examples": {}})
    assert small.verdict() is None
    assert F.rate_floor(100, 100) > 0.73 and F.rate_floor(5, 5) == 0.0


# ---------------------------------------------------------------- on Ray


def wids_check(index_path: Path) -> None:
    """What wids checks and assumes: kind and version, url + nsamples per shard, urls
    relative to the index, and (its index tool's) filesize / md5sum / nsamples of each tar."""
    index = json.loads(index_path.read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    for shard in index["shardlist"]:
        assert {"url", "nsamples", "filesize", "md5sum"} <= set(shard)
        path = index_path.parent / shard["url"]
        data = path.read_bytes()
        assert len(data) == shard["filesize"]
        assert hashlib.md5(data).hexdigest() == shard["md5sum"]
        assert len(tar_samples(path)) == shard["nsamples"]
    assert sum(s["nsamples"] for s in index["shardlist"]) == index["num_samples"]


def timm_and_open_clip_check(out: Path) -> None:
    info = json.loads((out / "_info.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    for split, si in info["splits"].items():
        assert si["name"] == split and len(si["filenames"]) == len(si["shard_lengths"])
        assert sum(si["shard_lengths"]) == si["num_samples"]
        index = json.loads((out / f"{split}_index.json").read_text())
        assert si["num_samples"] == index["num_samples"]
        # open_clip: total = sum(int(sizes[basename(shard)]) for shard in shards)
        assert sum(int(sizes[os.path.basename(f)]) for f in si["filenames"]) == si["num_samples"]
        assert all((out / f).is_file() for f in si["filenames"])
    classes = (out / "classes.txt").read_text().splitlines()
    assert info["num_classes"] == len(classes)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_folders_round_trip_every_image_once_readable_by_webdataset(ray_local, tmp_path):
    import ray

    files = make_folders(tmp_path / "src")
    out = tmp_path / "out"
    summary = run_prep(cfg_for(tmp_path / "src", out, shard_size=5))
    assert summary["samples"] == 24 and summary["failures"] == {}
    assert ray.is_initialized(), "run_prep must not shut down a Ray it did not start"
    assert summary["shards"] == {"train": 5}
    samples = all_samples(out)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == sorted(map(str, files))
    for s in samples:
        meta = json.loads(s["json"])
        assert "." not in s["__key__"] and set(s) == {"__key__", "jpg", "cls", "json"}
        assert int(s["cls"]) == CLASSES.index(Path(meta["source"]).parent.name) == meta["labels"][0]
        assert (meta["width"], meta["height"]) == (40, 30)
    index = json.loads((out / "train_index.json").read_text())
    urls = [str(out / sh["url"]) for sh in index["shardlist"]]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(read) == 24 and all(r["jpg"].size == (40, 30) for r in read)
    assert index["classes"] == list(CLASSES) and index["multi_label"] is False
    wids_check(out / "train_index.json")
    timm_and_open_clip_check(out)
    for name in os.listdir(out):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tf:
                assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o444 for m in tf)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_jsonl_manifest_with_multi_labels_and_extra_fields(ray_local, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    lines = []
    for i in range(12):
        (src / f"{i}.jpg").write_bytes(jpeg(seed=i))
        labels = ["sky", "sea"] if i % 3 == 0 else ["sea"]
        lines.append(json.dumps({"path": f"imgs/{i}.jpg", "labels": labels, "caption": f"c{i}", "score": i / 10}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_prep(cfg_for(tmp_path / "train.jsonl", out, shard_size=5))
    assert summary["samples"] == 12 and summary["multi_label"] is True
    assert (out / "classes.txt").read_text() == "sea\nsky\n"
    by_caption = {json.loads(s["json"])["caption"]: s for s in all_samples(out)}
    meta = json.loads(by_caption["c3"]["json"])
    assert meta["labels"] == [1, 0] and by_caption["c3"]["cls"] == b"1" and meta["score"] == 0.3
    assert meta["source"] == str(src / "3.jpg")
    assert json.loads((out / "train_index.json").read_text())["multi_label"] is True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_csv_manifest_with_a_classes_file_counts_unknown_labels(ray_local, tmp_path):
    rows = ["file,label,photographer"]
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(seed=i))
        rows.append(f"{i}.jpg,{'zebra' if i == 4 else ('ant' if i % 2 else 'bee')},p{i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("bee\nant\n")
    out = tmp_path / "out"
    summary = run_prep(
        cfg_for(tmp_path / "m.csv", out, classes_file=str(tmp_path / "classes.txt"), max_failure_fraction=0.2)
    )
    assert summary["samples"] == 9 and summary["failures"] == {F.UNKNOWN_LABEL: 1}
    assert (out / "classes.txt").read_text() == "bee\nant\n"
    for s in all_samples(out):
        meta = json.loads(s["json"])
        n = int(Path(meta["source"]).stem)
        assert meta["labels"] == [n % 2] and meta["photographer"] == f"p{n}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_per_class_tars_are_read_in_place(ray_local, tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    expected = set()
    for c, wnid in enumerate(("n01440764", "n01443537")):
        with tarfile.open(src / f"{wnid}.tar", "w") as tf:
            for i in range(5):
                data = jpeg(seed=10 * c + i)
                info = tarfile.TarInfo(f"{wnid}/{wnid}_{i}.JPEG")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                expected.add((f"tar://{info.name}::{src / wnid}.tar", c, hashlib.md5(data).digest()))
            info = tarfile.TarInfo("LICENSE.txt")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"ok"))
    out = tmp_path / "out"
    summary = run_prep(cfg_for(src, out, shard_size=4, holdout=HoldoutConfig(count=2)))
    assert summary["samples_per_split"] == {"val": 2, "train": 8}
    got = {
        (json.loads(s["json"])["source"], int(s["cls"]), hashlib.md5(s["jpg"]).digest())
        for split in ("val", "train")
        for s in all_samples(out, split)
    }
    assert got == expected
    assert sorted(p.name for p in src.iterdir()) == ["n01440764.tar", "n01443537.tar"]
    wids_check(out / "val_index.json")
    timm_and_open_clip_check(out)


def make_bad_corpus(root: Path) -> tuple[Path, Path]:
    """A JSONL manifest over good files, every kind of bad input, and convertible modes."""
    img = root / "img"
    img.mkdir(parents=True)
    entries = []
    for i in range(6):
        (img / f"good {i}.v2.jpg").write_bytes(jpeg(seed=i))
        entries.append((f"good {i}.v2.jpg", "ok"))
    files = {
        "truncated.jpg": jpeg(64, 48)[:900],
        "zero.jpg": b"",
        "text.jpg": b"hello, I am text\n",
        "alpha.png": png("RGBA"),
        "cmyk.jpg": jpeg(mode="CMYK"),
        "deep.png": png("I;16"),
        "gray.jpg": jpeg(mode="L"),
        "huge.jpg": jpeg(300, 300),
        "\u00fcn\u00efc\u00f8de name.jpg": jpeg(seed=7),
    }
    for name, data in files.items():
        (img / name).write_bytes(data)
        entries.append((name, "ok"))
    (img / "folder.jpg").mkdir()
    entries += [("folder.jpg", "ok"), ("missing.jpg", "ok"), ("good 0.v2.jpg", "mystery")]
    lines = [json.dumps({"path": f"img/{p}", "label": label}) for p, label in entries]
    lines.insert(3, '{"path": "img/good 1.v2.jpg", "label": ')
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("ok\n")
    return root / "m.jsonl", root / "classes.txt"


BAD_COUNTS = {
    F.TRUNCATED_IMAGE: 1,
    F.EMPTY_FILE: 1,
    F.NOT_AN_IMAGE: 1,
    F.TOO_MANY_PIXELS: 1,
    F.READ_ERROR: 1,
    F.MISSING_FILE: 1,
    F.UNKNOWN_LABEL: 1,
    F.BAD_MANIFEST_LINE: 1,
}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_inputs_are_skipped_and_counted_by_reason(ray_local, tmp_path):
    manifest, classes = make_bad_corpus(tmp_path)
    out = tmp_path / "out"
    cfg = cfg_for(
        manifest,
        out,
        classes_file=str(classes),
        shard_size=6,
        max_failure_fraction=0.5,
        image=ImageConfig(max_pixels=50_000),
    )
    summary = run_prep(cfg)
    assert summary["failures"] == BAD_COUNTS
    assert summary["samples"] == 11 and summary["listed"] == 19
    index = json.loads((out / "train_index.json").read_text())
    assert index["failures"] == {k: v for k, v in BAD_COUNTS.items() if k not in (F.UNKNOWN_LABEL, F.BAD_MANIFEST_LINE)}
    converted: dict[str, int] = {}
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            for mode, n in json.loads((out / name).read_text())["converted_modes"].items():
                converted[mode] = converted.get(mode, 0) + n
    assert converted == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    sources = {Path(json.loads(s["json"])["source"]).name for s in all_samples(out)}
    assert {"alpha.png", "cmyk.jpg", "deep.png", "gray.jpg", "\u00fcn\u00efc\u00f8de name.jpg"} <= sources


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_too_many_failures_raise_and_the_cli_exits_non_zero(ray_local, tmp_path, capsys):
    from data_prep.job import FailureFractionExceeded

    manifest, classes = make_bad_corpus(tmp_path)
    out = tmp_path / "out"
    cfg = cfg_for(
        manifest, out, classes_file=str(classes), max_failure_fraction=0.2, image=ImageConfig(max_pixels=50_000)
    )
    with pytest.raises(FailureFractionExceeded, match="8 of 19 samples failed"):
        run_prep(cfg)
    assert not (out / "train_index.json").exists()
    assert (
        main(
            [
                f"source={manifest}",
                f"output={out}",
                f"classes_file={classes}",
                "max_failure_fraction=0.2",
                "image.max_pixels=50000",
            ]
        )
        == 1
    )
    assert "max_failure_fraction" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_manifest_of_missing_paths_stops_in_seconds_and_the_cli_exits_1(ray_local, tmp_path):
    manifest = missing_manifest(tmp_path, 4000)
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_local)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", f"source={manifest}", f"output={out}", "shard_size=1000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: data prep of {manifest} stopped early: max_failure_fraction=0.1 will be exceeded")
    assert f"missing_file: 100 (e.g. {tmp_path / 'img'}" in error
    assert "0 of 4 shards finished" in error
    assert not list(out.glob("*.tar")) and not list(out.glob("*_stats.json"))
    assert not (out / "train_index.json").exists()
    print(f"missing-paths job of 4000 samples stopped after {seconds:.1f} s (with Python start)")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stopped_job_keeps_its_finished_shards_and_a_rerun_resumes(ray_local, tmp_path):
    from data_prep.job import FailureFractionExceeded

    manifest = missing_manifest(tmp_path, 200, good_every=10)
    out = tmp_path / "out"
    cfg = cfg_for(manifest, out, shard_size=20, max_in_flight=1, shard_give_up_after=0)
    with pytest.raises(FailureFractionExceeded, match="1 of 10 shards finished and are kept"):
        run_prep(cfg)
    assert [p.name for p in out.glob("*_stats.json")] == ["train-000000_stats.json"]
    assert not (out / "train_index.json").exists()
    summary = run_prep(cfg_for(manifest, out, shard_size=20, max_in_flight=1, max_failure_fraction=0.95))
    assert summary["shards_skipped"] == 1 and summary["shards_run"] == 9
    assert summary["samples"] == 20 and summary["failures"] == {F.MISSING_FILE: 180}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_missing_or_empty_source_is_a_clear_error_before_any_task(ray_local, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    for source in (tmp_path / "nowhere", tmp_path / "empty", tmp_path / "empty.jsonl"):
        out = tmp_path / f"out-{source.name}"
        with pytest.raises(ValueError, match=str(source)):
            run_prep(cfg_for(source, out))
        assert not out.exists()
    assert main([f"source={tmp_path / 'nowhere'}", f"output={tmp_path / 'o'}"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkill_then_rerun_gives_the_bytes_of_an_uninterrupted_run(ray_local, tmp_path):
    make_folders(tmp_path / "src", per_class=16, w=640, h=480)
    args = [
        f"source={tmp_path / 'src'}",
        "shard_size=3",
        "max_in_flight=1",
        "holdout.count=5",
        "image.resize_mode=shorter",
        "image.size=96",
    ]
    killed, clean = tmp_path / "killed" / "shards", tmp_path / "clean" / "shards"
    env = dict(os.environ, RAY_ADDRESS=ray_local)
    log = open(tmp_path / "cli.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args, f"output={killed}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not list(killed.glob("*_stats.json")):
            assert proc.poll() is None, (tmp_path / "cli.log").read_text()
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = {p.name for p in killed.glob("*_stats.json")}
    assert 0 < len(done) < 17, "the job finished before it could be killed"
    time.sleep(1.0)  # let Ray reap the dead driver's worker
    stale = next(f"train-{i:06d}" for i in range(15) if f"train-{i:06d}_stats.json" not in done)
    (killed / f"{stale}.tar").write_bytes(b"half a tar")  # a partial shard: no stats

    assert main([*args, f"output={killed}"]) == 0
    run_prep(load_config(None, [*args, f"output={clean}"]))
    assert tree_bytes(killed) == tree_bytes(clean)
    wids_check(killed / "train_index.json")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_s3_input_and_output_with_a_resume(ray_local, s3_server, tmp_path):
    import s3fs

    make_folders(tmp_path / "src", per_class=4)
    s3 = s3fs.S3FileSystem(endpoint_url=s3_server)
    s3.mkdir("bucket")
    s3.put(str(tmp_path / "src") + "/", "bucket/src/", recursive=True)
    cfg = cfg_for("s3://bucket/src", "s3://bucket/out", shard_size=5)
    first = run_prep(cfg)
    assert first["samples"] == 12 and first["shards_run"] == 3
    s3.invalidate_cache()
    before = {p: s3.cat_file(p) for p in s3.find("bucket/out") if not p.endswith("_stats.json")}
    index = json.loads(before["bucket/out/train_index.json"])
    assert index["num_samples"] == 12 and index["shardlist"][0]["url"] == "train-000000.tar"
    sample = tar_samples(before["bucket/out/train-000000.tar"])[0]
    assert json.loads(sample["json"])["source"].startswith("s3://bucket/src/")

    s3.rm("bucket/out/train-000001_stats.json")
    s3.pipe_file("bucket/out/train-000001.tar", b"partial")
    s3.rm("bucket/out/train_index.json")
    second = run_prep(cfg)
    assert second["shards_run"] == 1 and second["shards_skipped"] == 2
    s3.invalidate_cache()
    after = {p: s3.cat_file(p) for p in s3.find("bucket/out") if not p.endswith("_stats.json")}
    assert after == before
