"""Pre-training on every rank of a ``torch.distributed`` launcher (Ray Train, ``torchrun``,
``deepspeed``): :func:`train` runs one :class:`pipeline.trainer.Trainer` per rank.

``python -m pipeline.train <config.yaml> key=value ...`` (a ``--local_rank=N`` argument from the
deepspeed launcher is accepted and ignored; the rank comes from the environment). What is
trained (model, optimizer, schedule, DeepSpeed config) is ``pipeline.recipe``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from data_prep.disk import DiskFull, NoRoom
from pipeline import rundir
from pipeline.config import load_config
from pipeline.engine import dist_setup
from pipeline.lease import LEASE_TOKEN, Lease, LeaseHeld, launcher_job, refusal, took_over
from pipeline.stop import Exit, Vote, agree
from pipeline.trainer import Trainer


def train(cfg: DictConfig, on_checkpoint=None, owns_run: bool = False) -> dict:
    """Train to ``total_steps``, resuming from the run's latest complete checkpoint if any.

    ``on_checkpoint(metrics)`` is called on every rank after each complete checkpoint
    (``step``, ``tag``, ``loss``, ``total_steps``; Ray Train reports them). ``owns_run``: no
    driver owns the run (torchrun, the deepspeed launcher): rank 0 ends the MLflow run,
    FINISHED at the last step, FAILED after a divergence or a crash, KILLED after a stop.
    Returns a summary (final step, loss, samples seen; ``lost`` when the ranks stopped, writing
    nothing, because the run's lease ($PIPELINE_LEASE_TOKEN, ``pipeline.lease``) names another
    owner) on every rank.
    """
    with Trainer(cfg, on_checkpoint, owns_run) as trainer:
        return trainer.train()


def main(argv: list[str] | None = None) -> int:
    """Exits 0 at the end of training, ``Exit.STOPPED`` (3) after a stop request (SIGTERM, the
    run dir's STOP) with the stop checkpoint saved, ``Exit.CONFIG`` (2) when a live job owns the
    run, ``Exit.DIVERGED`` (5), ``Exit.LOST`` (6) when another launch took the run over. Rank 0
    also writes its status to $PIPELINE_STATUS_FILE when set: torchrun itself exits 1 whenever
    a rank exits with another status than 0, and launch/train_dist.sh passes the real one on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_config(path, argv[1:] if path else argv)
    rank, _, device = dist_setup()
    code = _run(cfg, rank, device)
    if rank == 0 and (where := os.environ.get(STATUS_FILE)):
        Path(where).write_text(f"{int(code)}\n")
    return code


STATUS_FILE = "PIPELINE_STATUS_FILE"


def _run(cfg: DictConfig, rank: int, device: torch.device) -> Exit:
    lease, owner = None, not os.environ.get(LEASE_TOKEN)
    if owner:  # torchrun or the deepspeed launcher: no driver owns the run
        lease = _own_run(cfg, rank, device)
        if lease is False:
            dist.destroy_process_group()
            return Exit.CONFIG
    try:
        summary = train(cfg, owns_run=owner)
        if rank == 0:
            print(json.dumps(summary))
        dist.barrier()
        dist.destroy_process_group()
    except (NoRoom, DiskFull) as e:  # one line a person reads, and its own status
        print(f"{'config error: ' if isinstance(e, NoRoom) else ''}{e}", file=sys.stderr, flush=True)
        return Exit.CONFIG if isinstance(e, NoRoom) else Exit.NO_SPACE
    finally:
        if lease:
            lease.release()  # a lease another launch took over is left to it
    if summary["lost"]:
        return Exit.LOST
    if (summary.get("guard") or {}).get("diverged"):
        return Exit.DIVERGED
    return Exit.STOPPED if summary["preempted"] and summary["step"] < summary["total_steps"] else Exit.OK


def _own_run(cfg: DictConfig, rank: int, device: torch.device) -> Lease | None | bool:
    """Own the run when no driver does (``pipeline.lease``): rank 0 takes the run dir's lease,
    renews it in a thread and hands its token to its own fence (``pipeline.trainer``); every rank
    learns in one all-reduce whether it did. Returns rank 0's lease (None on the other ranks),
    or False on every rank when a live job owns the run (rank 0 says who)."""
    lease, held, failed = None, None, None
    if rank == 0:
        run = rundir.RunDir(cfg.run_dir)
        lease = Lease(run.lease_url, cfg.lease.heartbeat_s, cfg.lease.expiry_s, job_id=launcher_job())
        try:
            if (previous := lease.acquire()) is not None:
                print(took_over(run.url, previous), file=sys.stderr, flush=True)
            os.environ[LEASE_TOKEN] = lease.token
            lease.start()
        except LeaseHeld as e:
            held = refusal(cfg.name, cfg.run_dir, e.owner)
        except Exception as e:  # the store did not answer: every rank stops, rank 0 says why
            failed = e
    vote = agree(Vote.STOP if failed else Vote.LOST if held is not None else Vote.CONTINUE, device)
    if failed is not None:
        raise failed
    if vote is Vote.STOP:
        raise RuntimeError("rank 0 could not take the run dir's lease (see its log)")
    if vote is Vote.LOST:  # the run is another's
        if held is not None:
            print(held, file=sys.stderr, flush=True)
        return False
    return lease


if __name__ == "__main__":
    sys.exit(main())
