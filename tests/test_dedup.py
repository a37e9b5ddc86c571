"""data_prep's de-duplication against downstream test sets (the paper's section 4.1): the
perceptual hash, the multi-index lookup, detection and false-positive rates on procedural
images, and whole jobs on a real local Ray writing real shards (one cluster for the module,
as in test_data_prep)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.dedup_rates import COPIES, draw_scene, encode, measure
from data_prep.__main__ import main
from data_prep.config import ConfigError, DedupConfig, load_config
from data_prep.dedup import NearDuplicateIndex, crop_boxes, phash, popcount
from tests.support.prep import all_samples, cfg_for, run_prep, tree_bytes

KINDS = tuple(COPIES)  # resized, jpeg_q50, cropped, greyscale


# ---------------------------------------------------------------- hash and index


def test_phash_moves_a_few_bits_under_resize_jpeg_and_grey_and_many_between_images():
    img = draw_scene(7)
    h = phash(img)
    assert 0 <= h < 2**63 and bin(h).count("1") == 31, "63 bits thresholded at their median"
    near = [
        phash(Image.open(io.BytesIO(COPIES[k](img, np.random.default_rng(0)))))
        for k in ("resized", "jpeg_q50", "greyscale")
    ]
    assert all(bin(h ^ x).count("1") <= 6 for x in near)
    others = [phash(draw_scene(s)) for s in range(100, 140)]
    assert min(bin(h ^ x).count("1") for x in others) > 10


@pytest.mark.parametrize("n_images, max_distance", [(30, 10), (3000, 10), (3000, 4), (3000, 0)])
def test_the_index_finds_exactly_what_a_full_scan_finds(n_images, max_distance):
    rng = np.random.default_rng(n_images + max_distance)
    boxes = crop_boxes(0.075, 0.025)
    hashes = rng.integers(0, 2**63, (n_images, len(boxes)), dtype=np.uint64)
    index = NearDuplicateIndex(
        ["t"], [str(i) for i in range(n_images)], np.zeros(n_images), hashes, boxes, max_distance
    )
    queries = index.hashes[rng.integers(0, len(index.hashes), 400)].copy()
    for i, flips in enumerate(rng.integers(0, max_distance + 4, len(queries))):
        for bit in rng.choice(63, flips, replace=False):
            queries[i] ^= np.uint64(1 << int(bit))
    queries = np.concatenate([queries, rng.integers(0, 2**63, 100, dtype=np.uint64)])
    entry, distance = index.nearest(queries)
    for q, e, d in zip(queries, entry, distance, strict=True):
        scan = popcount(index.hashes ^ q)
        if scan.min() > max_distance:
            assert e == -1 and d == -1
        else:
            assert d == scan.min() and e == int(np.argmin(scan)), "nearest, lowest entry on ties"
    assert 0 < (entry >= 0).sum() < len(queries)


def test_each_kind_of_copy_is_caught_and_distinct_images_are_not(capsys):
    r = measure(n_test=100, n_corpus=400, dedup=DedupConfig())
    with capsys.disabled():
        print(
            f"\ndedup on {r['test_images']} test / {r['corpus_images']} distinct images: "
            f"caught {r['detected']}, false positives {r['false_positive_rate']:.2%}"
        )
    assert r["detected"] == {k: 1.0 for k in KINDS}
    assert r["false_positive_rate"] <= 0.01
    weak = measure(n_test=40, n_corpus=0, dedup=DedupConfig(crop=0.0))
    assert weak["detected"]["cropped"] < 0.5, "without crops of the test images crops escape"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, key",
    [
        ("dedup.mode=drop", "dedup.mode"),
        ("dedup.max_distance=40", "dedup.max_distance"),
        ("dedup.crop=0.3", "dedup.crop"),
        ("dedup.crop_shift=0.1", "dedup.crop_shift"),
        ("dedup.hash=md5", "dedup.hash"),
        ("dedup.against._x=/t", "dedup.against._x"),
    ],
)
def test_a_bad_dedup_config_is_an_error_naming_the_key(override, key, capsys):
    args = ["source=/in", "output=/out", override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, args)
    assert main(args) == 2 and key in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"dedup\.hash"):
        load_config(None, ["source=/in", "output=/out", "dedup.hash=none", "dedup.against.t=/t"])


def test_a_missing_test_set_fails_before_anything_runs(tmp_path, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "0.jpg").write_bytes(encode(draw_scene(0)))
    (tmp_path / "empty").mkdir()
    for name, url in (("gone", tmp_path / "nowhere"), ("bare", tmp_path / "empty")):
        out = tmp_path / f"out-{name}"
        start = time.perf_counter()
        assert main([f"source={tmp_path / 'src'}", f"output={out}", f"dedup.against.{name}={url}"]) == 2
        assert f"dedup.against.{name}" in capsys.readouterr().err
        assert not out.exists() and time.perf_counter() - start < 5


# ---------------------------------------------------------------- whole jobs on Ray


def make_corpus(root: Path, tests: dict[str, list[int]]) -> tuple[dict[str, Path], dict[str, tuple]]:
    """Test sets of procedural scenes (one folder per set, `<class>/<i>.jpg`) and a corpus of
    class folders: 12 distinct scenes plus one copy of each kind, each of another test image.
    Returns the test-set folders and, per copy's file name, (test set, test id, kind)."""
    rng = np.random.default_rng(0)
    sets, copies = {}, {}
    for name, seeds in tests.items():
        for i, seed in enumerate(seeds):
            path = root / name / f"c{i % 2}" / f"{seed}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(draw_scene(seed)))
        sets[name] = root / name
    (root / "src" / "plain").mkdir(parents=True)
    (root / "src" / "copy").mkdir(parents=True)
    for i in range(12):
        (root / "src" / "plain" / f"{i}.jpg").write_bytes(encode(draw_scene(500 + i)))
    pairs = sorted(
        ((name, i, seed) for name, seeds in tests.items() for i, seed in enumerate(seeds)), key=lambda p: p[1]
    )  # the test sets take turns
    for kind, (name, i, seed) in zip(KINDS, pairs, strict=False):
        (root / "src" / "copy" / f"{kind}.jpg").write_bytes(COPIES[kind](draw_scene(seed), rng))
        copies[f"{kind}.jpg"] = (name, f"c{i % 2}/{seed}.jpg", kind)
    return sets, copies


