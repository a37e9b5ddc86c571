"""One stop path: how a process of a run is asked to stop, and the exit statuses that say how it ended.

A stop is requested by SIGTERM or SIGINT (preemption, ``scancel``, ``kill``, Ctrl-C) or by the
run dir's ``STOP`` file (``python -m pipeline.rundir stop <run dir>``). Every Python process
that takes those signals does it through :class:`StopRequest`, each with its own action:

* the driver (``pipeline.run``): the first signal writes the run dir's ``STOP``, a second
  one exits at once;
* a training rank (``pipeline.train``): SIGTERM sets a flag; the ranks agree (:func:`agree`) on a
  stop at the next step boundary (flag or ``STOP``), checkpoint, and exit ``Exit.STOPPED``;
* a Ray node under SLURM (``launch/cluster.py node``): SIGTERM asks the batch shell for one
  graceful stop of the whole job.

The shell launchers use the same numbers from ``launch/common.sh`` (a test checks they agree).
"""

from __future__ import annotations

import enum
import os
import signal
import sys
from collections.abc import Callable


class Exit(enum.IntEnum):
    """Exit statuses of our entry points and launchers."""

    OK = 0
    FAILED = 1
    CONFIG = 2  # a bad config or command line: refused before anything started
    STOPPED = 3  # stopped on request with a checkpoint saved: rerun the same command to resume
    UNDELIVERED = 4  # trained and evaluated, but MLflow lacks some evaluations (the message says how to deliver them)
    DIVERGED = 5  # the divergence guard's rollbacks ran out: the message names the steps and what to change
    LOST = 6  # another launch took the run over (this one's lease had expired): stopped without writing
    NO_SPACE = 7  # a write met a full disk or a quota (data_prep.disk): the message names the path and the bytes


class StopRequest:
    """SIGTERM/SIGINT turned into a stop request.

    ``on_request(signum)`` runs on each signal (the flag :attr:`requested` is set first); with
    ``exit_on_repeat`` a signal after the first exits at once with ``128 + signum``. Outside the
    main thread no handler can be installed (some launchers): :attr:`installed` is False then.
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM,),
        on_request: Callable[[int], None] | None = None,
        exit_on_repeat: bool = False,
    ):
        self.requested = False
        self.signals = 0
        self._on_request, self._exit_on_repeat = on_request, exit_on_repeat
        try:
            for s in signals:
                signal.signal(s, self._handle)
            self.installed = True
        except ValueError:  # not the main thread
            self.installed = False

    def _handle(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1 and self._exit_on_repeat:
            print(f"signal {signum} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = True
        if self._on_request is not None:
            self._on_request(signum)


class Vote(enum.IntEnum):
    """What a rank wants at a step boundary; the ranks do the gravest that any of them wants."""

    CONTINUE = 0
    STOP = 1  # a stop request (SIGTERM, the run dir's STOP), or a refusal before anything started
    LOST = 2  # the run is another's (its lease names another owner): stop, writing nothing


def agree(mine: Vote, device) -> Vote:
    """The ranks' common decision (one all-reduce of one value; every rank calls it together)."""
    import torch  # here: the launchers and the driver import this module, the ranks alone vote
    import torch.distributed as dist

    votes = torch.tensor(float(mine), device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return Vote(int(votes.item()))


def shell_constants() -> str:
    """The exit statuses as shell assignments (what ``launch/common.sh`` must hold)."""
    return "\n".join(f"EXIT_{e.name}={e.value}" for e in Exit)


if __name__ == "__main__":
    print(shell_constants())
