"""The divergence guard: every step judged healthy or not, unhealthy updates skipped, and a run
in trouble rolled back to its newest checkpoint before the trouble, past the data that led to it.

A step is healthy when its loss (the mean over every rank's micro-batches, one all-reduce at
the accumulation boundary, before the last backward) is finite and no more than
``spike_factor`` times the median of the last ``spike_window`` healthy losses (judged after
``optim.warmup_steps``), and its gradient norm is finite. An unhealthy update is never applied:
the last micro-batch's loss is multiplied by NaN, so DeepSpeed's own overflow check (ZeRO 1-3,
bf16 and fp16; see ``check_grad_overflow``) drops the whole step's gradients, as fp16's loss
scaler does for an overflow; a non-finite gradient norm is caught the same way. DeepSpeed does
not advance the learning-rate schedule on a skipped step.

``max_bad`` unhealthy steps within ``bad_window`` steps (or one non-finite loss with
``rollback_on_nonfinite``) are trouble: the run reloads its newest complete checkpoint before
the first unhealthy step (weights, optimizer, EMA, RNG states and this guard's statistics;
not the data position), skips the batches consumed since then plus ``skip_extra_steps`` steps
of them, and goes on. The ``max_rollbacks + 1``-th trouble stops the run with
``Exit.DIVERGED``. No checkpoint is written while an unhealthy step is within ``bad_window``
steps, so nothing unhealthy is published or evaluated.

Each rollback is an event in the run dir's ``guard.json``; a checkpoint records how many events
it has seen, so a run resumed after a kill between a rollback and its next checkpoint skips the
same batches again and ends bit-identical to one that was not killed.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline import faults, rundir

log = logging.getLogger("pipeline.guard")

EVENTS_FILE = "guard.json"

NONFINITE, SPIKE, GRAD = "non-finite loss", "loss spike", "non-finite gradient norm"


@dataclass
class Verdict:
    """One step's health: ``reason`` is None for a healthy step."""

    step: int
    loss: float
    ratio: float  # the loss over the running median (nan before there is one)
    reason: str | None = None


@dataclass
class Trouble:
    """Why the guard wants a rollback: the unhealthy steps of the window."""

    first: int
    last: int
    steps: list[int] = field(default_factory=list)


