"""The pieces of checkpoint-aligned growth (``pipeline.elastic``) on a real local Ray instance.
The whole of it (a group that shrinks when a host is lost and grows back at a checkpoint) runs
on two network-namespace hosts in ``tests/cluster/test_two_hosts.py``."""

from pathlib import Path

import pytest

DEMO = str(Path(__file__).resolve().parent.parent / "configs" / "experiment" / "demo.yaml")
pytestmark = pytest.mark.timeout(120)


def _released(cpus: float) -> bool:
    """Whether Ray shows ``cpus`` free again within 10 s (a removed placement group is returned
    asynchronously, and ``ray.available_resources`` lags behind)."""
    import time

    import ray

    end = time.time() + 10
    while ray.available_resources().get("CPU", 0) < cpus:
        if time.time() > end:
            return False
        time.sleep(0.1)
    return True


def test_room_for_asks_rays_scheduler_and_leaves_nothing_reserved(ray_local):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.elastic import room_for

    assert room_for({"CPU": 1.0}) and _released(2)
    assert room_for({"CPU": 2.0}) and _released(2)
    assert not room_for({"CPU": 3.0})  # more than the cluster has
    assert not room_for({"CPU": 1.0, "GPU": 1.0})
    held = placement_group([{"CPU": 1.0}, {"CPU": 1.0}])  # a worker group holding both CPUs
    assert held.wait(timeout_seconds=30)
    try:
        assert not room_for({"CPU": 1.0}, timeout_s=1.0)
    finally:
        remove_placement_group(held)
    assert _released(2) and room_for({"CPU": 2.0}, timeout_s=10.0)
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_an_elastic_trainer_gets_the_checkpoint_aligned_policy_and_a_fixed_one_keeps_rays():
    import ray.train.v2.api.data_parallel_trainer as dpt
    from ray.train import ScalingConfig

    from pipeline.elastic import grow_at_checkpoints

    original = dpt.create_scaling_policy
    with grow_at_checkpoints(7.0):
        elastic = dpt.create_scaling_policy(ScalingConfig(num_workers=(1, 2)))
        fixed = dpt.create_scaling_policy(ScalingConfig(num_workers=2))
    assert type(elastic).__name__ == "GrowAtCheckpoint" and elastic.window_s == 7.0
    assert type(fixed).__name__ == "FixedScalingPolicy"
    assert dpt.create_scaling_policy is original


def test_only_an_elastic_group_below_its_size_asks_for_room(ray_local):
    from pipeline.config import load_config
    from pipeline.elastic import room_to_grow

    fixed = load_config(DEMO, ["ray.num_workers=2"]).ray
    elastic = load_config(DEMO, ["ray.min_workers=1", "ray.num_workers=2", "ray.max_failures=-1"]).ray
    assert _released(2)
    assert not room_to_grow(fixed, 1)  # a fixed group never grows
    assert not room_to_grow(elastic, 2)  # already at ray.num_workers
    assert room_to_grow(elastic, 1)  # 1 of 2, and a CPU is free
    wide = load_config(
        DEMO, ["ray.min_workers=1", "ray.num_workers=2", "ray.max_failures=-1", "ray.cpus_per_worker=4"]
    ).ray
    assert not room_to_grow(wide, 1)  # a worker of 4 CPUs does not fit
