"""Planning a big source as Ray tasks (`data_prep.plan_ray`): the same plan bytes whatever
the number of ranges, tasks or files; ranges cut anywhere; rejects named by file:line;
class folders and tars listed by tasks; sources on S3; a killed planning driver resumed
from its finished ranges.

`planning.on_ray_bytes=1` and `on_ray_folders=1` send these small sources down the Ray
path; one local Ray cluster serves the module.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import failures as F
from data_prep.plan import build_plan
from data_prep.plan_format import read_shard_plan
from tests.support.prep import all_samples, cfg_for, make_folders, on_ray, run_prep

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 50


def jft_rows(n: int, seed: int = 0) -> list[dict]:
    """JFT-style rows: 1-4 class names each, a size, an extra field."""
    rng = np.random.default_rng(seed)
    return [
        {
            "path": f"/img/{i:07d}.jpg",
            "labels": [f"c{k:03d}" for k in rng.choice(N_CLASSES, rng.integers(1, 5), False)],
            "size": int(rng.integers(1000, 90000)),
            "source": "web",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict], bad: dict[int, str] | None = None) -> Path:
    """`rows` a line each; `bad` maps a 1-based line number to a raw line put there."""
    lines = [json.dumps(r) for r in rows]
    for line_no, raw in sorted((bad or {}).items()):
        lines.insert(line_no - 1, raw)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def plan_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "_plan").iterdir()) if p.is_file()}


def records(cfg, plan) -> list[dict]:
    """Every planned record in shuffled order, holdout first, without its key."""
    out = []
    for split in [cfg.holdout.name, cfg.train_split]:
        if split in plan.splits:
            for i in range(plan.splits[split].num_shards):
                out += [{k: v for k, v in r.items() if k != "key"} for r in read_shard_plan(cfg, split, i)]
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_1_3_and_8_planning_tasks_give_byte_identical_plans(ray_local, tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", jft_rows(3000), bad={7: "{not json"})
    size = manifest.stat().st_size
    plans = {}
    for n in (1, 3, 8):
        cfg = on_ray(
            manifest,
            tmp_path / f"out{n}",
            range_bytes=-(-size // n),
            max_tasks=n,
            bucket_bytes=size // 5,
            shard_size=256,
        )
        cfg.holdout.count = 100
        plan = build_plan(cfg)
        plans[n] = plan_files(tmp_path / f"out{n}")
        assert not (tmp_path / f"out{n}" / "_plan" / "_work").exists()
    assert plans[1] == plans[3] == plans[8]
    assert plan.listed == 3001 and plan.failures == {F.BAD_MANIFEST_LINE: 1}
    assert plan.splits["val"].shard_counts == [100]
    assert plan.splits["train"].shard_counts == [256] * 11 + [84]
    assert plan.multi_label and len(plan.classes) == N_CLASSES
    # the records are those the in-process planner finds, each once
    local = cfg_for(manifest, tmp_path / "local")
    in_process = records(local, build_plan(local))
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, records(cfg, plan))) == sorted(map(key, in_process))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_shuffled_order_is_uniform_in_the_line_number(ray_local, tmp_path):
    n = 4000
    manifest = write_jsonl(tmp_path / "m.jsonl", jft_rows(n, seed=1))
    cfg = on_ray(
        manifest,
        tmp_path / "out",
        range_bytes=manifest.stat().st_size // 4 + 1,
        bucket_bytes=manifest.stat().st_size // 6,
        shard_size=500,
    )
    plan = build_plan(cfg)
    line = np.array([int(r["url"][5:12]) for r in records(cfg, plan)])
    position = np.arange(n)
    assert sorted(line.tolist()) == list(range(n))
    # the correlation is ~N(0, 1/sqrt(n)) for a uniform shuffle: 0.08 is a 5-sigma bound
    assert abs(np.corrcoef(line, position)[0, 1]) < 0.08
    # line decile x position decile: chi-square of 81 degrees of freedom, p = 1e-4 at 133
    table = np.histogram2d(line * 10 // n, position * 10 // n, bins=10)[0]
    expected = n / 100
    assert ((table - expected) ** 2 / expected).sum() < 133


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_manifest_split_in_many_files_plans_as_its_concatenation(ray_local, tmp_path):
    rows = jft_rows(1500, seed=2)
    whole = write_jsonl(tmp_path / "whole.jsonl", rows)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, lo in enumerate(range(0, 1500, 400)):
        write_jsonl(parts / f"part-{i:03d}.jsonl", rows[lo : lo + 400])
    a = build_plan(on_ray(whole, tmp_path / "a", shard_size=200))
    b = build_plan(on_ray(parts, tmp_path / "b", range_bytes=9000, shard_size=200))
    assert b.source_kind == "manifest" and b.listed == 1500
    assert plan_files(tmp_path / "a").keys() == plan_files(tmp_path / "b").keys()
    for name, data in plan_files(tmp_path / "a").items():
        if name != "_plan.json":
            assert plan_files(tmp_path / "b")[name] == data, name
    assert (a.splits, a.classes) == (b.splits, b.classes)


def awkward_step(data: bytes) -> int:
    """A range size whose range ends fall inside a UTF-8 character, between a CR and its LF,
    and inside the longest line (so that some ranges hold no line start at all)."""
    starts = [0] + [i + 1 for i, c in enumerate(data) if c == 10]
    longest = max(zip(starts, starts[1:], strict=False), key=lambda se: se[1] - se[0])
    for step in range(200, 3000):
        ends = range(step, len(data), step)
        if (
            any(data[e] & 0xC0 == 0x80 for e in ends)
            and any(data[e - 1 : e + 1] == b"\r\n" for e in ends)
            and sum(longest[0] < e < longest[1] - 1 for e in ends) >= 2
        ):
            return step
    raise AssertionError("no range size cuts all three")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranges_cut_utf8_characters_crlf_line_ends_and_very_long_lines(ray_local, tmp_path):
    rows = [
        {
            "path": f"/img/{i}.jpg",
            "label": "ünïcødé-€" if i % 2 else "plain",
            "caption": "日本語のキャプション" * (300 if i == 5 else 1 + i % 3),
        }
        for i in range(40)
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n" for r in rows))
    with io.StringIO(newline="") as buf:
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(["path", "label", "caption"])
        writer.writerows([r["path"], r["label"], r["caption"]] for r in rows)
        (tmp_path / "m.csv").write_bytes(buf.getvalue().encode())
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    for name in ("m.jsonl", "m.csv"):
        local = cfg_for(tmp_path / name, tmp_path / f"local-{name}", shard_size=7)
        want = sorted(map(key, records(local, build_plan(local))))
        plans = []
        for range_bytes in (awkward_step((tmp_path / name).read_bytes()), 1 << 20):
            cfg = on_ray(tmp_path / name, tmp_path / f"{name}-{range_bytes}", shard_size=7, range_bytes=range_bytes)
            plan = build_plan(cfg)
            assert plan.listed == 40 and plan.failures == {}, (name, range_bytes)
            assert sorted(map(key, records(cfg, plan))) == want, (name, range_bytes)
            plans.append(plan_files(tmp_path / f"{name}-{range_bytes}"))
        assert plans[0] == plans[1], name
        assert max(len(r["extra"]["caption"]) for r in records(cfg, plan)) == 3000


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_malformed_lines_unknown_labels_and_missing_fields_are_counted_with_file_and_line(ray_local, tmp_path):
    rows = jft_rows(300, seed=3)
    rows[40]["labels"] = ["no-such-class"]  # line 45 once the bad lines are in
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        rows,
        bad={
            5: "{not json",
            9: json.dumps({"labels": ["c001"]}),
            12: "[1, 2]",
            30: json.dumps({"path": "/x.jpg", "labels": []}),
        },
    )
    (tmp_path / "classes.txt").write_text("".join(f"c{i:03d}\n" for i in range(N_CLASSES)))
    classes = str(tmp_path / "classes.txt")
    local = build_plan(cfg_for(manifest, tmp_path / "local", classes_file=classes), write=False)
    plan = build_plan(on_ray(manifest, tmp_path / "out", range_bytes=997, classes_file=classes))
    url = str(manifest)
    assert plan.failures == {F.BAD_MANIFEST_LINE: 4, F.UNKNOWN_LABEL: 1} == local.failures
    assert plan.examples[F.BAD_MANIFEST_LINE] == local.examples[F.BAD_MANIFEST_LINE]
    assert plan.examples[F.BAD_MANIFEST_LINE].startswith(f"{url}:5: bad JSON")
    assert plan.examples[F.UNKNOWN_LABEL] == f"{url}:45: /img/0000040.jpg: labels ['no-such-class']"
    assert plan.listed == local.listed == 304 and plan.splits["train"].num_samples == 299

    bad_csv = tmp_path / "b.csv"
    bad_csv.write_text("path,label\n/a.jpg,x\n/b.jpg,y,extra\n/c.jpg\n/d.jpg,x\n")
    plan = build_plan(on_ray(bad_csv, tmp_path / "csv", range_bytes=8), write=False)
    assert plan.failures == {F.BAD_MANIFEST_LINE: 2}
    assert plan.examples[F.BAD_MANIFEST_LINE] == f"{bad_csv}:3: wrong number of fields"
    assert not (tmp_path / "csv" / "_plan" / "_work").exists()  # a dry run leaves no scratch
    no_header = tmp_path / "n.csv"
    no_header.write_text("a,b\n/a.jpg,x\n")
    with pytest.raises(ValueError, match=f"manifest {no_header} needs a header"):
        build_plan(on_ray(no_header, tmp_path / "n"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_shard_bytes_cuts_as_in_process_whatever_the_ranges(ray_local, tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", jft_rows(1200, seed=4))
    cap = 400_000
    plans = []
    for range_bytes in (3000, 1 << 20):
        cfg = on_ray(
            manifest,
            tmp_path / f"o{range_bytes}",
            range_bytes=range_bytes,
            bucket_bytes=20000,
            shard_size=30,
            shard_bytes=cap,
        )
        cfg.holdout.count = 50
        plan = build_plan(cfg)
        plans.append(plan_files(tmp_path / f"o{range_bytes}"))
    assert plans[0] == plans[1]
    recs = records(cfg, plan)
    pos = 0
    for split in ("val", "train"):
        sp = plan.splits[split]
        for i, (count, nbytes) in enumerate(zip(sp.shard_counts, sp.shard_bytes, strict=True)):
            sizes = [r["size"] for r in recs[pos : pos + count]]
            assert nbytes == sum(sizes) and (nbytes <= cap or count == 1)
            pos += count
            last = i == sp.num_shards - 1
            # greedy: the next record did not fit, or the shard was full, or the split ended
            assert last or count == 30 or nbytes + recs[pos]["size"] > cap
    assert pos == 1200 and plan.splits["val"].num_samples == 50


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_job_planned_on_ray_shards_every_sample_of_the_manifest(ray_local, tmp_path):
    files = make_folders(tmp_path / "src", per_class=5)
    rows = [{"path": str(p), "labels": [p.parent.name], "n": i} for i, p in enumerate(files)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows, bad={3: "{oops"})
    cfg = on_ray(manifest, tmp_path / "out", range_bytes=300, shard_size=4)
    cfg.holdout.count = 3
    summary = run_prep(cfg)
    assert summary["samples_per_split"] == {"train": 12, "val": 3} and summary["failed"] == 1
    got = sorted(json.loads(s["json"])["n"] for split in ("train", "val") for s in all_samples(tmp_path / "out", split))
    assert got == list(range(15)) and not (tmp_path / "out" / "_plan" / "_work").exists()


def make_class_tars(root: Path, classes: int, per_class: int) -> None:
    """Per-class tars whose members only need names and sizes to be planned."""
    root.mkdir()
    for c in range(classes):
        with tarfile.open(root / f"n{c:08d}.tar", "w") as tf:
            for i in range(per_class):
                info = tarfile.TarInfo(f"n{c:08d}_{i}.JPEG" if i else "LICENSE.txt")
                info.size = 10 + i
                tf.addfile(info, io.BytesIO(b"x" * info.size))
    (root / "notes.md").write_text("not a class")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_class_folders_and_tars_are_listed_by_tasks_whatever_the_grouping(ray_local, tmp_path):
    classes = [f"class{c:02d}" for c in range(10)] + ["dog"]  # make_folders hides a file in dog
    make_folders(tmp_path / "folders", per_class=3, classes=classes, w=8, h=8)
    make_class_tars(tmp_path / "tars", classes=9, per_class=4)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    for kind in ("folders", "tars"):
        local = cfg_for(tmp_path / kind, tmp_path / f"local-{kind}", shard_size=5)
        local_plan = build_plan(local)
        plans = []
        for per_task in (1, 4, 100):
            cfg = on_ray(tmp_path / kind, tmp_path / f"{kind}-{per_task}", shard_size=5, folders_per_task=per_task)
            plan = build_plan(cfg)
            plans.append(plan_files(tmp_path / f"{kind}-{per_task}"))
            assert (plan.listed, plan.ignored, plan.classes, plan.source_kind) == (
                local_plan.listed,
                local_plan.ignored,
                local_plan.classes,
                local_plan.source_kind,
            )
            want = sorted(map(key, records(local, local_plan)))
            assert sorted(map(key, records(cfg, plan))) == want
        assert plans[0] == plans[1] == plans[2], kind
    assert local_plan.source_kind == "class_tars" and local_plan.listed == 27


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_manifest_on_s3_plans_to_s3_as_the_local_copy_does(ray_local, s3_server, tmp_path):  # noqa: F811
    import s3fs

    manifest = write_jsonl(tmp_path / "m.jsonl", jft_rows(800, seed=5))
    s3 = s3fs.S3FileSystem(endpoint_url=s3_server)
    s3.mkdir("planning")
    s3.put_file(str(manifest), "planning/m.jsonl")
    local = build_plan(on_ray(manifest, tmp_path / "local", range_bytes=20000, shard_size=100))
    plan = build_plan(on_ray("s3://planning/m.jsonl", "s3://planning/out", range_bytes=20000, shard_size=100))
    s3.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.find("planning/out"))
    assert names == sorted(plan_files(tmp_path / "local"))  # no scratch left behind
    for name, data in plan_files(tmp_path / "local").items():
        if name != "_plan.json":
            assert s3.cat_file(f"planning/out/_plan/{name}") == data
    assert plan.splits == local.splits and plan.listed == 800

    make_folders(tmp_path / "src", per_class=2, classes=[f"c{i}" for i in range(5)] + ["dog"], w=8, h=8)
    s3.put(str(tmp_path / "src") + "/", "planning/src/", recursive=True)
    plan = build_plan(on_ray("s3://planning/src", "s3://planning/folders", folders_per_task=2))
    assert plan.source_kind == "folders" and plan.listed == 12 and plan.ignored == 2
    first = read_shard_plan(on_ray("s3://planning/src", "s3://planning/folders"), "train", 0)
    assert first[0]["url"].startswith("s3://planning/src/c")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkill_mid_plan_then_rerun_reuses_finished_ranges(ray_local, tmp_path, caplog):
    manifest = write_jsonl(tmp_path / "m.jsonl", jft_rows(20000, seed=6))
    settings = dict(range_bytes=manifest.stat().st_size // 40 + 1, max_tasks=1, shard_size=1000)
    script = (
        f"from tests.support.prep import on_ray\n"
        f"from data_prep.plan import build_plan\n"
        f"build_plan(on_ray({str(manifest)!r}, {str(tmp_path / 'killed')!r}, **{settings!r}))\n"
    )
    env = dict(os.environ, RAY_ADDRESS=ray_local, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    work = tmp_path / "killed" / "_plan" / "_work"
    try:
        deadline = time.monotonic() + 90
        while len(list(work.glob("*/ranges/*.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "no range finished in time"
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    done = len(list(work.glob("*/ranges/*.json")))
    assert 2 <= done < 40 and not (tmp_path / "killed" / "_plan" / "_plan.json").exists()
    time.sleep(1.0)  # let Ray reap the dead driver's task

    with caplog.at_level(logging.INFO, logger="data_prep"):
        resumed = build_plan(on_ray(manifest, tmp_path / "killed", **settings))
    reused = [r.getMessage() for r in caplog.records if "already scattered" in r.getMessage()]
    assert reused and int(reused[0].split()[1]) >= done
    clean = build_plan(on_ray(manifest, tmp_path / "clean", **settings))
    assert plan_files(tmp_path / "killed") == plan_files(tmp_path / "clean")
    assert resumed == clean and not work.exists()


@pytest.mark.parametrize(
    "override, key",
    [("planning.range_bytes=0", "planning.range_bytes"), ("planning.on_ray_folders=-1", "planning.on_ray_folders")],
)
def test_a_bad_planning_setting_is_an_error_naming_the_key(tmp_path, override, key):
    from data_prep.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"source={tmp_path}", f"output={tmp_path / 'o'}", override])


@pytest.mark.timeout(300)
def test_the_planning_benchmark_runs_its_three_planners_and_the_ray_plans_agree(ray_local, tmp_path):
    """``bench/bench_planning.py`` at a small size (its figures come from the by-hand runs)."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_planning.py"),
            "--lines",
            "20000",
            "--range-mb",
            "1",
            "--holdout",
            "2000",
            "--address",
            ray_local,
            "--keep",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "records/s" in line]
    assert [r.split(":")[0].strip() for r in rows] == ["in-process", "ray, 1 task", "ray, 2 tasks"]
    assert "ray plans byte-identical across task counts: True" in out.stdout
    assert "ray 2 tasks / 1 task:" in out.stdout and "ray 1 task / in-process:" in out.stdout