class Guard:
    """One rank's guard; every rank holds the same state (decisions are made from all-reduced values).

    ``cfg`` is ``train.guard``; ``warmup_steps`` the learning-rate warm-up (no spike is judged
    before its end); ``fp16``: DeepSpeed's own overflow skips are the loss scaler at work, not
    an unhealthy step; ``quiet``: no log lines (ranks other than 0).
    """

    def __init__(self, cfg, warmup_steps: int, fp16: bool = False, quiet: bool = False):
        self.cfg, self.warmup_steps, self.fp16, self.quiet = cfg, warmup_steps, fp16, quiet
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.bad: list[tuple[int, str]] = []  # (step, reason) within the last bad_window steps
        self.skipped = 0  # unhealthy steps whose update was not applied, this run
        self.events: list[dict] = []  # rollbacks, as in the run dir's guard.json
        self.max_ratio = 0.0  # since the last log line

    # ------------------------------------------------------------ per step

    def judge(self, step: int, local_loss_sum: torch.Tensor, micro_batches: int) -> Verdict:
        """The step's verdict on its loss, the same on every rank (one all-reduce of two values)."""
        stat = torch.stack([local_loss_sum.float(), (~torch.isfinite(local_loss_sum)).float()])
        if dist.is_initialized():
            dist.all_reduce(stat)
            micro_batches *= dist.get_world_size()
        total, nonfinite = stat.tolist()
        loss = total / micro_batches
        ratio = loss / statistics.median(self.history) if self._judges_spikes(step) else math.nan
        if nonfinite or not math.isfinite(loss):
            return Verdict(step, loss, ratio, NONFINITE)
        if ratio > self.cfg.spike_factor:
            return Verdict(step, loss, ratio, SPIKE)
        return Verdict(step, loss, ratio)

    def _judges_spikes(self, step: int) -> bool:
        return (
            step > self.warmup_steps
            and len(self.history) >= min(self.cfg.spike_window, 10)
            and statistics.median(self.history) > 0
        )

    def settle(self, verdict: Verdict, update_skipped: bool) -> Verdict:
        """Record the step once the optimizer has run: ``update_skipped`` is DeepSpeed's overflow
        skip (a non-finite gradient norm unless the verdict was already unhealthy)."""
        if verdict.reason is None and update_skipped and not self.fp16:
            verdict.reason = GRAD
        if math.isfinite(verdict.ratio):
            self.max_ratio = max(self.max_ratio, verdict.ratio)
        self.bad = [(s, r) for s, r in self.bad if s > verdict.step - self.cfg.bad_window]
        if verdict.reason is None:
            self.history.append(verdict.loss)
        else:
            self.bad.append((verdict.step, verdict.reason))
            self.skipped += 1
            if not self.quiet:
                log.warning(
                    "step %d unhealthy (%s: loss %.4g, %.2fx the running median): its update was not applied",
                    verdict.step,
                    verdict.reason,
                    verdict.loss,
                    verdict.ratio,
                )
        return verdict

    def trouble(self, verdict: Verdict) -> Trouble | None:
        """The unhealthy steps that call for a rollback after this step, or None."""
        sudden = verdict.reason == NONFINITE and self.cfg.rollback_on_nonfinite
        if not self.bad or not (sudden or len(self.bad) >= self.cfg.max_bad):
            return None
        steps = [s for s, _ in self.bad]
        return Trouble(steps[0], steps[-1], steps)

    def may_checkpoint(self, step: int) -> bool:
        """No checkpoint while an unhealthy step is within ``bad_window`` steps."""
        return not any(s > step - self.cfg.bad_window for s, _ in self.bad)

    def metrics(self) -> dict[str, float]:
        """For the step log: unhealthy steps so far, rollbacks, the largest loss/median ratio
        since the last call."""
        out = {
            "guard/skipped_steps": self.skipped,
            "guard/rollbacks": len(self.events),
            "guard/max_loss_ratio": self.max_ratio,
        }
        self.max_ratio = 0.0
        return out

    # ------------------------------------------------------------ rollbacks (every rank, together)

    def replay(self, run, seen: int, step: int, stream, writer: bool) -> None:
        """At a resume at ``step``: take the run's rollbacks from its ``guard.json`` and skip the
        data of the one its checkpoint (which had seen ``seen`` events) did not see, as a run
        stopped between a rollback and its next checkpoint would have. ``writer`` (rank 0)
        clears a recorded divergence: this is a new attempt (with other settings, one hopes)."""
        record = read_record(run)
        self.events = record["rollbacks"]
        if writer and record["diverged"] is not None:
            write_record(run, self.events)
        if (event := pending_skip(self.events, seen, step)) is not None:
            log.warning("replaying a rollback this checkpoint did not see: %s", describe(event))
            skip_past(stream, event)

    def roll_back(
        self, trouble: Trouble, step: int, ckpts, stream, micro_batches: int, global_batch: int, tracker=None
    ) -> tuple[dict, dict | None]:
        """Back to the newest checkpoint before ``trouble``, past the data since then; ``(its meta,
        None)``, or ``({}, why)`` when there is no such checkpoint or the rollbacks ran out.
        ``ckpts`` is the run's :class:`~pipeline.checkpoint.CheckpointManager`; rank 0 passes its
        ``tracker`` and records the decision (``guard.json``, MLflow) before it is carried out."""
        g = self.cfg
        to = target([rundir.step_of(t) for t in ckpts.run.checkpoints.complete_tags()], trouble)
        reasons = ", ".join(sorted({r for s, r in self.bad}))
        if to is None or len(self.events) >= g.max_rollbacks:
            why = (
                "no checkpoint before it"
                if to is None
                else f"after {len(self.events)} rollbacks (train.guard.max_rollbacks)"
            )
            diverged = {"steps": trouble.steps, "reasons": reasons, "resume_from": ckpts.latest(), "why": why}
            if tracker is not None:
                write_record(ckpts.run, self.events, diverged)
                log.error("%s", diverged_message(diverged, ckpts.run.checkpoints.url))
            return {}, diverged
        event = {
            "at_step": step,
            "first_bad": trouble.first,
            "bad_steps": trouble.steps,
            "reasons": reasons,
            "to_step": to,
            "batches": stream.batches + g.skip_extra_steps * micro_batches,
            "data_steps": stream.steps + g.skip_extra_steps,
            "samples_skipped": (step - to + g.skip_extra_steps) * global_batch,
        }
        self.events.append(event)
        if tracker is not None:
            write_record(ckpts.run, self.events)
            tracker.log_metrics({"guard/rollback_to_step": to, "guard/samples_skipped": event["samples_skipped"]}, step)
            tracker.set_tags({f"guard.rollback.{len(self.events)}": describe(event)})
            log.warning("rollback %d of at most %d: %s", len(self.events), g.max_rollbacks, describe(event))
        faults.after_rollback_decision(g.fault)
        skip_past(stream, event)
        skipped = self.skipped
        meta = ckpts.rollback(rundir.tag_for(to))
        self.skipped = skipped  # a count of this process's skips, not part of the decisions
        return meta, None

    # ------------------------------------------------------------ state (in every rank's checkpoint file)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad": [[s, r] for s, r in self.bad], "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.spike_window)
        self.bad = [(int(s), str(r)) for s, r in state["bad"]]
        self.skipped = int(state["skipped"])


