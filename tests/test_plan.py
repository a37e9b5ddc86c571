"""The planner (pipeline.plan): its formulas against the paper, timm and hand-computed cases,
the refusal of a micro-batch that does not fit, and the CLI on every experiment config."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.model import ViTSpec, count_params, flops_per_image, get_spec
from pipeline.plan import (
    activation_bytes,
    checkpoint_bytes,
    largest_micro_batch,
    main,
    make_plan,
    model_state_bytes,
    planned_vs_measured,
    run_plan,
    sbatch_shape,
    slurm_allocation,
    splits,
    train_flops,
    vit_params,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name, paper", [("vit_b16", 86e6), ("vit_l16", 307e6), ("vit_h14", 632e6)])
def test_parameter_counts_match_the_papers_table_1(name, paper):
    params = vit_params(get_spec(name), 1000)
    # The paper rounds; L/16 computes to 304M (DESIGN.md: "307M (paper; ~304M computed)").
    assert abs(params / paper - 1) < 0.012, params
    assert params == count_params(name, num_classes=1000)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("vit_demo", dict(num_classes=100)),
        ("vit_b16", dict(num_classes=21843, representation_size=768)),
        ("vit_s16", dict(num_classes=10, pool="gap")),
        ("vit_h14", dict(num_classes=18291, representation_size=1280)),
    ],
)
def test_parameter_formula_equals_the_built_model(name, kw):
    spec = get_spec(name)
    assert vit_params(spec, kw["num_classes"], kw.get("representation_size"), kw.get("pool", "token")) == count_params(
        name, **kw
    )


def test_vit_b16_flops_match_timms_published_gmacs():
    spec = get_spec("vit_b16")
    forward = flops_per_image(spec, 1000, training=False)
    assert forward / 2 / 1e9 == pytest.approx(17.6, abs=0.05)  # timm vit_base_patch16_224: 17.6 GMACs
    assert train_flops(spec, 1000) == pytest.approx(3 * forward)
    # Recomputation runs the 12 blocks' forward once more: everything but embedding and head.
    embed_head = flops_per_image(ViTSpec(768, 0, 12, 3072, 16, 224), 1000, training=False)
    assert train_flops(spec, 1000, recompute=True) == pytest.approx(4 * forward - embed_head)


def test_model_states_per_rank_follow_the_zero_papers_arithmetic():
    psi, n = 1_000_000, 4
    total = {s: sum(model_state_bytes(psi, s, n)["device"].values()) for s in (0, 1, 2, 3)}
    assert total == {0: 16e6, 1: 2e6 + 2e6 + 12e6 / 4, 2: 2e6 + 14e6 / 4, 3: 16e6 / 4}
    # ZeRO-3 keeps its 16-bit reduce bucket; the EMA is 4 bytes a parameter, sharded like the masters.
    z3 = model_state_bytes(psi, 3, n, ema=True, reduce_bucket_size=500_000)["device"]
    assert z3["buckets"] == 1e6 and z3["ema"] == 1e6
    # Offload moves the fp32 masters, moments and EMA (and with offload_param the weights) to the host.
    off = model_state_bytes(psi, 3, n, offload_optimizer=True, offload_param=True, ema=True)
    assert off["device"] == {"weights": 0.0, "gradients": 0.5e6, "optimizer": 0.0, "ema": 0.0, "buckets": 0.0}
    assert sum(off["host"].values()) == 0.5e6 + 3e6 + 1e6
    # fp32: 4-byte weights and gradients, no master copy: still 16 bytes at stage 0.
    assert sum(model_state_bytes(psi, 0, n, precision="fp32")["device"].values()) == 16e6


def test_model_states_match_the_measured_zero_2_of_vit_b16():
    # bench/RESULTS.md (bench_zero_memory.py): 781 MB live per rank, Ψ = 86.6M, 2 ranks.
    psi = count_params("vit_b16", num_classes=1000)
    assert sum(model_state_bytes(psi, 2, 2)["device"].values()) / 1e6 == pytest.approx(781, rel=0.01)


def test_activation_memory_by_hand():
    spec = ViTSpec(width=32, depth=2, heads=2, mlp_dim=64, patch_size=4, img_size=16)  # vit_tiny_test
    n = 17  # 16 patches + the class token
    block = n * 2 * (9 * 32 + 2 * 64)
    edges = 3 * 16 * 16 * 2 + n * 32 * 2 + 12 * 10
    assert activation_bytes(spec, 3, 10) == 3 * (2 * block + edges)
    # Recomputation keeps each block's input only, and rebuilds one block at a time.
    assert activation_bytes(spec, 3, 10, recompute=True) == 3 * (2 * n * 32 * 2 + block + edges)
    dropout = activation_bytes(spec, 1, 10, dropout=True) - activation_bytes(spec, 1, 10)
    assert dropout == 2 * n * (2 * 32 + 64)  # 1-byte masks in both blocks
    assert activation_bytes(spec, 1, 10, precision="fp32") - edges - 3 * 16 * 16 * 2 - n * 32 * 2 == 2 * 2 * block


def test_largest_micro_batch_and_the_batch_split():
    assert largest_micro_batch(100.0, 20.0, 7.0) == 11
    assert largest_micro_batch(10.0, 20.0, 7.0) == 0
    assert splits(4096, 512, 11) == 8 and splits(4096, 64, 64) == 64 and splits(4096, 3, 10) == 0


def test_checkpoint_size_per_tag():
    assert checkpoint_bytes(1000, 2) == 14_000  # bf16 weights + fp32 master + 2 moments
    assert checkpoint_bytes(1000, 3, ema=True) == 20_000  # + gathered 16-bit weights + fp32 EMA


def test_sbatch_flags_give_the_cluster_shape():
    assert sbatch_shape("--nodes=64 --gpus-per-node=8 --partition=gpu") == {"nodes": 64, "gpus_per_node": 8}
    assert sbatch_shape("-N 4 --gpus-per-node h100:4") == {"nodes": 4, "gpus_per_node": 4}
    inside = slurm_allocation({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"})
    assert sbatch_shape(inside) == {"nodes": 2, "gpus_per_node": 4} and slurm_allocation({}) == ""


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_the_plan_runs_on_every_experiment_config(path, capsys):
    assert main([str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    stage = plan["memory"]["stages"][str(plan["config"]["zero_stage"])]
    assert stage["fits"] and stage["largest_micro_batch"] >= plan["config"]["micro_batch_size"]
    assert plan["time"]["steps"] > 0 and plan["checkpoints"]["gb_per_tag"] > 0
    assert plan["model"]["classes_known"]


def test_the_corpus_size_comes_from_a_local_index_when_the_config_has_none(tmp_path, capsys):
    index = tmp_path / "train_index.json"  # the keys data_prep writes (data_prep/index.py)
    index.write_text(
        json.dumps(
            {
                "shardlist": [{"url": "a.tar", "nsamples": 600_000}, {"url": "b.tar", "nsamples": 681_167}],
                "num_samples": 1_281_167,
                "num_classes": 1000,
                "classes": [str(i) for i in range(1000)],
            }
        )
    )
    assert (
        main(
            [
                str(ROOT / "configs/experiment/imagenet1k_vit_b16_scratch.yaml"),
                f"data.train={index}",
                "plan.num_samples=0",
                "plan.num_classes=0",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["time"]["corpus_source"] == str(index) and plan["model"]["classes"] == 1000
    assert plan["time"]["steps"] == 300 * 1_281_167 // 4096


def test_vit_h14_on_64_nodes_of_8_h100_plans_the_papers_compute(capsys):
    assert (
        main(
            [
                str(ROOT / "configs/experiment/jft_vit_h14.yaml"),
                "data.micro_batch_size=8",
                "--json",
                "--sbatch-args=--nodes=64 --gpus-per-node=8",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["target"]["world"] == 512 and plan["config"]["grad_accumulation"] == 1
    # Paper Table 6: 4262 exaFLOPs for ViT-H/14 at 14 epochs (without recomputation).
    model_flops = flops_per_image(get_spec("vit_h14"), 18291) * plan["time"]["steps"] * 4096
    assert model_flops / 1e18 == pytest.approx(4262, rel=0.03)


def test_a_micro_batch_that_fits_at_no_stage_is_refused_naming_the_largest_that_does(capsys):
    # ViT-H/14 without recomputation on 24 GB GPUs: 64 images of activations alone exceed it.
    args = [
        str(ROOT / "configs/experiment/jft_vit_h14.yaml"),
        "plan.device=L4",
        "plan.nodes=8",
        "model.grad_checkpointing=false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fits at no ZeRO stage" in err and "data.micro_batch_size=64" in err
    main(args + ["--json"])
    plan = json.loads(capsys.readouterr().out)
    best = max(s["largest_micro_batch"] for s in plan["memory"]["stages"].values())
    assert 0 < best < 64 and f"the largest micro-batch that fits is {best}" in err
    capsys.readouterr()
    assert main(args + [f"data.micro_batch_size={best}", f"train.global_batch_size={best * 64}"]) == 0


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(capsys):
    assert main([str(ROOT / "configs/experiment/jft_vit_h14.yaml"), "--sbatch-args=--nodes=64 --gpus-per-node=8"]) == 2
    assert "data.micro_batch_size=8 splits it" in capsys.readouterr().err


def test_a_gpu_is_known_by_the_exact_name_cuda_reports_so_an_h100_pcie_is_not_given_the_sxm_peak():
    from pipeline import devices
    from pipeline.step_metrics import peak_flops

    # the MFU of training (what bench/gpu_throughput.py looks up too) and the plan use one table
    assert peak_flops(0.0, "NVIDIA H100 PCIe") == 756e12 and peak_flops(0.0, "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(0.0, "NVIDIA H100 NVL") == 835e12 and peak_flops(0.0, "NVIDIA A100-PCIE-40GB") == 312e12
    assert peak_flops(0.0, "NVIDIA H100 80GB HBM3 MIG 1g.10gb") == 0.0, "an unknown variant gets no MFU, not a guess"
    assert peak_flops(0.0, None) == 0.0 and peak_flops(500.0, "NVIDIA H100 PCIe") == 500e12  # train.peak_tflops wins
    assert devices.find("h100") == devices.find("NVIDIA H100 80GB HBM3")  # a config's short name: the SXM part
    assert len({d.name for d in devices.DEVICES}) == len({d.short for d in devices.DEVICES}) == len(devices.DEVICES)

    def target(device: str) -> dict:
        return make_plan(load_config(ROOT / "configs/experiment/demo.yaml", [f"plan.device={device}"]))["target"]

    pcie, sxm = target("NVIDIA H100 PCIe"), target("H100")
    assert (pcie["peak_tflops"], sxm["peak_tflops"], target("H100 PCIe")["peak_tflops"]) == (756.0, 989.0, 756.0)
    assert pcie["memory_gib"] == sxm["memory_gib"] == 80.0


def test_a_run_logs_its_plan_and_sets_it_next_to_the_measured():

    planned = run_plan(load_config(ROOT / "configs/experiment/demo.yaml"))
    assert planned["plan/params"] == count_params("vit_demo", num_classes=100) and planned["plan/images_per_s"] > 0
    line = planned_vs_measured(planned, planned["plan/images_per_s"] / 2)[0]
    assert f"step {planned['plan/step_s']:.3f} s / {2 * planned['plan/step_s']:.3f} s" in line
    assert "plan/error" in run_plan(load_config(ROOT / "configs/experiment/demo.yaml", ["plan.device=TPU"]))


@pytest.mark.timeout(120)
def test_pretrain_sh_plan_starts_nothing_and_passes_the_exit_status():
    ok = subprocess.run(
        [str(ROOT / "launch/pretrain.sh"), "--plan", "configs/experiment/demo.yaml", "train.steps=10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert ok.returncode == 0, ok.stderr
    assert "memory per rank" in ok.stdout and "job submit" not in ok.stdout + ok.stderr
    bad = subprocess.run(
        [
            str(ROOT / "launch/pretrain.sh"),
            "--plan",
            "--slurm",
            "--sbatch-args",
            "--nodes=64 --gpus-per-node=8",
            "configs/experiment/jft_vit_h14.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert bad.returncode == 2 and "not a multiple" in bad.stderr
