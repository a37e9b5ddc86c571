"""One run, one writer (``pipeline.lease``): the lease on a local dir and on S3 (moto), the
driver that refuses a run a live job owns, and evaluations claimed once. The whole jobs that
take over an expired lease and a stopped owner's are in tests/test_recovery.py."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.lease import Fence, Lease, LeaseHeld
from pipeline.stop import Exit
from tests.support.jobs import fabricated_lease


@pytest.fixture(params=["local", "s3"])
def lease_url(request, tmp_path):
    """A lease file URL on a local dir, and on a moto S3 bucket."""
    if request.param == "local":
        yield str(tmp_path / "run" / "LEASE")
        return
    from tests.support.services import moto_s3

    with moto_s3("leases") as (_, env):
        import os

        os.environ.update(env)  # restored after the test (conftest)
        yield f"s3://leases/{uuid.uuid4().hex}/LEASE"  # moto's buckets outlive its server: a key of this test's own


def _race(url: str, n: int = 8) -> list[Lease]:
    """``n`` holders acquire the same lease at once; returns the winners."""
    leases = [Lease(url, heartbeat_s=10, expiry_s=60) for _ in range(n)]
    barrier = threading.Barrier(n)

    def take(lease: Lease) -> Lease | None:
        barrier.wait()
        try:
            lease.acquire()
            return lease
        except LeaseHeld:
            return None

    with ThreadPoolExecutor(n) as pool:
        return [w for w in pool.map(take, leases) if w is not None]


@pytest.mark.timeout(60)
def test_of_holders_acquiring_at_once_exactly_one_wins(lease_url):
    for _ in range(3):
        winners = _race(lease_url)
        assert len(winners) == 1
        winners[0].release()


def _acquire_in_a_process(url: str, start_at: float) -> bool:
    time.sleep(max(0.0, start_at - time.time()))
    try:
        Lease(url, heartbeat_s=10, expiry_s=60).acquire()
        return True
    except LeaseHeld:
        return False


@pytest.mark.timeout(120)
def test_of_processes_acquiring_at_once_exactly_one_wins(lease_url):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        start_at = time.time() + 5  # after every process has imported and started
        won = pool.starmap(_acquire_in_a_process, [(lease_url, start_at)] * 4)
    assert sorted(won) == [False, False, False, True]


@pytest.mark.timeout(60)
def test_the_owner_renews_and_no_one_else_can(lease_url):
    owner = Lease(lease_url, heartbeat_s=10, expiry_s=60)
    assert owner.acquire() is None
    before = json.loads(owner.store.read()[0])["heartbeat"]
    time.sleep(0.05)
    assert owner.renew() and owner.renew()
    assert json.loads(owner.store.read()[0])["heartbeat"] > before
    other = Lease(lease_url, heartbeat_s=10, expiry_s=60)
    with pytest.raises(LeaseHeld) as held:
        other.acquire()
    assert held.value.owner.token == owner.token and held.value.owner.pid == owner.me.pid
    assert not other.renew() and other.lost.is_set()
    assert owner.renew() and owner.holds()  # the failed attempts changed nothing
    owner.release()
    assert owner.store.read() is None
    again = Lease(lease_url, heartbeat_s=10, expiry_s=60)
    assert again.acquire() is None  # free again
    again.release()


@pytest.mark.timeout(60)
def test_an_expired_lease_is_taken_over_and_its_old_owner_finds_it_lost(lease_url):
    old = Lease(lease_url, heartbeat_s=0.1, expiry_s=0.5)
    old.acquire()
    fence = Fence(lease_url, old.token, every_s=0)
    assert not fence.lost()
    time.sleep(0.7)  # the owner stopped renewing (SIGSTOP, a lost host)
    new = Lease(lease_url, heartbeat_s=10, expiry_s=60)
    taken = new.acquire()
    assert taken is not None and taken.token == old.token
    lost = []
    old.on_lost = lost.append
    assert not old.renew() and old.lost.is_set()
    assert lost and lost[0].token == new.token
    assert fence.lost()
    assert new.holds() and new.renew()
    old.release()  # a lost lease is not the old owner's to delete
    assert new.holds()


@pytest.mark.timeout(60)
def test_the_lease_of_a_process_of_this_machine_that_ended_is_taken_over_at_once(lease_url):
    import subprocess
    import sys

    from tests.support import ROOT

    take = f"from pipeline.lease import Lease; import os; Lease({lease_url!r}, 10, 60).acquire(); os._exit(0)"
    dead = subprocess.run([sys.executable, "-c", take], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert dead.returncode == 0, dead.stderr[-3000:]
    previous = Lease(lease_url, heartbeat_s=10, expiry_s=60).acquire()  # 60 s before it expires
    assert previous is not None and previous.ended() and not previous.expired()


@pytest.mark.timeout(60)
def test_the_renewal_thread_keeps_a_lease_alive_past_its_expiry(lease_url):
    # Timings with room for a loaded machine: a renewal stalled past the expiry loses the lease.
    owner = Lease(lease_url, heartbeat_s=0.2, expiry_s=1.5)
    owner.acquire()
    owner.start()
    time.sleep(3)
    with pytest.raises(LeaseHeld):
        Lease(lease_url, heartbeat_s=10, expiry_s=60).acquire()
    owner.release()
    assert not owner.lost.is_set() and owner.store.read() is None


# ---------------------------------------------------------------- the driver (python -m pipeline.run)


@pytest.mark.timeout(120)
def test_a_run_a_live_job_owns_is_refused_with_exit_2_naming_the_owner_before_ray_starts(tmp_path, capsys):
    import ray

    from pipeline.run import main
    from tests.support import ROOT
    from tests.support.jobs import TINY

    out = tmp_path / "run"
    owner = fabricated_lease(str(out / "LEASE"), expiry_s=60)
    t0 = time.time()
    assert main([str(ROOT / "configs" / "experiment" / "demo.yaml"), f"output_dir={out}", *TINY]) == 2
    took = time.time() - t0
    err = capsys.readouterr().err
    assert (
        f"is owned by Ray job raysubmit_other of cluster 10.0.0.9:6379 on host {owner.me.host} (pid {owner.me.pid})"
        in err
    )
    assert re.search(r"last heartbeat \d+s ago\. This launch does not train", err), err
    assert f"python -m pipeline.rundir stop {out}" in err
    assert not ray.is_initialized() and not (out / "corpus").exists() and not (out / "mlflow_run_id").exists()
    assert owner.holds()  # untouched
    print(f"\nrefused in {took:.1f}s")


# ---------------------------------------------------------------- launch/train_dist.sh (torchrun): rank 0 owns the run


@pytest.mark.timeout(540)
def test_train_dist_refuses_a_run_a_live_job_owns_and_owns_the_run_it_trains_and_resumes_it_on_another_nproc(
    tmp_path, capsys, ranks
):
    import subprocess

    from pipeline.run import main
    from tests.support import DEMO, ROOT
    from tests.support.data import write_shards
    from tests.support.jobs import TINY
    from tests.support.phases import guard_run_overrides, ranks_env

    shards = write_shards(tmp_path / "shards", num_classes=4, per_shard=[40, 40, 40])
    out = tmp_path / "run"
    cmd = [str(ROOT / "launch" / "train_dist.sh"), "--nproc", "2", str(DEMO), *guard_run_overrides(out, shards)]

    owner = fabricated_lease(str(out / "LEASE"), expiry_s=120)
    refused = ranks.run(cmd, env=ranks_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == Exit.CONFIG, refused.stdout[-3000:] + refused.stderr[-5000:]
    assert f"is owned by Ray job raysubmit_other of cluster 10.0.0.9:6379 on host {owner.me.host}" in refused.stderr
    assert "This launch does not train" in refused.stderr
    assert owner.holds() and not (out / "checkpoints").exists() and not (out / "mlflow.db").exists()
    owner.release()

    # Its own run: rank 0 holds the lease while it trains (a Ray launch of the run is refused, naming
    # the torchrun job) and releases it at the end.
    with ranks.popen(
        [*cmd, "train.steps=24"], env=ranks_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            deadline = time.time() + 120
            while not (out / "LEASE").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert (out / "LEASE").exists(), "train_dist.sh took no lease"
            capsys.readouterr()
            assert main([str(DEMO), f"output_dir={out}", *TINY]) == Exit.CONFIG
            err = capsys.readouterr().err
            assert re.search(r"is owned by torchrun job \S+ on host \S+ \(pid \d+\)", err), err
            text, _ = proc.communicate(timeout=200)
        finally:
            proc.kill()
    assert proc.returncode == 0, text[-6000:]
    assert (out / "checkpoints" / "step_00000024").is_dir()
    assert not (out / "LEASE").exists()  # released at the end
    from mlflow.tracking import MlflowClient

    (summary,) = [json.loads(line) for line in text.splitlines() if line.startswith('{"step"')]
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(summary["run_id"]).info.status == "FINISHED"

    # The same command on another --nproc goes on with the run: the checkpoint converts by itself.
    cmd[2] = "1"
    again = ranks.run([*cmd, "train.steps=28"], env=ranks_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert (
        "checkpoint step_00000024 saved at world size 2, resuming at 1: converted to universal in"
        in again.stdout + again.stderr
    )
    assert (out / "checkpoints" / "step_00000028").is_dir() and not (out / "LEASE").exists()


# ---------------------------------------------------------------- evaluations, claimed once


@pytest.mark.timeout(60)
def test_of_two_claimers_of_one_evaluation_one_wins_and_a_dead_claimers_claim_is_taken_over(
    lease_url,
):
    from pipeline.config import LeaseConfig
    from pipeline.evaluate.record import claimed
    from pipeline.rundir import RunDir

    run = RunDir(lease_url.rsplit("/", 1)[0])
    claims = LeaseConfig(heartbeat_s=0.2, expiry_s=1.5)  # room for a loaded machine
    names = {"fewshot-digits", "fewshot-digits-ema"}
    barrier = threading.Barrier(2)

    def claim(hold_s: float) -> set[str]:
        barrier.wait()
        with claimed(run, "step_00000004", sorted(names), claims) as mine:
            time.sleep(hold_s)
            return mine

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(claim, [0.5, 0.5]))
    # Each evaluation claimed once, by one of the two.
    assert not set.intersection(*got) and set.union(*got) == names

    with claimed(run, "step_00000004", sorted(names), claims) as first:
        time.sleep(2.5)  # past the expiry: the holder's renewals keep its claims
        with claimed(run, "step_00000004", sorted(names), claims) as second:
            assert first == names and second == set()

    dead = Lease(run.claim_url("step_00000008", "fewshot-digits"), heartbeat_s=0.2, expiry_s=1.5)
    dead.acquire()  # a claimer that never renews (its process died)
    with claimed(run, "step_00000008", ["fewshot-digits"], claims) as mine:
        assert mine == set()
    time.sleep(1.7)
    with claimed(run, "step_00000008", ["fewshot-digits"], claims) as mine:
        assert mine == {"fewshot-digits"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_watchers_over_one_run_dir_evaluate_and_publish_each_checkpoint_once(tmp_path, mlflow_servers):
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate.watch import Watcher
    from pipeline.rundir import RunDir
    from tests.support.data import copy_tags, eval_cfg, make_checkpoints, write_digits_shards
    from tests.support.services import child_runs, new_run

    digits = write_digits_shards(tmp_path / "digits")
    ckpts = make_checkpoints(tmp_path / "pretrain", [0, 2])
    srv = mlflow_servers(tmp_path / "mlflow")
    try:
        client = MlflowClient(srv.uri)
        _, run_id = new_run(client, "two-watchers")
        run = RunDir(str(tmp_path / "run"))
        copy_tags(ckpts, tmp_path / "run" / "checkpoints", ["step_00000000", "step_00000002"], run_id)
        # The in-job watcher and a `python -m pipeline.evaluate watch` of the same run, at once.
        watchers = [Watcher(eval_cfg(digits), run, srv.uri, run_id, use_ray=False) for _ in range(2)]
        barrier = threading.Barrier(2)

        def watch(w: Watcher) -> None:
            barrier.wait()
            for _ in range(3):
                w.poll()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(watch, watchers))
        # Each checkpoint evaluated by one of the two.
        evaluated = [tag for w in watchers for tag, res in w.results.items() if res["fewshot"]]
        assert sorted(evaluated) == ["step_00000000", "step_00000002"]
        assert not any(w.failed for w in watchers)
        steps = sorted(int(c.data.tags["eval.checkpoint_step"]) for c in child_runs(client, run_id))
        assert steps == [0, 2]
        assert sorted(m.step for m in client.get_metric_history(run_id, "fewshot/digits/5shot")) == [0, 2]
    finally:
        srv.stop()
