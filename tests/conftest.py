"""Shared fixtures and the test tiers.

Real components, each started where the tests that need it share it: small real shards, a
moto S3 endpoint and a local Ray cluster per module that uses them, process registries that
kill what a test started by pid. Helpers live in ``tests/support``; tiers are markers applied
from the fixtures a test uses (``tests/support/tiers.py``).
"""

from __future__ import annotations

import os
import shutil

import fsspec
import pytest

from tests.support.data import write_shards
from tests.support.services import MlflowServer, moto_s3
from tests.support.tiers import TIERS, GroupScheduling, Processes, TierReport, schedule, tier_of, turn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_REPORT = TierReport()


def pytest_configure(config):
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier, applied from the fixtures a test uses")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before `-m` deselects: mark each test with its tier; order the groups that pytest-xdist's
    workers take longest first (``tests/support/tiers.py: schedule``)."""
    tiers = {item.nodeid: tier_of(item.fixturenames) for item in items}
    items[:] = schedule(items, tiers)
    for item in items:
        item.add_marker(getattr(pytest.mark, tiers[item.nodeid]))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Job and cluster tests take turns across the xdist workers (``tests/support/tiers.py:
    turn``); outermost, so that waiting for a turn is not part of a test's timeout."""
    with turn(item):
        yield


def pytest_xdist_make_scheduler(config, log):
    """Whole groups to a worker (``tests/support/tiers.py: group_of``), in collection order."""
    return GroupScheduling(config, log)


def pytest_runtest_logreport(report):
    _REPORT.add(report)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    lines = _REPORT.lines()
    if lines:
        terminalreporter.write_sep("=", "time by tier (setup + call + teardown)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test must not leak environment (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 endpoint on 127.0.0.1 with dummy credentials in the environment."""
    with moto_s3() as (endpoint, env):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
        yield endpoint
        fsspec.config.conf["s3"].pop("endpoint_url", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray cluster in this process for the module; started after the S3 environment
    is set, so that its workers inherit the endpoint and the dummy credentials."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ranks():
    """torchrun / DeepSpeed process groups: started through this, killed by pid at the end."""
    procs = Processes()
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def job():
    """Whole jobs (launchers, ``pipeline.run``): started through this, killed by pid at the end."""
    procs = Processes()
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (sqlite store, proxied artifacts) on 127.0.0.1 for the module."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def mlflow_servers():
    """Start ``mlflow server``s of the test's own (for outages: the test stops and restarts
    them); each is stopped at the end of the test."""
    started: list[MlflowServer] = []

    def start(root) -> MlflowServer:
        started.append(MlflowServer(root).start())
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(autouse=True)
def _shared_services_alive(request):
    """A shared server that died fails the tests that need it at once, naming it, instead of
    leaving them to wait on a dead port until their timeout."""
    if "mlflow_server" in request.fixturenames:
        srv = request.getfixturevalue("mlflow_server")
        if srv.proc is None or srv.proc.poll() is not None:
            log = srv.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(
                f"the module's mlflow server ({srv.uri}) is not running (exit "
                f"{srv.proc and srv.proc.returncode}):\n{tail}"
            )


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (``launch/setup.sh --dev`` installs it when run as root), else a skip."""
    return shutil.which("chromium") or pytest.skip(
        "needs chromium (launch/setup.sh --dev installs it when run as root)"
    )