def target(complete_steps: list[int], trouble: Trouble) -> int | None:
    """The newest checkpoint step before the trouble's first unhealthy step."""
    return max((s for s in complete_steps if s < trouble.first), default=None)


def read_record(run) -> dict:
    """The run's ``guard.json``: ``rollbacks`` (events, oldest first) and ``diverged`` (why the
    last attempt stopped, or None)."""
    text = run.read_text(EVENTS_FILE)
    record = json.loads(text) if text else {}
    return {"rollbacks": record.get("rollbacks", []), "diverged": record.get("diverged")}


def write_record(run, events: list[dict], diverged: dict | None = None) -> None:
    run.write_text(EVENTS_FILE, json.dumps({"rollbacks": events, "diverged": diverged}, indent=1))


def pending_skip(events: list[dict], seen: int, step: int) -> dict | None:
    """The rollback to replay on resuming at ``step`` from a checkpoint that had seen ``seen``
    events: the last later event that went back to this very step."""
    later = [e for e in events[seen:] if e["to_step"] == step]
    return later[-1] if later else None


def describe(event: dict) -> str:
    return (
        f"steps {event['first_bad']}-{event['at_step']} ({event['reasons']}) rolled back to step {event['to_step']}, "
        f"{event['samples_skipped']} samples skipped"
    )


def skip_past(stream, event: dict) -> None:
    """Consume ``stream`` until it has delivered the data a rollback skips to: ``data_steps``
    training steps of data (the same in any world size, so a replay after a resize skips the
    same samples), or in an event recorded before that count, ``batches`` of this rank's."""
    if "data_steps" in event:
        while stream.steps < event["data_steps"]:
            next(stream)
        return
    while stream.batches < event["batches"]:
        next(stream)


def diverged_message(diverged: dict, checkpoints_url: str) -> str:
    return (
        f"diverged: unhealthy steps {diverged['steps']} ({diverged['reasons']}), {diverged['why']}. A rerun of the "
        "same "
        f"command resumes from {checkpoints_url}/{diverged['resume_from']}; change the settings first (a lower "
        "optim.lr, "
        "a longer optim.warmup_steps, optim.grad_clip, or train.guard.*)"
    )


USAGE = (
    "usage: python -m pipeline.guard diverged <run dir URL>   (exit 0 and the reason when its last attempt diverged)"
)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "diverged":
        print(USAGE, file=sys.stderr)
        return 2
    run = rundir.RunDir(argv[1])
    diverged = read_record(run)["diverged"]
    if diverged is None:
        return 1
    print(diverged_message(diverged, run.checkpoints.url), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
