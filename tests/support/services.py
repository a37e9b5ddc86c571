"""Real services on 127.0.0.1 for the tests: free ports, moto S3, ``mlflow server``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """A moto S3 endpoint on 127.0.0.1 with ``buckets`` made; yields (endpoint, environment for it).

    fsspec keeps one S3FileSystem per set of arguments for the life of the process, and one made
    with no endpoint argument keeps the endpoint of the environment it was made in: a later test
    would reach a stopped server. The cache is cleared on the way in and on the way out.
    """
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint, env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class MlflowServer:
    """``mlflow server`` with a sqlite store and proxied artifacts under ``root``.

    One worker and no job runner: the defaults (4 workers, a huey job runner) take close to
    a minute to come up on 2 cores.
    """

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 150.0) -> MlflowServer:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return self
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        deadline = time.time() + 30
        while time.time() < deadline:  # the uvicorn child lets go of the port a moment later
            try:
                requests.get(f"{self.uri}/health", timeout=0.5)
                time.sleep(0.2)
            except requests.exceptions.RequestException:
                return


def new_run(client: MlflowClient, name: str) -> tuple[str, str]:
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    return exp_id, client.create_run(exp_id, run_name=name).info.run_id


def child_runs(client: MlflowClient, run_id: str) -> list:
    """The evaluation runs logged under ``run_id``."""
    from pipeline.tracking import PARENT_TAG

    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{run_id}'")
