"""Hosts that share no disk, on one machine: network namespaces on a bridge (../shared/CLUSTER.md).

Each :class:`Host` has its own address, host name and /etc/hosts, and a private tmpfs over
the same path (its "local disk"): nothing one host writes there is visible to another. The
repository, its .venv and the rest of the filesystem are shared, as on a cluster with a
shared home. Everything is stopped by pid and every link and namespace is deleted by
:func:`network`, even when a test fails; other tests' Ray or SLURM processes are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT


def cannot_make_hosts() -> str | None:
    """Why this machine cannot make namespace hosts, or None when it can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("nsenter"):
        return "needs iproute2 (ip) and util-linux (unshare, nsenter)"
    probe = f"vtp{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if ok else "this machine refuses `ip netns add`"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def wait_port(host: str, port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout}s")


class Host:
    """A network namespace with a private tmpfs at ``disk``, its own host name and an
    /etc/hosts that resolves every host of its network (as on a real cluster: gloo advertises
    the address its host name resolves to), entered through a holder process."""

    def __init__(self, name: str, addr: str, disk: str, bridge: str, logs: Path, peers: dict[str, str] | None = None):
        self.name, self.addr, self.disk, self.logs = name, addr, disk, logs
        self.peers = {name: addr, **(peers or {})}
        self.procs: list[subprocess.Popen] = []
        sh("ip", "netns", "add", name)
        veth = f"v{name}"[:15]
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "link", "set", veth, "master", bridge, "up")
        sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        self.veth = veth
        self.boot()

    def boot(self) -> None:
        """(Re)start the holder, which owns this host's mount namespace: a fresh, empty disk."""
        hosts = "127.0.0.1 localhost\\n" + "".join(f"{a} {n}\\n" for n, a in self.peers.items())
        self.holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                "unshare",
                "-m",
                "-u",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"hostname {self.name} && mount -t tmpfs none {self.disk} && "
                f"printf '{hosts}' > {self.disk}/hosts && "
                f"mount --bind {self.disk}/hosts /etc/hosts && "
                "echo ready && exec sleep infinity",
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.holder.stdout.readline().strip() == "ready"

    def _enter(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "-u", f"--wd={ROOT}", "--", *cmd]

    def popen(self, cmd: list[str], env: dict, log: str) -> subprocess.Popen:
        out = open(self.logs / f"{self.name}-{log}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            self._enter(cmd), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self._enter(cmd), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL every process this host started (their process groups and descendants), then
        the holder: the host is gone, and its disk with it."""
        import psutil

        family = []
        for proc in self.procs:
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in [*self.procs, self.holder]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []

    def remove(self) -> None:
        self.kill_all()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@contextlib.contextmanager
def network(prefix: str, first_octet: int, n: int, logs: Path) -> Iterator[list[Host]]:
    """``n`` hosts ``<prefix>1<tag>``, ``<prefix>2<tag>``, ... on a bridge ``<prefix>br<tag>``, with
    addresses ``10.<first_octet + 0..49>.x.1``, ``.2``, ...; this process reaches them at ``.254``.
    Every host's private disk is ``/tmp/<prefix>d<tag>`` (short: Ray's socket paths live under it).
    Each host's /etc/hosts names all of them. Everything is removed on exit."""
    tag = uuid.uuid4().hex[:5]
    net = f"10.{first_octet + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    bridge = f"{prefix}br{tag}"
    disk = f"/tmp/{prefix}d{tag}"
    os.makedirs(disk, exist_ok=True)
    names = {f"{prefix}{i}{tag}": f"{net}.{i}" for i in range(1, n + 1)}
    hosts: list[Host] = []
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{net}.254/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for name, addr in names.items():
            hosts.append(Host(name, addr, disk, bridge, logs, peers=names))
        yield hosts
    finally:
        for host in reversed(hosts):
            host.remove()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)
