"""pipeline.rundir: what a host fetches from the run dir before it resumes."""

from __future__ import annotations

from pathlib import Path

from pipeline.rundir import Checkpoints


def _tag(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_fetch_replaces_a_hosts_own_copy_that_lacks_the_other_ranks_files(tmp_path):
    # Rank 0 marked its host's staging copy complete, but rank 1's files were written on another
    # host; after a restart rank 1 may run here and needs them.
    _tag(tmp_path / "run" / "step_00000009", {"rank_0.pt": b"r0", "rank_1.pt": b"r1", "COMPLETE": b""})
    _tag(tmp_path / "scratch" / "step_00000009", {"rank_0.pt": b"r0", "COMPLETE": b""})
    got = Checkpoints(str(tmp_path / "run")).fetch("step_00000009", tmp_path / "scratch")
    assert (got / "rank_1.pt").read_bytes() == b"r1" and (got / "COMPLETE").exists()


def test_fetch_keeps_a_local_copy_that_has_every_file(tmp_path):
    _tag(tmp_path / "run" / "step_00000004", {"rank_0.pt": b"r0", "COMPLETE": b""})
    local = _tag(tmp_path / "scratch" / "step_00000004", {"rank_0.pt": b"r0", "COMPLETE": b""})
    before = (local / "rank_0.pt").stat().st_ino
    Checkpoints(str(tmp_path / "run")).fetch("step_00000004", tmp_path / "scratch")
    assert (local / "rank_0.pt").stat().st_ino == before
