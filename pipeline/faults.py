"""TESTS ONLY: the faults a test may inject into a real training run, from ``train.guard.fault``
(:class:`pipeline.config.GuardFaultConfig`); never set those keys in a real run.

The only two places training lets a fault in, so a test can try the divergence guard on a
real engine:

* :func:`corrupt_loss`: rank 0's loss of chosen micro-batches made non-finite or spiked;
* :func:`after_rollback_decision`: every rank exits between a rollback's record and its
  execution (a kill at the worst moment; the resumed run must replay the rollback).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from pipeline.stop import Exit


def corrupt_loss(loss: torch.Tensor, fault, batch_index: int, rank: int) -> torch.Tensor:
    """Rank 0's loss of the micro-batches whose index in its stream (from 1) is in ``[start,
    end)`` made non-finite (``kind: nan``) or ``scale`` times larger (``kind: spike``); keyed to
    the data position, so a rollback's skip moves past it. Any other loss is returned as it is."""
    if fault.kind == "none" or rank != 0 or not fault.start <= batch_index < fault.end:
        return loss
    return loss * (math.nan if fault.kind == "nan" else fault.scale)


def after_rollback_decision(fault) -> None:
    """With ``exit_after_rollback``: every rank exits (``Exit.FAILED``, no clean-up, as a kill)
    once the rollback is recorded and before it is carried out."""
    if fault.exit_after_rollback:
        if dist.is_initialized():
            dist.barrier()
        os._exit(Exit.FAILED)
