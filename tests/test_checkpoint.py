"""The checkpoint manager: save, publish, resume and prune through a run dir on a local path
and on S3 (moto); every file checked against the manifest written before the marker; our own
rank files load as data and cannot run code.

Checkpoints are real: a world-size-1 DeepSpeed ZeRO-2 engine (gloo) trained on real shards by
the training loop's own ``micro_step``, its data stream a real ``TrainStream``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import CheckpointManager, CorruptCheckpoint
from pipeline.rundir import RunDir
from tests.support.engine import tiny_engine, train_step

TAG = "step_00000003"


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.fixture(scope="module")
def s3():
    from tests.support.services import moto_s3

    with moto_s3("runs") as (_, env):
        yield env


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_shards):
    """Three checkpoints (steps 1-3, keep 2) of one run dir on the local disk, staged apart from it."""
    root = tmp_path_factory.mktemp("ckpt")
    engine, stream, config_yaml, device = tiny_engine(root / "host", tiny_shards)
    manager = CheckpointManager(RunDir(str(root / "run")), checkpoint.staging_dir(str(root / "host")), keep=2)
    manager.track(engine=engine, stream=stream)
    for step in (1, 2, 3):
        train_step(engine, stream, device)
        manager.save(step, {"samples_seen": 8 * step, "world_size": 1, "num_classes": 4}, config_yaml)
    out = {"root": root, "weights": _weights(engine), "data": stream.state_dict(), "run": root / "run"}
    engine.destroy()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_manager_saves_publishes_prunes_and_resumes_on_another_host(
    tmp_path, tiny_shards, saved, s3, where, monkeypatch
):
    if where == "s3":
        for k, v in s3.items():
            monkeypatch.setenv(k, v)
        run_url = f"s3://runs/{tmp_path.name}"
        engine, stream, config_yaml, device = tiny_engine(tmp_path / "host1", tiny_shards)
        writer = CheckpointManager(RunDir(run_url), checkpoint.staging_dir(str(tmp_path / "host1")), keep=2)
        writer.track(engine=engine, stream=stream)
        for step in (1, 2, 3):
            train_step(engine, stream, device)
            writer.save(step, {"samples_seen": 8 * step, "world_size": 1, "num_classes": 4}, config_yaml)
        weights, data = _weights(engine), stream.state_dict()
        engine.destroy()
    else:
        run_url, weights, data = str(saved["run"]), saved["weights"], saved["data"]
    run = RunDir(run_url)
    assert run.checkpoints.complete_tags() == ["step_00000002", TAG], "pruned to keep=2, oldest first"

    # A tag whose marker is missing (an upload cut short) does not exist for anyone.
    run.fs.makedirs(f"{run.checkpoints.root}/step_00000004", exist_ok=True)
    run.fs.pipe_file(f"{run.checkpoints.root}/step_00000004/meta.json", b"{}")
    assert run.checkpoints.latest() == TAG

    # Another host: an empty staging dir; the manager fetches the run dir's latest and resumes it.
    engine, _, _, _ = tiny_engine(tmp_path / "host2", tiny_shards)
    reader = CheckpointManager(run, checkpoint.staging_dir(str(tmp_path / "host2")))
    assert reader.prepare() == (checkpoint.staging_dir(str(tmp_path / "host2")), TAG)
    reader.track(engine=engine)
    meta, data_state = reader.resume()
    assert meta["step"] == 3 and meta["samples_seen"] == 24 and engine.global_steps == 3
    assert data_state == data, "the data stream continues where it was"
    got = _weights(engine)
    assert all(torch.equal(got[k], v) for k, v in weights.items()), "the same weights on the other host"
    engine.destroy()


def test_the_manifest_lists_every_file_of_a_tag_with_its_size_and_sha256(saved):
    tag_dir = saved["run"] / "checkpoints" / TAG
    files = json.loads((tag_dir / "meta.json").read_text())["files"]
    on_disk = {p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file()} - {"meta.json", "COMPLETE"}
    assert set(files) == on_disk and {"rank_0.pt", "config.yaml", "mp_rank_00_model_states.pt"} <= on_disk
    for name, entry in files.items():
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.timeout(120)
def test_a_flipped_byte_in_any_file_of_a_tag_is_refused_naming_the_file(saved, tmp_path):
    src = saved["run"] / "checkpoints" / TAG
    names = sorted(json.loads((src / "meta.json").read_text())["files"])
    for name in names:
        copy = tmp_path / name.replace("/", "_") / TAG
        shutil.copytree(src, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpoint, match="sha256 differs") as err:
            checkpoint.check_files(copy)
        assert str(copy / name) in str(err.value)
    # what evaluation and export read: the consolidated weights refuse a corrupt optimizer file
    optim = next(n for n in names if n.endswith("optim_states.pt"))
    with pytest.raises(CorruptCheckpoint, match=optim):
        checkpoint.load_fp32_weights(str(tmp_path / optim.replace("/", "_")), TAG)
    shutil.copytree(src, tmp_path / "gone" / TAG)
    (tmp_path / "gone" / TAG / "config.yaml").unlink()
    with pytest.raises(CorruptCheckpoint, match="config.yaml: missing"):
        checkpoint.check_files(tmp_path / "gone" / TAG)


@pytest.mark.timeout(120)
def test_a_rank_file_with_a_pickle_payload_is_refused_and_runs_nothing(saved, tmp_path, tiny_shards):
    """Even with its manifest rewritten to match (someone who can write the bucket), our own
    rank file loads as data only: the payload is refused before it runs."""
    tag_dir = tmp_path / "ckpts" / TAG
    shutil.copytree(saved["run"] / "checkpoints" / TAG, tag_dir)
    sentinel = tmp_path / "payload_ran"
    torch.save({"data": {}, "rng": _Payload(str(sentinel))}, tag_dir / "rank_0.pt")
    meta = json.loads((tag_dir / "meta.json").read_text())
    data = (tag_dir / "rank_0.pt").read_bytes()
    meta["files"]["rank_0.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / "meta.json").write_text(json.dumps(meta))

    engine, _, _, _ = tiny_engine(tmp_path / "host", tiny_shards)
    with pytest.raises(CorruptCheckpoint, match="rank_0.pt: refused"):
        checkpoint.load(engine, str(tmp_path / "ckpts"), TAG)
    engine.destroy()
    assert not sentinel.exists(), "the payload ran"


class _Payload:
    """Unpickling this creates a file: what a code-running checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_verify_from_the_shell_names_the_corrupt_file(saved, tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT

    copy = tmp_path / TAG
    shutil.copytree(saved["run"] / "checkpoints" / TAG, copy)
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline.checkpoint", "verify", str(copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "every file matches" in ok.stdout, ok.stderr
    with open(copy / "rank_0.pt", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0x80]))
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.checkpoint", "verify", str(copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and f"{copy / 'rank_0.pt'}: sha256 differs" in bad.stderr, bad.stderr