def listed(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("*_dedup.jsonl")) for line in p.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_exclude_drops_each_kind_of_copy_and_the_index_records_how_many(ray_local, tmp_path):
    sets, copies = make_corpus(tmp_path, {"tst": [1, 2, 3, 4, 5, 6]})
    out, clean = tmp_path / "run" / "shards", tmp_path / "clean" / "shards"
    cfg = cfg_for(tmp_path / "src", out, shard_size=5)
    cfg.dedup.against = {"tst": str(sets["tst"])}
    summary = run_prep(cfg)
    assert summary["near_duplicates"] == {"tst": 4} and summary["dropped_near_duplicates"] == 4
    assert summary["samples"] == 12 and summary["failures"] == {}
    samples = all_samples(out)
    assert sorted(Path(json.loads(s["json"])["source"]).parent.name for s in samples) == ["plain"] * 12
    assert all(len(json.loads(s["json"])["phash"]) == 16 for s in samples)
    index = json.loads((out / "train_index.json").read_text())
    assert index["num_samples"] == 12 and index["failures"] == {}
    assert index["dedup"]["dropped"] == 4 and index["dedup"]["near_duplicates"] == {"tst": 4}
    assert index["dedup"]["mode"] == "exclude" and index["dedup"]["listings"]
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["excluded"] for s in stats) == 4 and sum(s["successes"] for s in stats) == 12
    assert {s["count"] - s["successes"] - s["excluded"] for s in stats} == {0}
    lines = listed(out)
    assert {Path(x["source"]).name: (x["test_set"], x["test_id"], x["excluded"]) for x in lines} == {
        name: (ts, tid, True) for name, (ts, tid, _) in copies.items()
    }
    assert next(x for x in lines if x["source"].endswith("cropped.jpg"))["kind"].startswith("crop")

    again = run_prep(cfg)  # resume: every shard is done
    assert again["shards_skipped"] == 4 and again["near_duplicates"] == {"tst": 4}
    run_prep(cfg_for(tmp_path / "src", clean, shard_size=5, dedup=cfg.dedup))
    assert tree_bytes(out) == tree_bytes(clean), "byte-deterministic"

    (out / "train-000001_stats.json").unlink()  # a shard to redo, after the test set changed
    (sets["tst"] / "c0" / "new.jpg").write_bytes(encode(draw_scene(99)))
    with pytest.raises(ConfigError, match=r"dedup\.against.*train-000000"):
        run_prep(cfg)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_list_mode_keeps_the_samples_against_a_manifest_and_our_own_shard_index(ray_local, tmp_path):
    sets, copies = make_corpus(tmp_path, {"folder": [1, 2, 3], "shards": [4, 5, 6]})
    shards = cfg_for(sets["shards"], tmp_path / "shards", shard_size=2)
    run_prep(shards)  # the second test set is one of our own sharded splits
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"path": f"folder/c{i % 2}/{s}.jpg", "label": "x"}) + "\n" for i, s in enumerate([1, 2, 3]))
    )
    cfg = cfg_for(tmp_path / "src", tmp_path / "out", shard_size=8)
    cfg.dedup.against = {"manifest": str(tmp_path / "m.jsonl"), "shards": str(tmp_path / "shards" / "train_index.json")}
    cfg.dedup.mode = "list"
    summary = run_prep(cfg)
    assert summary["samples"] == 16 and summary["dropped_near_duplicates"] == 0
    assert summary["near_duplicates"] == {"manifest": 2, "shards": 2}
    index = json.loads((tmp_path / "out" / "train_index.json").read_text())
    assert index["num_samples"] == 16 and index["dedup"]["dropped"] == 0
    by_name = {Path(x["source"]).name: x for x in listed(tmp_path / "out")}
    assert set(by_name) == set(copies) and not any(x["excluded"] for x in by_name.values())
    assert by_name["resized.jpg"]["test_id"].endswith("folder/c0/1.jpg")
    assert by_name["cropped.jpg"]["test_set"] == "manifest"
    assert by_name["jpeg_q50.jpg"]["test_set"] == "shards"
    assert by_name["jpeg_q50.jpg"]["test_id"].startswith("train-00000")
    kept = {
        Path(json.loads(s["json"])["source"]).name: json.loads(s["json"])["phash"]
        for s in all_samples(tmp_path / "out")
    }
    assert all(by_name[n]["phash"] == kept[n] for n in by_name)
