"""Elastic Ray Train groups that grow back at a checkpoint boundary.

Ray Train's elastic groups (``ScalingConfig(num_workers=(min, max))``) shrink through their
failure path: a lost host kills its workers and the group restarts on what can be placed, from
the latest checkpoint. Growth is Ray's own: every ``elastic_resize_monitor_interval_s`` its
policy counts the workers the cluster could place and, if that is more, restarts the group
there and then, throwing away the steps since the latest checkpoint.

Here growth happens at a checkpoint instead, so no step is trained twice:

1. after each complete checkpoint of a group smaller than ``ray.num_workers``, training rank 0
   asks Ray whether another worker can be placed now (:func:`room_for`, a placement group made
   and removed at once) and reports the answer with the checkpoint (:data:`ROOM`);
2. :class:`GrowAtCheckpoint`, the controller's scaling policy, resizes a running group only
   within ``ray.grow_wait_s`` of such a report, and never on its own clock;
3. meanwhile rank 0 waits (:func:`hold`), up to ``ray.grow_wait_s``, so the restart at the
   larger size resumes from the checkpoint just written; the other ranks wait for it at their
   next collective. When Ray does not grow the group within that time, training goes on.

A growth is a restart that ends the attempt, as Ray's own resize does; it does not count
against ``ray.max_failures`` (a shrink does, as before).
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("pipeline.elastic")

ROOM = "elastic/room"  # key of a checkpoint report: 1 when one more worker could be placed at that checkpoint


def worker_resources(ray_cfg) -> dict[str, float]:
    """One training worker's resources, as ``pipeline.run.fit`` asks Ray Train for them."""
    return {"CPU": float(ray_cfg.cpus_per_worker), **({"GPU": 1.0} if ray_cfg.use_gpu else {})}


def room_for(resources: dict[str, float], timeout_s: float = 2.0) -> bool:
    """Whether the cluster can place one more worker of ``resources`` now: Ray's own scheduler
    answers, through a one-bundle placement group that is removed again before this returns."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    free = ray.available_resources()
    if any(free.get(k, 0.0) < v for k, v in resources.items() if v > 0):
        return False  # not even in total: no need to ask the scheduler
    pg = placement_group([resources], strategy="PACK")
    try:
        return bool(pg.wait(timeout_seconds=timeout_s))
    finally:
        remove_placement_group(pg)


def room_to_grow(ray_cfg, world_size: int) -> bool:
    """Whether an elastic group of ``world_size`` ranks, below ``ray.num_workers``, could place
    one more worker now; a probe that fails (a GCS hiccup) says no, and training goes on."""
    if ray_cfg.min_workers is None or world_size >= ray_cfg.num_workers:
        return False
    try:
        return room_for(worker_resources(ray_cfg))
    except Exception as e:
        log.warning("could not ask Ray for room to grow (%s); asking again at the next checkpoint", e)
        return False


def hold(seconds: float) -> None:
    """Rank 0 after reporting room to grow: wait for Ray to restart the group at the larger size
    (which ends this process); returns when it did not within ``seconds``."""
    log.warning("room for another worker: waiting up to %.0fs at this checkpoint for the group to grow", seconds)
    time.sleep(seconds)
    log.warning("the group did not grow within %.0fs (ray.grow_wait_s); training goes on at this size", seconds)


def _policy_class():
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.util import time_monotonic

    class GrowAtCheckpoint(ElasticScalingPolicy):
        """Ray's elastic policy, but a running group grows only within ``window_s`` of a checkpoint
        report that says there is room (:data:`ROOM`), while its rank 0 waits at that checkpoint.
        Starting and restarting (after a loss) are Ray's, unchanged."""

        def __init__(self, scaling_config, window_s: float):
            super().__init__(scaling_config)
            self.window_s = window_s
            self._grow_until = float("-inf")

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            self._maybe_send_resource_request()
            rank0 = worker_group_status.worker_statuses.get(0)
            report = rank0.training_report if rank0 else None
            if report is not None and report.checkpoint is not None and report.metrics.get(ROOM):
                self._grow_until = time_monotonic() + self.window_s
            if time_monotonic() > self._grow_until:
                return NoopDecision()
            reserved = self._get_reserved_resources()
            if reserved is None:
                return NoopDecision()
            n = self._count_possible_workers(reserved)
            if n <= worker_group_state.num_workers:
                return NoopDecision()
            self._grow_until = float("-inf")
            logging.getLogger("ray.train").info(
                "growing the worker group at a checkpoint: %d -> %d workers", worker_group_state.num_workers, n
            )
            return ResizeDecision(
                num_workers=n, resources_per_worker=self.scaling_config._resources_per_worker_not_none
            )

    return GrowAtCheckpoint


@contextlib.contextmanager
def grow_at_checkpoints(window_s: float):
    """While ``TorchTrainer.fit()`` runs in this block, its elastic group gets :class:`GrowAtCheckpoint`
    as its scaling policy (Ray Train makes the policy in the driver and ships it to its controller).
    On a Ray without that seam, warns and leaves Ray's own resize check (growth at any step)."""
    try:
        import ray.train.v2.api.data_parallel_trainer as dpt

        policy = _policy_class()
        original = dpt.create_scaling_policy
    except (ImportError, AttributeError) as e:
        log.warning("this Ray has no seam for the checkpoint-aligned policy (%s): growth follows Ray's resize check", e)
        yield
        return

    def create(scaling_config):
        if scaling_config.elasticity_enabled:
            return policy(scaling_config, window_s)
        return original(scaling_config)

    dpt.create_scaling_policy = create
    try:
        yield
    finally:
        dpt.create_scaling_policy = original
