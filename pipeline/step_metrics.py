"""Training's step metrics: the loss window between log steps, throughput, MFU, memory and ETA,
one log line and one MLflow batch per log step from rank 0, and the system-metrics monitor.

Every rank keeps the window and joins the all-reduces of a log step (the loss sums, the
largest memory); rank 0 writes. A step redone after a restart or a rollback was logged
already: it is not logged again, so a run's curves never rewind.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from pipeline import devices
from pipeline.tracking import SystemMetrics, Tracker

log = logging.getLogger(__name__)


class StepMetrics:
    """The metrics of one rank's training from ``step`` on.

    ``tracker``: rank 0's (None elsewhere: no log line, no MLflow write); ``flops_per_image``
    and ``peak_flops`` (per device, 0: no MFU) make ``train/mfu``; ``sources`` are the other
    components with a ``metrics()`` dict for the log step (the guard, the compile watch), in
    that order; ``system_metrics``: sample the host into the run (``tracking.system_metrics``).
    Call :meth:`close` at the end, however training ends.
    """

    def __init__(
        self,
        tracker: Tracker | None,
        device: torch.device,
        step: int,
        total_steps: int,
        log_every: int,
        world: int,
        global_batch: int,
        flops_per_image: float,
        peak_flops: float,
        tokens_per_image: int,
        sources: tuple = (),
        system_metrics: bool = False,
    ):
        self.tracker, self.device, self.total_steps, self.log_every = tracker, device, total_steps, log_every
        self.world, self.global_batch, self.sources = world, global_batch, [s for s in sources if s is not None]
        self.flops_per_image, self.peak_flops, self.tokens_per_image = flops_per_image, peak_flops, tokens_per_image
        self.logged_upto = last_logged_step(tracker) if tracker is not None else 0  # recovery: logged before a restart
        self.monitor = system_monitor(system_metrics, tracker)
        self.last_loss = float("nan")
        self.window = torch.zeros(2, device=device)  # this rank's loss sum and micro-batch count since the last log
        self._before: torch.Tensor | None = None  # the window before this step's micro-batches
        self.t0, self.window_start = time.time(), step

    def restart(self, step: int) -> None:
        """A new window from ``step`` (at the start, and after a rollback)."""
        self.window.zero_()
        self.t0, self.window_start = time.time(), step

    def begin_step(self) -> None:
        self._before = self.window.clone()

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss."""
        self.window += torch.stack([loss.float(), torch.ones((), device=self.device)])

    def drop_step(self) -> None:
        """Forget the losses since :meth:`begin_step`: the logged loss is the mean of the applied steps."""
        self.window.copy_(self._before)

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def log(self, step: int, lr: float, grad_norm: float, samples_seen: int, skipped_samples: int) -> None:
        """The log step (every rank, together): the window's mean loss, rates and memory; rank
        0 writes them unless ``step`` was logged before. Starts the next window."""
        dist.all_reduce(self.window)
        mem = torch.tensor(memory_gib(self.device), device=self.device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        dt = time.time() - self.t0
        ips = (step - self.window_start) * self.global_batch / dt
        self.last_loss = (self.window[0] / self.window[1]).item()
        metrics = {
            "train/loss": self.last_loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/images_per_s": ips,
            "train/tokens_per_s": ips * self.tokens_per_image,
            "train/memory_gib_max_rank": mem.item(),
            "train/samples_seen": samples_seen,
            "train/skipped_samples": skipped_samples,
            "train/world_size": self.world,
        }
        for source in self.sources:
            metrics.update(source.metrics())
        if self.peak_flops:
            metrics["train/mfu"] = ips * self.flops_per_image / (self.peak_flops * self.world)
        if self.tracker is not None and step > self.logged_upto:
            steps_per_s = (step - self.window_start) / dt
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f images/s %.1f steps/s %.2f eta %s mem %.2fGiB",
                step,
                self.total_steps,
                self.last_loss,
                lr,
                grad_norm,
                ips,
                steps_per_s,
                eta(self.total_steps - step, steps_per_s),
                mem.item(),
            )
            self.tracker.log_metrics(metrics, step)
            self.tracker.note_logged_step(step)
            self.logged_upto = step
        self.restart(step)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def memory_gib(device: torch.device) -> float:
    """The most this process has held: the accelerator's peak allocation, or on CPU the RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_flops(peak_tflops: float, device_name: str | None) -> float:
    """Peak FLOP/s of one device: ``peak_tflops`` (``train.peak_tflops``) when set, else that of
    the GPU CUDA calls ``device_name`` in :mod:`pipeline.devices` (None: not a GPU), else 0 (no MFU)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device_name is None:
        return 0.0
    if not (known := devices.peak_tflops(device_name)):
        log.warning(
            "no MFU: %r is not in pipeline/devices.py; set train.peak_tflops to its dense bf16 TFLOP/s", device_name
        )
    return known * 1e12


def last_logged_step(tracker: Tracker) -> int:
    """The highest step of ``train/loss`` already logged to the run: in the store, or noted on
    this host by an earlier rank 0 (:meth:`Tracker.note_logged_step`), which is all there is to
    go by when the server cannot be asked (a worker restarted during an outage)."""
    noted = tracker.logged_step_noted()
    try:
        return max(noted, max((m.step for m in tracker.metric_history("train/loss")), default=0))
    except Exception as e:  # an unreachable server: what this host noted, else log everything
        log.warning(
            "could not read the logged steps of run %s (%s); %s",
            tracker.run_id,
            e,
            f"this host logged up to step {noted}" if noted else "logging every step",
        )
        return noted


def eta(steps_left: int, steps_per_s: float) -> str:
    """Time left as h:mm:ss at the current rate."""
    if steps_per_s <= 0:
        return "?"
    seconds = int(steps_left / steps_per_s)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def system_monitor(enabled: bool, tracker: Tracker | None) -> SystemMetrics | None:
    """System metrics (CPU, memory, disk, network, GPU) of the run from rank 0, through the
    tracker (spooled while the server is away), every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds (default 10); None when off, not rank 0, or the monitors cannot start."""
    if tracker is None or not enabled:
        return None
    try:
        return SystemMetrics(tracker, float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10)))
    except Exception as e:  # metrics are a nicety; never stop training for them
        log.warning("system metrics disabled: %s", e)
        return None
