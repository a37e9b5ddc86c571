"""A real 2-node SLURM cluster (Debian's slurm-wlm 22.05 + munge) on namespace hosts.

slurmctld and ``slurmd -N <host 1>`` run on host 1, ``slurmd -N <host 2>`` on host 2
(``tests/support/hosts.py``: own addresses, host names and private disks; the repository is shared,
as the sbatch script assumes). A munged of its own (own key and socket) authenticates them;
every file of the cluster lives in one temp dir. Job ids start at a random number: the
sbatch script's logs (``runs/slurm/%x-%j.out``) of another session are not appended to. The
client commands (sbatch, srun, scancel, scontrol) find it through ``$SLURM_CONF``. Only what was
started here is stopped, by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.hosts import Host, cannot_make_hosts, network

PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}


def cannot_run_slurm() -> str | None:
    """Why no SLURM cluster can be made here, or None when it can. The packages are installed by
    ``launch/setup.sh --dev`` run as root, never by a test."""
    if reason := cannot_make_hosts():
        return reason
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if not shutil.which(cmd, path="/usr/sbin:/usr/bin")})
    if missing:
        return f"needs {' '.join(missing)} (launch/setup.sh --dev installs them when run as root)"
    return None


@dataclass
class Slurm:
    hosts: list[Host]
    conf: str
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command from this machine (the "login node")."""
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (State, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def diagnose(self, job_id: str, lines: int = 30) -> str:
        """What SLURM says of a job, and the tails of its daemons' logs (for a failing test's message)."""
        parts = [self.run("scontrol", "show", "job", job_id, check=False).stdout]
        for log in sorted(self.dir.glob("slurm*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        end, info = time.time() + timeout, {}
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout}s: {info}")


# sched_interval=2: the main scheduler tests the pending jobs every 2 s instead of every 60 s, so a
# requeued job starts once its BeginTime has passed (no event triggers a pass on this idle
# cluster; the backfill scheduler skips its passes while nothing changed).
SLURM_CONF = """\
ClusterName=t{tag}
FirstJobId={first_job}
SlurmctldHost={n1}({a1})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait={kill_wait}
MinJobAge=600
InactiveLimit=0
NodeName={n1} NodeAddr={a1} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName={n2} NodeAddr={a2} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES State=UP MaxTime=INFINITE
"""


@contextlib.contextmanager
def slurm_cluster(logs: Path, kill_wait: int = 30) -> Iterator[Slurm]:
    """Two namespace hosts running a SLURM cluster; everything is stopped and removed on exit."""
    tag = uuid.uuid4().hex[:5]
    d = Path(f"/tmp/slm{tag}")  # short: the munge socket path must stay under 108 bytes
    d.mkdir(mode=0o755)
    munged = None
    try:
        with network("sl", 150, 2, logs) as hosts:
            h1, h2 = hosts
            key = d / "munge.key"
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
            munge_sock = d / "munge.sock"
            munged = subprocess.Popen(
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--socket={munge_sock}",
                    f"--key-file={key}",
                    f"--pid-file={d}/munged.pid",
                    f"--seed-file={d}/munged.seed",
                    f"--log-file={d}/munged.log",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(logs / "munged.log", "w"),
                start_new_session=True,
            )  # noqa: SIM115
            _wait_for(munge_sock.exists, 20, "munged's socket", munged)
            conf = d / "slurm.conf"
            conf.write_text(
                SLURM_CONF.format(
                    tag=tag,
                    n1=h1.name,
                    a1=h1.addr,
                    n2=h2.name,
                    a2=h2.addr,
                    munge=munge_sock,
                    d=d,
                    kill_wait=kill_wait,
                    first_job=int(tag, 16) % 900000 + 1000,
                )
            )
            (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
            (d / "state").mkdir()
            env = {**os.environ, "SLURM_CONF": str(conf)}
            for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
                del env[k]
            ctld = h1.popen(["slurmctld", "-D", "-i"], env, "slurmctld")
            for host in hosts:
                host.popen(["slurmd", "-D", "-N", host.name], env, "slurmd")
            cluster = Slurm(hosts, str(conf), d, env)
            end = time.time() + 60
            while True:
                r = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
                states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
                if r.returncode == 0 and len(states) == 2 and set(states.values()) == {"idle"}:
                    break
                if time.time() > end or ctld.poll() is not None:
                    raise RuntimeError(
                        f"the SLURM cluster did not come up: {r.stdout}{r.stderr}\n"
                        + (d / "slurmctld.log").read_text()[-3000:]
                        if (d / "slurmctld.log").exists()
                        else ""
                    )
                time.sleep(0.5)
            yield cluster
    finally:
        if munged is not None:
            munged.kill()
            munged.wait(10)
        for log in d.glob("*.log"):
            shutil.copy(log, logs / f"slurm-{log.name}")
        shutil.rmtree(d, ignore_errors=True)


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None or time.time() > end:
            raise RuntimeError(f"{what} did not appear (exit status {proc.poll()})")
        time.sleep(0.1)
