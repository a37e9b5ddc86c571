"""The demo corpora: seeded glyph class folders (optionally multi-label) and the digits."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep.demo import make_digits_corpus, make_glyph_corpus


def tree_digest(root):
    """{relative path: md5} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.md5(fh.read()).hexdigest()
    return out


def jpegs(root):
    return sorted(p for p in tree_digest(root) if p.endswith(".jpg"))


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("glyphs"))
    return root, make_glyph_corpus(root, num_classes=6, per_class=8, seed=0)


def test_glyph_corpus_has_one_folder_per_class_with_per_class_images(glyphs):
    root, summary = glyphs
    assert sorted(os.listdir(root)) == [f"glyph_{c:03d}" for c in range(6)]
    for c in range(6):
        assert len(os.listdir(os.path.join(root, f"glyph_{c:03d}"))) == 8
    assert summary["classes"] == 6 and summary["images"] == 48
    assert summary["manifest"] is None and not os.path.exists(os.path.join(root, "manifest.jsonl"))


def test_glyph_corpus_is_the_same_for_a_seed_and_differs_for_another(glyphs, tmp_path):
    root, _ = glyphs
    make_glyph_corpus(str(tmp_path / "same"), num_classes=6, per_class=8, seed=0)
    make_glyph_corpus(str(tmp_path / "other"), num_classes=6, per_class=8, seed=1)
    same, other = tree_digest(str(tmp_path / "same")), tree_digest(str(tmp_path / "other"))
    assert same == tree_digest(root)
    assert set(other) == set(same)
    assert sum(other[p] != same[p] for p in same) == len(same)


def test_glyph_corpus_drawn_in_processes_is_byte_identical(glyphs, tmp_path):
    root, _ = glyphs
    make_glyph_corpus(str(tmp_path / "pool"), num_classes=6, per_class=8, seed=0, workers=2)
    assert tree_digest(str(tmp_path / "pool")) == tree_digest(root)


def test_glyphs_are_bright_strokes_on_black_32px_rgb(glyphs):
    root, _ = glyphs
    for rel in jpegs(root):
        with Image.open(os.path.join(root, rel)) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
            pixels = np.asarray(img).astype(int)
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 8  # grey
        assert np.mean(pixels < 40) > 0.4, rel  # mostly dark background
        assert pixels.max() > 150, rel  # bright strokes
        assert 0.03 < np.mean(pixels > 64) < 0.6, rel


def test_same_class_samples_vary(glyphs):
    root, _ = glyphs
    a, b = (
        np.asarray(Image.open(os.path.join(root, "glyph_000", f)))
        for f in sorted(os.listdir(os.path.join(root, "glyph_000")))[:2]
    )
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2


def test_multi_label_manifest_gives_two_labels_to_the_configured_fraction(tmp_path):
    root = str(tmp_path)
    summary = make_glyph_corpus(root, num_classes=5, per_class=8, seed=3, multi_label_fraction=0.25)
    with open(os.path.join(root, "manifest.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert summary["manifest"] == os.path.join(root, "manifest.jsonl")
    assert sorted(r["path"] for r in records) == jpegs(root)
    pairs = [r for r in records if len(r["labels"]) == 2]
    assert len(pairs) == summary["multi_label_images"] == 10
    assert all(len(r["labels"]) in (1, 2) for r in records)
    for r in records:
        assert r["path"].split("/")[0] == r["labels"][0]
        assert len(set(r["labels"])) == len(r["labels"])


def test_digits_corpus_has_1797_images_in_10_folders(tmp_path):
    from sklearn.datasets import load_digits

    summary = make_digits_corpus(str(tmp_path), size=32)
    assert summary["images"] == 1797 and sorted(os.listdir(tmp_path)) == [str(d) for d in range(10)]
    counts = [len(os.listdir(tmp_path / str(d))) for d in range(10)]
    assert counts == np.bincount(load_digits().target).tolist()
    with Image.open(tmp_path / "0" / "0000.jpg") as img:
        assert img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img)
        assert pixels.max() > 200 and np.mean(pixels < 40) > 0.3
