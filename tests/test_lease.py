"""One run, one writer (``pipeline.lease``): the lease on a local dir and on S3 (moto), the
driver that refuses a run a live job owns and takes over an expired one, and evaluations
claimed once."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.lease import Fence, Lease, LeaseHeld


@pytest.fixture(params=["local", "s3"])
def lease_url(request, tmp_path):
    """A lease file URL on a local dir, and on a moto S3 bucket."""
    if request.param == "local":
        yield str(tmp_path / "run" / "LEASE")
        return
    from conftest import moto_s3

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
def test_the_renewal_thread_keeps_a_lease_alive_past_its_expiry(lease_url):
    owner = Lease(lease_url, heartbeat_s=0.1, expiry_s=0.6)
    owner.acquire()
    owner.start()
    time.sleep(1.5)
    with pytest.raises(LeaseHeld):
        Lease(lease_url, heartbeat_s=10, expiry_s=60).acquire()
    owner.release()
    assert not owner.lost.is_set() and owner.store.read() is None
