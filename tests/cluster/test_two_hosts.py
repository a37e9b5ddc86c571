"""Two hosts that share no disk: the demo trains across them with its run dir on S3, through
the loss of a host, and an elastic group shrinks and grows back.

The hosts are network namespaces on a bridge (``tests/support/hosts.py``), each with a private
tmpfs over the same path (its "local disk"): nothing one host writes there is visible to
the other. Host 1 runs the Ray head, a moto S3 server and an MLflow server, reached by
address (not 127.0.0.1); host 2 runs a Ray worker. Only what the fixture started is
stopped, by pid, and its namespaces and links are deleted even when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.hosts import Host, cannot_make_hosts, network, wait_port

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    reason = cannot_make_hosts()
    if reason:
        print(f"two-host tests skipped: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("two_hosts")
    with network("vh", 200, 2, logs) as (h1, h2):
        disk = h1.disk
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DS_ACCELERATOR": "cpu",
            "RAY_AUTH_MODE": "disabled",
            "RAY_DEDUP_LOGS": "0",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("RAY_ADDRESS", None)
        s3 = f"http://{h1.addr}:9000"
        moto = h1.popen([sys.executable, "-m", "moto.server", "-H", h1.addr, "-p", "9000"], env, "moto")
        mlflow_dir = logs / "mlflow"
        mlflow_dir.mkdir()
        mlflow = h1.popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(mlflow_dir / "artifacts"),
                "--host",
                h1.addr,
                "--port",
                "5000",
                "--workers",
                "1",
            ],
            {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            "mlflow",
        )
        env.update(
            {"AWS_ENDPOINT_URL": s3, "FSSPEC_S3_ENDPOINT_URL": s3, "MLFLOW_TRACKING_URI": f"http://{h1.addr}:5000"}
        )
        ray = shutil.which("ray", path=str(Path(sys.executable).parent))
        # The head's GCS checks each node's health every second instead of every 3 s (Ray's
        # default), still declaring it dead after 5 failed checks in a row: a lost host is seen
        # in about 5 s instead of 15 (a slow answer is not a failure until 10 s, the timeout).
        # Right after a host is lost, Ray Train still counts its resources (its autoscaling
        # coordinator refreshes every 20 s) and starts the elastic group there at the old size,
        # which waits out the worker group's start timeout before it is sized again: 30 s here
        # instead of Ray's 60 (a group starts in 8-15 s on these hosts).
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
        head_env = {**env, "RAY_health_check_period_ms": "1000"}
        head = h1.popen(
            [
                ray,
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                h1.addr,
                "--port",
                "6379",
                "--num-cpus",
                "1",
                "--temp-dir",
                f"{disk}/ray",
                "--dashboard-host",
                h1.addr,
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ],
            head_env,
            "ray-head",
        )
        wait_port(h1.addr, 6379, 90, "ray head", head)
        worker = h2.popen(
            [
                ray,
                "start",
                "--block",
                "--address",
                f"{h1.addr}:6379",
                "--node-ip-address",
                h2.addr,
                "--num-cpus",
                "1",
                "--disable-usage-stats",
            ],
            env,
            "ray-worker",
        )
        wait_port(h1.addr, 9000, 60, "moto", moto)
        wait_port(h1.addr, 5000, 150, "mlflow server", mlflow)
        import boto3

        boto3.client(
            "s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        ).create_bucket(Bucket="runs")
        status = _wait_nodes(h1, env, 2, 90)
        assert worker.poll() is None, status
        yield {
            "h1": h1,
            "h2": h2,
            "env": env,
            "ray": ray,
            "s3": s3,
            "disk": disk,
            "logs": logs,
            "mlflow": f"http://{h1.addr}:5000",
        }


def _wait_nodes(h1: Host, env: dict, n: int, timeout: float) -> str:
    code = (
        "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    end, out = time.time() + timeout, ""
    while time.time() < end:
        proc = h1.run([sys.executable, "-c", code], {**env, "RAY_ADDRESS": f"{h1.addr}:6379"}, 60)
        out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        if out == str(n):
            return out
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster did not reach {n} nodes: {out}")


def _s3fs(url: str):
    import s3fs

    return s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": url, "region_name": "us-east-1"}
    )


TINY = [
    "demo.classes=10",
    "demo.per_class=16",
    "prep.0.shard_size=64",
    "train.steps=4",
    "train.global_batch_size=32",
    "data.micro_batch_size=16",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "eval.fewshot.0.shots=[1,5]",
    "eval.fewshot.0.seeds=1",
    "eval.poll_seconds=0.5",
    "tracking.system_metrics=false",
    "data.num_workers=0",
]


@pytest.mark.timeout(900)
def test_the_demo_trains_across_two_hosts_through_s3_and_losing_a_host_restarts_it_from_the_latest_checkpoint(
    two_hosts,
):
    """The demo across two hosts with private disks, its run dir on S3 and every checkpoint
    evaluated; host 2 is lost mid-run (its processes and its disk) and comes back: the group
    restarts from the latest checkpoint in S3 and the run finishes."""
    h1, h2, env = two_hosts["h1"], two_hosts["h2"], two_hosts["env"]
    fs = _s3fs(two_hosts["s3"])
    t0 = time.time()
    job = h1.popen(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "configs/experiment/demo.yaml",
            f"output_dir={two_hosts['disk']}/loss",
            "name=hostloss",
            "ray.storage_path=s3://runs/two",
            f"ray.address={h1.addr}:6379",
            "ray.max_failures=3",
            "eval.num_cpus=1",
            *TINY,
            "train.steps=12",
            "train.checkpoint_every=3",
        ],
        env,
        "hostloss-job",
    )
    log = two_hosts["logs"] / f"{h1.name}-hostloss-job.log"
    steps = re.compile(r"step (\d+)/12 loss")
    end = time.time() + 400
    while not (
        fs.exists("runs/two/hostloss/checkpoints/step_00000003/COMPLETE")
        and any(int(m) >= 4 for m in steps.findall(log.read_text()))
    ):
        assert job.poll() is None and time.time() < end, log.read_text()[-5000:]
        time.sleep(0.5)
        fs.invalidate_cache()
    before = len(log.read_text())
    nodes = set(re.findall(r"training worker rank \d on node (\w+)", log.read_text()[:before]))
    assert len(nodes) == 2, f"the two training workers ran on {nodes}"
    t_kill = time.time()
    h2.kill_all()  # its raylet, its workers (one training rank among them) and the host's disk
    h2.boot()
    h2.popen(
        [
            two_hosts["ray"],
            "start",
            "--block",
            "--address",
            f"{h1.addr}:6379",
            "--node-ip-address",
            h2.addr,
            "--num-cpus",
            "1",
            "--disable-usage-stats",
        ],
        env,
        "ray-worker-again",
    )
    while not (steps.search(log.read_text()[before:]) and "resumed from" in log.read_text()[before:]):
        assert job.poll() is None and time.time() < end + 300, log.read_text()[-6000:]
        time.sleep(0.5)
    t_first = time.time()
    assert job.wait(400) == 0, log.read_text()[-6000:]
    text = log.read_text()
    after = text[before:]
    resumed = int(re.search(r"resumed from \S+/step_(\d+)", after).group(1))
    print(
        f"\nhost 2 killed after step >= 4; resumed from checkpoint step {resumed} in S3; first new step "
        f"{t_first - t_kill:.0f}s after the kill; {time.time() - t0:.0f}s in all; "
        + " | ".join(x.strip() for x in text.splitlines() if x.startswith("few-shot"))
    )
    assert resumed >= 3 and fs.exists(f"runs/two/hostloss/checkpoints/step_{resumed:08d}/COMPLETE")
    assert len(set(re.findall(r"training worker rank \d on node (\w+)", after))) == 2, "the restarted group"
    fs.invalidate_cache()
    tags = [f"step_{step:08d}" for step in (0, 3, 6, 9, 12)]
    for tag in tags:
        assert fs.exists(f"runs/two/hostloss/checkpoints/{tag}/COMPLETE"), fs.find("runs/two/hostloss/checkpoints")
        assert fs.exists(f"runs/two/hostloss/evals/{tag}/fewshot-digits.json")
        assert fs.exists(f"runs/two/hostloss/evals/{tag}/fewshot-digits.mlflow")  # shown in MLflow
    # Both ranks' ZeRO shards reached S3, from their own hosts.
    shards = [p for p in fs.find("runs/two/hostloss/checkpoints/step_00000012") if "optim_states" in p]
    assert len(shards) == 2, shards
    assert fs.exists("runs/two/hostloss/shards/glyphs/train_index.json")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(two_hosts["mlflow"])
    run_id = fs.cat("runs/two/hostloss/mlflow_run_id").decode().strip()
    parent = client.get_run(run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 13))
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert sorted(int(c.data.tags["eval.checkpoint_step"]) for c in children) == [0, 3, 6, 9, 12]
    # Nothing of the run is on host 2's disk but its scratch copy; host 1's scratch is not on the shared one.
    assert not Path(two_hosts["disk"], "loss").exists()


@pytest.mark.timeout(1200)
def test_an_elastic_group_goes_on_without_a_lost_host_and_grows_back_when_it_returns(two_hosts):
    """min 1 / max 2 workers, one per host (each host has 1 CPU): host 2 lost for good -> the
    run goes on with 1 rank from the latest checkpoint (resharded); host 2 back -> 2 ranks again,
    from the next checkpoint of the 1-rank group.
    In the canonical order (``data.order=canonical``), as the README advises for elastic runs."""
    h1, h2, env = two_hosts["h1"], two_hosts["h2"], two_hosts["env"]
    fs = _s3fs(two_hosts["s3"])
    total = 60  # the 1-rank group must still be training when host 2 is back (its steps take ~0.35 s here)
    job = h1.popen(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "configs/experiment/demo.yaml",
            f"output_dir={two_hosts['disk']}/elastic",
            "name=elastic",
            "ray.storage_path=s3://runs/two",
            f"ray.address={h1.addr}:6379",
            "ray.min_workers=1",
            "ray.num_workers=2",
            "ray.max_failures=4",
            "data.order=canonical",
            "eval.enabled=false",
            *TINY,
            f"train.steps={total}",
            "train.checkpoint_every=3",
        ],
        env,
        "elastic-job",
    )
    log = two_hosts["logs"] / f"{h1.name}-elastic-job.log"
    steps = re.compile(rf"step (\d+)/{total} loss")
    end = time.time() + 900

    def wait(what: str, ok) -> float:
        while not ok(log.read_text()):
            assert job.poll() is None and time.time() < end, f"waiting for {what}:\n" + log.read_text()[-6000:]
            time.sleep(0.5)
            fs.invalidate_cache()
        return time.time()

    wait(
        "step 4 on 2 ranks",
        lambda t: (
            fs.exists("runs/two/elastic/checkpoints/step_00000003/COMPLETE")
            and any(int(m) >= 4 for m in steps.findall(t))
        ),
    )
    before = len(log.read_text())
    t_kill = time.time()
    h2.kill_all()  # for good: no Ray node comes back on host 2 until the group has shrunk
    t_small = wait(
        "a step on 1 rank",
        lambda t: "resumes on 1 ranks" in t[before:] and steps.search(t[before:].split("resumes on 1 ranks", 1)[1]),
    )
    small = len(log.read_text())
    h2.boot()
    t_back = time.time()
    h2.popen(
        [
            two_hosts["ray"],
            "start",
            "--block",
            "--address",
            f"{h1.addr}:6379",
            "--node-ip-address",
            h2.addr,
            "--num-cpus",
            "1",
            "--disable-usage-stats",
        ],
        env,
        "ray-worker-back",
    )
    t_big = wait(
        "a step on 2 ranks",
        lambda t: "resumes on 2 ranks" in t[small:] and steps.search(t[small:].split("resumes on 2 ranks", 1)[1]),
    )
    assert job.wait(400) == 0, log.read_text()[-6000:]
    print(
        f"\nelastic: host 2 lost -> first step on 1 rank after {t_small - t_kill:.0f}s; host 2 back -> first step "
        f"on 2 ranks after {t_big - t_back:.0f}s"
    )
    # Growth waits for a checkpoint (pipeline.elastic): the 2-rank group resumes from the step the
    # 1-rank group had just checkpointed, so no step was trained twice.
    grown = log.read_text()[small:]
    regrow = re.search(r"step (\d+) resumes on 2 ranks", grown)
    last_small = max(int(m) for m in steps.findall(grown[: regrow.start()]))
    assert int(regrow.group(1)) == last_small and last_small % 3 == 0, grown[: regrow.end()][-6000:]
    assert "waiting up to" in grown[: regrow.start()]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(two_hosts["mlflow"])
    run_id = fs.cat("runs/two/elastic/mlflow_run_id").decode().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, total + 1))
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run_id, "train/world_size"), key=lambda m: m.step)]
    changes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert changes == [2, 1, 2], sizes
    resizes = sorted(v for k, v in run.data.tags.items() if k.startswith("elastic.resize."))
    assert resizes == ["1 -> 2 ranks", "2 -> 1 ranks"], run.data.tags
