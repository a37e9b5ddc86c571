"""The launcher's questions to a Ray cluster, asked from the shell by ``launch/pretrain.sh``.

``python launch/cluster.py free-ports N``
    N distinct free TCP ports on 127.0.0.1, space separated.
``python launch/cluster.py probe ADDRESS [--timeout S]``
    Is the cluster reachable? Prints ``token`` when its dashboard asks for a token,
    ``none`` when it answers without one, ``unknown`` for a bare ``host:port`` (GCS)
    address; exits 1 with a message naming the address when nothing answers.
``python launch/cluster.py wait-nodes URL N [--timeout S] [--pid PID]``
    Waits until N nodes are alive (the dashboard up and every node joined); exits 1 on
    timeout, saying how many joined, or as soon as process PID (the head) has exited.
``python launch/cluster.py exit-code URL SUBMISSION_ID [--run-dir URL]``
    The job driver's exit code (empty when Ray does not know it; 3 for a job that
    ``ray job stop`` stopped with a checkpoint, seen in its run dir).
``python launch/cluster.py job-state URL SUBMISSION_ID``
    The Ray job's status (RUNNING, PENDING, or an end: SUCCEEDED, FAILED, STOPPED); empty
    when the cluster does not know it.
``python launch/cluster.py upload-env REPO``
    The ``--runtime-env-json`` for ``ray job submit`` that ships REPO as the job's working
    directory (without virtualenvs, runs, caches and git data).
``python launch/cluster.py node -- ray start --block ...``
    A Ray node inside a SLURM job step (see :func:`node`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: pipeline.*
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from urllib.parse import urlparse

UPLOAD_EXCLUDES = [
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "mlartifacts",
    ".git",
    "**/__pycache__",
    "*.db",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
]


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def probe(address: str, timeout: float) -> str:
    """``token`` | ``none`` | ``unknown``; raises ConnectionError naming the address."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout):
                return "none"
        except urllib.error.HTTPError as e:
            return "token" if e.code in (401, 403) else "none"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"no Ray dashboard answers at {address} ({reason})") from None
    if not parsed.hostname or not parsed.port:
        raise ConnectionError(
            f"cannot read host:port from Ray address {address!r}; give the dashboard URL, e.g. http://head:8265"
        )
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            return "unknown"
    except OSError as e:
        raise ConnectionError(f"nothing listens at Ray address {address} ({e})") from None


