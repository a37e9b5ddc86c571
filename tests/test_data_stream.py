"""The streaming input pipeline: coverage, determinism, exact resume, no empty rank."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data import (
    ShardIndex,
    StreamSpec,
    TrainStream,
    decode_eval,
    decode_train,
    inception_crop_box,
    iter_eval_batches,
    iter_tar_files,
    iter_tar_samples,
    make_units,
    multi_hot,
    reader_stream,
    sample_labels,
    seeded_rng,
    to_model_input,
)
from tests.support.data import write_shards


def spec(index: str, rank=0, world=2, workers=2, batch=4, seed=0, block=16) -> StreamSpec:
    return StreamSpec(
        index_url=index,
        rank=rank,
        world_size=world,
        num_workers=workers,
        batch_size=batch,
        image_size=16,
        num_classes=4,
        seed=seed,
        shuffle_block=block,
        crop_area=(0.5, 1.0),
        flip=True,
    )


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("uneven"), per_shard=[37, 3, 1])


def one_pass(index: str, num_readers: int, seed: int = 0) -> list[list[str]]:
    units = make_units(ShardIndex.load(index), num_readers)
    out = []
    for r in range(num_readers):
        stream = reader_stream(units, r, num_readers, seed, block=8)
        keys = []
        for sample, (p, _) in stream:
            if p > 0:
                break
            keys.append(sample["__key__"])
        out.append(keys)
    return out


def test_one_pass_over_all_readers_sees_every_sample_exactly_once(uneven):
    for readers in (1, 2, 4, 8):  # 8 readers > 3 shards: shards are split, nobody is empty
        per_reader = one_pass(uneven, readers)
        assert all(per_reader), f"an empty reader with {readers} readers"
        counts = Counter(itertools.chain.from_iterable(per_reader))
        assert len(counts) == 41 and set(counts.values()) == {1}


def test_order_depends_on_seed_and_pass_but_is_deterministic(uneven):
    a, b, c = one_pass(uneven, 2, seed=0), one_pass(uneven, 2, seed=0), one_pass(uneven, 2, seed=1)
    assert a == b and a != c
    units = make_units(ShardIndex.load(uneven), 1)
    stream = reader_stream(units, 0, 1, 0, block=8)
    first, second = [next(stream)[0]["__key__"] for _ in range(41)], [next(stream)[0]["__key__"] for _ in range(41)]
    assert sorted(first) == sorted(second) and first != second


def test_reader_stream_resumes_mid_block_exactly(uneven):
    units = make_units(ShardIndex.load(uneven), 2)
    full = [(s["__key__"], pos) for s, pos in itertools.islice(reader_stream(units, 1, 2, 3, block=8), 60)]
    for cut in (1, 7, 8, 19, 20, 45):
        resumed = [
            (s["__key__"], pos)
            for s, pos in itertools.islice(reader_stream(units, 1, 2, 3, 8, start=full[cut - 1][1]), 60 - cut)
        ]
        assert resumed == full[cut:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rank", [0, 1])
def test_train_stream_with_worker_processes_resumes_with_the_exact_next_keys(uneven, rank):
    s = spec(uneven, rank=rank)
    straight = TrainStream(s)
    expected = [next(straight)["keys"] for _ in range(12)]
    first = TrainStream(s)
    got = [next(first)["keys"] for _ in range(7)]
    state = first.state_dict()
    second = TrainStream(s, state)
    got += [next(second)["keys"] for _ in range(5)]
    assert got == expected


@pytest.mark.timeout(120)
def test_every_rank_yields_batches_with_fewer_shards_than_readers(uneven):
    # 3 shards, 4 ranks x 2 workers = 8 readers: every rank still gets full batches.
    for rank in range(4):
        stream = TrainStream(spec(uneven, rank=rank, world=4, workers=2))
        batches = [next(stream) for _ in range(6)]
        assert all(b["images"].shape == (4, 16, 16, 3) for b in batches)


@pytest.mark.timeout(120)
def test_corrupt_samples_are_skipped_and_counted_never_crash(tmp_path):
    index = write_shards(tmp_path, per_shard=[20], corrupt_keys=("000000003", "000000011"))
    stream = TrainStream(spec(index, world=1, workers=0))
    keys = list(itertools.chain.from_iterable(next(stream)["keys"] for _ in range(9)))
    assert stream.skipped >= 2 and "000000003" not in keys[:18]
    labels = [y for _, y in iter_eval_batches(index, 16, 8, crop_ratio=1.0)]
    assert sum(len(x) for x in labels) == 18


def test_transforms_produce_the_right_shapes_and_range():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    import random

    img = decode_train(buf.getvalue(), 32, random.Random(0), (0.05, 1.0), True)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert decode_eval(buf.getvalue(), 32, 0.875).shape == (32, 32, 3)
    x = to_model_input(torch.from_numpy(np.stack([img])))
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    rng = random.Random(1)
    for _ in range(200):
        x0, y0, x1, y1 = inception_crop_box(400, 300, rng, (0.05, 1.0))
        area = (x1 - x0) * (y1 - y0) / (400 * 300)
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300 and 0.04 <= area <= 1.0


def test_stream_batches_hold_exactly_the_decoded_samples_of_each_reader_in_order(uneven):
    # The worker writes each decoded image into a shared-memory batch: the pixels and targets
    # must be those of decode_train on the reader's samples, with the documented per-sample rng.
    s = spec(uneven, rank=1, world=2, workers=2, batch=4)
    stream = TrainStream(s)
    batches = [next(stream) for _ in range(16)]  # 32 samples per reader: past the first pass (about 10 each)
    units, num_readers = make_units(ShardIndex.load(uneven), 4), 4
    for logical in (0, 1):
        reader = s.rank * s.num_workers + logical
        samples = reader_stream(units, reader, num_readers, s.seed, s.shuffle_block)
        for b in (b for b in batches if b["reader"] == logical):
            taken = [next(samples) for _ in range(s.batch_size)]
            expected = np.stack(
                [
                    decode_train(x["jpg"], s.image_size, seeded_rng(s.seed, reader, *pos), s.crop_area, s.flip)
                    for x, pos in taken
                ]
            )
            assert b["keys"] == [x["__key__"] for x, _ in taken] and tuple(b["position"]) == taken[-1][1]
            assert b["images"].dtype == torch.uint8 and torch.equal(b["images"], torch.from_numpy(expected))
            assert torch.equal(b["targets"], multi_hot([sample_labels(x) for x, _ in taken], s.num_classes))


def _tar_of(path, fmt, members) -> str:
    """A tar written by ``tarfile`` in ``fmt``; members are (name, bytes) files or (name, (type,)) others."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if isinstance(body, tuple):
                info.type, info.linkname = body[0], "target"
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return str(path)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_yields_the_files_and_names_tarfile_yields(tmp_path, fmt):
    long_dir = "d" * 120 if fmt == tarfile.USTAR_FORMAT else "d" * 300  # ustar: prefix + name
    members = [
        ("a/000001.jpg", b"x" * 511),
        ("a/000001.cls", b"3"),
        ("a/dir", (tarfile.DIRTYPE,)),
        ("a/link", (tarfile.SYMTYPE,)),
        ("a/000002.jpg", b""),
        ("a/000002.json", b"y" * 512),
        (f"{long_dir}/000003.jpg", b"z" * 513),
        ("a/000004.txt", bytes(range(256)) * 9),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("a/üñï.jpg", b"w" * 1000))  # non-ASCII: a pax path record, or raw bytes in GNU
    url = _tar_of(tmp_path / "t.tar", fmt, members)
    with tarfile.open(url) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(url, "rb") as f:
        assert list(iter_tar_files(f, url)) == expected
    assert len(expected) == len(members) - 2


