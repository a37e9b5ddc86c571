"""Test tiers, each a pytest marker applied from the fixtures a test uses (never by hand).

A test's tier is the most expensive thing it starts:

- ``unit``: nothing that outlives a command (in-process code, files, threads, a short CLI run);
- ``service``: a real ``mlflow server`` process;
- ``ray``: uses a local Ray cluster;
- ``ranks``: starts torchrun / DeepSpeed process groups;
- ``browser``: renders MLflow's UI in headless Chromium;
- ``job``: a whole job (data_prep, training, evaluation) through a launcher or ``pipeline.run``;
- ``cluster``: network-namespace hosts or a real SLURM (needs root);
- ``install``: builds a virtual environment with ``launch/setup.sh``.

The inner loop is ``pytest -m "not (job or cluster or install)"``; CI runs every tier.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
from collections import defaultdict

import psutil
import pytest
from xdist.scheduler import LoadScopeScheduling

TIERS = ("unit", "service", "ray", "ranks", "browser", "job", "cluster", "install")

# The fixture that makes a test belong to a tier. A test in several gets the last of TIERS.
FIXTURE_TIER = {
    "mlflow_server": "service",
    "mlflow_servers": "service",
    "ray_local": "ray",
    "ray_head": "ray",
    "ranks": "ranks",
    "chromium": "browser",
    "job": "job",
    "jobs": "job",
    "slurm": "cluster",
    "two_hosts": "cluster",
    "fresh_venv": "install",
}


def tier_of(fixturenames: list[str]) -> str:
    found = {FIXTURE_TIER[f] for f in fixturenames if f in FIXTURE_TIER}
    return max(found, key=TIERS.index, default="unit")


# Rough seconds a test of each tier takes on an idle 2-core machine (bench/RESULTS.md, "The test
# suite"): used only to hand the longest groups to pytest-xdist's workers first.
TIER_SECONDS = {"unit": 0.5, "service": 5, "ray": 2, "ranks": 14, "browser": 9, "job": 65, "cluster": 80, "install": 85}


CLUSTER_DIR = "tests/cluster/"


def group_of(nodeid: str) -> str:
    """The group a pytest-xdist worker takes whole: the test's module (its module fixtures start
    once), or for every module in ``tests/cluster/`` that directory: network-namespace hosts and
    a SLURM cluster are machine-wide, so those modules run one after another on one worker."""
    module = nodeid.split("::", 1)[0]
    return CLUSTER_DIR.rstrip("/") if module.startswith(CLUSTER_DIR) else module


def schedule(items, tiers: dict[str, str]) -> list:
    """The tests in the order of the queue that ``GroupScheduling`` serves from both ends, each
    group's own order kept: first the groups with an exclusive-tier test (``EXCLUSIVE``, which
    take turns), longest first (by ``TIER_SECONDS``), which the first worker takes from the
    front; then the other groups, shortest first, so that the other worker, taking from the
    back, starts with the longest. One worker runs the exclusive groups one after another while
    the other runs the rest beside them, never waiting for a turn; whichever runs out first
    goes on with what is left at its end. A ``cluster`` test outside ``tests/cluster/`` is
    refused: it would run beside the other machine-wide tests."""
    misplaced = [i.nodeid for i in items if tiers[i.nodeid] == "cluster" and not i.nodeid.startswith(CLUSTER_DIR)]
    if misplaced:
        raise pytest.UsageError(f"cluster-tier tests belong in {CLUSTER_DIR} (run one at a time): {misplaced}")
    weight: dict[str, float] = defaultdict(float)
    exclusive: set[str] = set()
    members: dict[str, list] = defaultdict(list)
    for item in items:
        group = group_of(item.nodeid)
        weight[group] += TIER_SECONDS[tiers[item.nodeid]]
        members[group].append(item)
        if tiers[item.nodeid] in EXCLUSIVE:
            exclusive.add(group)
    order = list(members)  # collection order: ties break the same way in every worker
    front = sorted((g for g in order if g in exclusive), key=lambda g: (-weight[g], order.index(g)))
    back = sorted((g for g in order if g not in exclusive), key=lambda g: (weight[g], -order.index(g)))
    return [item for group in front + back for item in members[group]]


# The tiers whose tests take the whole machine (several process trees, waits with deadlines):
# under pytest-xdist they take turns, while the other worker runs lighter tests beside them.
EXCLUSIVE = ("job", "cluster")


@contextlib.contextmanager
def turn(item):
    """Hold the machine-wide turn of the exclusive tiers while ``item`` runs (setup, call and
    teardown, and so its module's fixtures too), when it is one of them and pytest-xdist's
    workers share this machine; the wait for the turn is outside the test's timeout."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None or not any(item.get_closest_marker(t) for t in EXCLUSIVE):
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), f"vit-tests-{run}.turn"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class GroupScheduling(LoadScopeScheduling):
    """pytest-xdist's scope scheduling with ``group_of`` as the scope (its ``loadgroup`` marks
    do not reach the scheduler under pytest 9.2, whose node ids are no longer strings), and the
    queue that ``schedule`` ordered served from both ends: the first worker takes its next
    group from the front (the exclusive groups), the others from the back. (pytest-xdist's own
    takes every group from the front: a worker done with the other groups took an exclusive
    one and waited for its turn while the first worker's cluster test sat out Ray's timeouts,
    90 s with both cores mostly idle.)"""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)

    def _assign_work_unit(self, node) -> None:
        scope, work_unit = self.workqueue.popitem(last=node is not self.nodes[0])
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(nodeid) for nodeid, done in work_unit.items() if not done])


class Processes:
    """The processes a test or fixture starts, each in a session (process group) of its own.

    ``run`` and ``popen`` take ``subprocess``'s arguments. A ``run`` past its timeout kills the
    whole group before raising; ``close`` kills, by pid, every group that is still alive and
    every descendant that left its group (Ray's workers do), so nothing outlives its test.
    """

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def popen(self, cmd, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def run(
        self, cmd, *, timeout: float, capture_output: bool = False, input=None, check: bool = False, **kwargs
    ) -> subprocess.CompletedProcess:
        if capture_output:
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if input is not None:
            kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(cmd, **kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_family(proc.pid)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def close(self) -> None:
        for proc in self.started:
            kill_family(proc.pid)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.started.clear()


def kill_family(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` and every descendant of ``pid``."""
    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


class TierReport:
    """Per tier: tests, seconds (setup + call + teardown), skips and their reasons."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.skips: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, report) -> None:
        # From the report's keywords (the tier markers), as pytest-xdist's workers send them.
        tier = next((t for t in reversed(TIERS) if t in report.keywords), "unit")
        self.seconds[tier] += report.duration
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.counts[tier] += 1
        if report.skipped and isinstance(report.longrepr, tuple):
            self.skips[tier][report.longrepr[2].removeprefix("Skipped: ")] += 1

    def lines(self) -> list[str]:
        out = []
        for tier in TIERS:
            if self.counts.get(tier):
                out.append(f"{tier:>8}: {self.counts[tier]:4d} tests {self.seconds[tier]:8.1f} s")
        for tier in TIERS:
            for reason, n in sorted(self.skips.get(tier, {}).items()):
                out.append(f"SKIPPED {n} {tier} test(s): {reason}")
        return out