def _running(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_nodes(url: str, n: int, timeout: float, pid: int | None = None) -> int:
    from ray.util.state import list_nodes

    deadline, alive, last_error = time.monotonic() + timeout, [], None
    while time.monotonic() < deadline:
        if not _running(pid):
            print(f"error: the Ray head process {pid} exited before {url} came up", file=sys.stderr)
            return 1
        try:
            nodes = list_nodes(address=url, timeout=10, raise_on_missing_output=False)
            alive = [node for node in nodes if node.state == "ALIVE"]
            if len(alive) >= n:
                cpus = sum(node.resources_total.get("CPU", 0) for node in alive)
                gpus = sum(node.resources_total.get("GPU", 0) for node in alive)
                print(f"ray cluster ready: {len(alive)} node(s), {cpus:g} CPUs, {gpus:g} GPUs")
                return 0
        except Exception as e:  # the dashboard is still starting
            last_error = e
        time.sleep(0.5)
    detail = f"; last error: {last_error}" if last_error and not alive else ""
    print(f"error: {len(alive)} of {n} Ray nodes joined {url} within {timeout:g}s{detail}", file=sys.stderr)
    return 1


def exit_code(url: str, submission_id: str, run_dir: str | None = None) -> str:
    """The driver's exit code; for a job stopped with ``ray job stop`` (Ray records no code
    then) 3 when the run dir's summary, written after the job started, says it stopped with a
    checkpoint."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    info = JobSubmissionClient(url).get_job_info(submission_id)
    if info.driver_exit_code is not None:
        return str(info.driver_exit_code)
    if info.status == JobStatus.STOPPED and run_dir:
        from pipeline.rundir import RunDir
        from pipeline.stop import Exit

        run = RunDir(run_dir)
        summary = run.summary() or {}
        if summary.get("stopped") and (run.summary_written() or 0) * 1000 >= (info.start_time or 0):
            return str(int(Exit.STOPPED))
    return ""


def job_state(url: str, submission_id: str) -> str:
    """The Ray job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED); "" when the cluster
    does not know it."""
    from ray.job_submission import JobSubmissionClient

    try:
        return str(JobSubmissionClient(url).get_job_status(submission_id).value)
    except RuntimeError:  # "Job ... does not exist"
        return ""


def upload_env(repo: str) -> str:
    # No env_vars here: pipeline.run's ray.init sets its own, and Ray refuses to merge a
    # job's env_vars with ray.init's when they share a key.
    return json.dumps({"working_dir": repo, "excludes": UPLOAD_EXCLUDES})


def node(cmd: list[str]) -> int:
    """Run a Ray node (``ray start --block ...``) in a SLURM job step so that a SIGTERM to the
    step becomes a graceful stop instead of the end of the cluster.

    ``scancel --signal=TERM <job>`` (and SLURM's own TERM before a kill) reaches every process
    of every job step: Ray's raylet and workers would exit at once and the training on this
    node with them, before any checkpoint. So the node runs with SIGTERM blocked (Ray's
    processes inherit the mask) and this process, the step's task, takes the TERM: it asks
    the batch shell for a graceful stop (``scancel --batch --signal=USR2 $SLURM_JOB_ID``; the
    batch script turns one or many of those into one stop of the job). SIGUSR1 (sent by
    ``launch/pretrain.sh`` when the job is over, through srun) kills the node's processes.
    Exits with the node's status, 0 after SIGUSR1.
    """
    from pipeline.stop import StopRequest

    proc = subprocess.Popen(cmd, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))

    def stop_requested(signum: int) -> None:
        if torn_down:  # the job is over: SLURM ends the step
            return
        job = os.environ.get("SLURM_JOB_ID")
        print(
            f"ray node on {socket.gethostname()}: SIGTERM, asking job {job} for a graceful stop",
            file=sys.stderr,
            flush=True,
        )
        if job:
            subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=False)

    torn_down = []

    def teardown(signum, frame):
        import psutil

        torn_down.append(signum)
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    StopRequest((signal.SIGTERM,), on_request=stop_requested)
    signal.signal(signal.SIGUSR1, teardown)
    rc = proc.wait()
    return 0 if torn_down else rc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch/cluster.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-ports").add_argument("n", type=int)
    p = sub.add_parser("probe")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=5.0)
    p = sub.add_parser("wait-nodes")
    p.add_argument("url")
    p.add_argument("n", type=int)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--pid", type=int, default=None, help="give up when this process has exited")
    p = sub.add_parser("exit-code")
    p.add_argument("url")
    p.add_argument("submission_id")
    p.add_argument("--run-dir", default=None)
    p = sub.add_parser("job-state")
    p.add_argument("url")
    p.add_argument("submission_id")
    sub.add_parser("upload-env").add_argument("repo")
    sub.add_parser("node").add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.cmd == "free-ports":
        print(*free_ports(args.n))
    elif args.cmd == "probe":
        try:
            print(probe(args.address, args.timeout))
        except ConnectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    elif args.cmd == "wait-nodes":
        return wait_nodes(args.url, args.n, args.timeout, args.pid)
    elif args.cmd == "node":
        return node(args.command[1:] if args.command[:1] == ["--"] else args.command)
    elif args.cmd == "exit-code":
        print(exit_code(args.url, args.submission_id, args.run_dir))
    elif args.cmd == "job-state":
        print(job_state(args.url, args.submission_id))
    else:
        print(upload_env(args.repo))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