def test_a_corrupt_tar_header_names_the_shard_and_the_offset(tmp_path):
    url = _tar_of(tmp_path / "t.tar", tarfile.PAX_FORMAT, [("k1.jpg", b"x" * 600), ("k1.cls", b"1")])
    data = bytearray(open(url, "rb").read())
    data[1536 + 10] ^= 0xFF  # the name field of the second header (512 header + 1024 data)
    open(url, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"t\.tar: bad tar header checksum at byte 1536"):
        list(iter_tar_samples(url))


# ---------------------------------------------------------------- the canonical order (data.order=canonical)


def canonical(index: str, rank: int, world: int, workers: int, streams: int, state=None, glob: int = 24):
    from pipeline.data import CanonicalStream

    s = spec(index, rank=rank, world=world, workers=workers, block=8)
    s.streams, s.global_batch = streams, glob
    return CanonicalStream(s, state)


def global_steps(streams_of_ranks: list, steps: int, glob: int = 24, micro: int = 4) -> list[dict[str, int]]:
    """Per global step: every sample key of every rank's micro-batches -> a checksum of its pixels."""
    out = []
    for _ in range(steps):
        step: dict[str, int] = {}
        for stream in streams_of_ranks:
            for _ in range(glob // len(streams_of_ranks) // micro):
                batch = next(stream)
                assert batch["images"].shape == (micro, 16, 16, 3) and len(batch["keys"]) == micro
                for key, image in zip(batch["keys"], batch["images"], strict=True):
                    step[key] = step.get(key, 0) + int(image.to(torch.int64).sum())  # a key twice in a step adds up
        out.append(step)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("streams", [24, 6])
def test_the_samples_of_each_global_step_are_the_same_for_any_world_size_and_worker_count(uneven, streams):
    from pipeline.data import default_streams

    assert default_streams(24, 4) == 24  # micro-batch 4: one sample of each of 24 streams a step
    steps = 5  # 120 samples of a 41-sample set: the streams cross several passes
    reference = global_steps([canonical(uneven, 0, 1, 0, streams)], steps)
    assert sum(len(s) for s in reference) >= 41 * 2, "steps are made of distinct samples, not one repeated"
    for world in (1, 2, 3):
        for workers in (1, 2):
            got = global_steps([canonical(uneven, r, world, workers, streams) for r in range(world)], steps)
            assert got == reference, f"world {world} x {workers} workers read other samples (or crops) than 1 rank"


@pytest.mark.timeout(300)
def test_a_resize_mid_pass_goes_on_with_the_samples_the_fixed_run_takes_next(uneven):
    from pipeline.data import merge_states

    reference = global_steps([canonical(uneven, 0, 1, 0, 6)], 6)
    two = [canonical(uneven, r, 2, 2, 6) for r in range(2)]
    got = global_steps(two, 2)  # 48 of 41 samples: the second pass has begun
    states = [s.state_dict() for s in two]
    assert {tuple(p) for s in states for p in s["positions"].values()} != {(0, 0)}
    three = [canonical(uneven, r, 3, 1, 6, merge_states(states)) for r in range(3)]  # 2 -> 3 ranks, 2 -> 1 workers
    got += global_steps(three, 2)
    one = canonical(uneven, 0, 1, 2, 6, merge_states([s.state_dict() for s in three]))  # 3 -> 1 rank
    got += global_steps([one], 2)
    assert got == reference


@pytest.mark.timeout(120)
def test_canonical_streams_skip_and_count_corrupt_samples_and_refuse_a_world_size_they_cannot_share(tmp_path):
    index = write_shards(tmp_path, per_shard=[20], corrupt_keys=("000000003", "000000011"))
    stream = canonical(index, 0, 1, 0, 4, glob=8)
    keys = list(itertools.chain.from_iterable(next(stream)["keys"] for _ in range(4)))
    assert stream.skipped == 2 and len(keys) == 16 and not {"000000003", "000000011"} & set(keys)
    with pytest.raises(ValueError, match="4 canonical streams cannot feed a global batch of 8 on 3 ranks"):
        canonical(index, 0, 3, 0, 4, glob=8)
    with pytest.raises(ValueError, match="5 canonical streams"):
        canonical(index, 0, 1, 0, 5, glob=8)


def test_a_stream_state_saved_in_one_order_starts_the_next_pass_in_the_other(uneven, caplog):
    reader_state = {"batches": 3, "positions": {"0": [1, 5], "1": [0, 9]}, "world_size": 1, "num_workers": 2}
    stream = canonical(uneven, 0, 1, 0, 6, state=reader_state)
    assert set(stream.positions.values()) == {(2, 0)} and "in reader order" in caplog.text
    canonical_state = {"batches": 3, "streams": 6, "positions": {"0": [1, 2]}, "world_size": 1, "num_workers": 0}
    assert set(TrainStream(spec(uneven, world=1, workers=0), canonical_state).positions.values()) == {(2, 0)}
