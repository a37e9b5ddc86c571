"""The accelerators the pipeline knows, one row each: the exact name CUDA reports
(``torch.cuda.get_device_name``, the same as ``nvidia-smi``), a short name for configs
(``plan.device``) and the calibration file, peak dense bf16 TFLOP/s (no sparsity) and memory.

Used by the plan before launch, the MFU metric of training and the GPU benchmark. Variants of
one chip differ (an H100 PCIe peaks at 756 TFLOP/s, the SXM part at 989), so a name matches
its own row only; a GPU that is not here gets no MFU unless ``train.peak_tflops`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str  # as CUDA reports it
    short: str  # as a config (plan.device) and bench/train_plan_calibration.json name it
    peak_tflops: float  # dense bf16, per device
    memory_gib: float


DEVICES = (
    Accelerator("NVIDIA H100 80GB HBM3", "H100", 989.0, 80.0),  # SXM5
    Accelerator("NVIDIA H100 PCIe", "H100 PCIe", 756.0, 80.0),
    Accelerator("NVIDIA H100 NVL", "H100 NVL", 835.0, 94.0),
    Accelerator("NVIDIA H200", "H200", 989.0, 141.0),  # SXM
    Accelerator("NVIDIA H200 NVL", "H200 NVL", 835.0, 141.0),
    Accelerator("NVIDIA A100-SXM4-80GB", "A100", 312.0, 80.0),
    Accelerator("NVIDIA A100-SXM4-40GB", "A100 40GB", 312.0, 40.0),
    Accelerator("NVIDIA A100 80GB PCIe", "A100 PCIe", 312.0, 80.0),
    Accelerator("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB", 312.0, 40.0),
    Accelerator("NVIDIA L40S", "L40S", 362.0, 48.0),
    Accelerator("NVIDIA A10G", "A10G", 125.0, 24.0),
    Accelerator("NVIDIA L4", "L4", 121.0, 24.0),
)


def find(name: str) -> Accelerator | None:
    """The row of the device CUDA calls ``name``, or whose short name is ``name`` (either
    case-insensitive); None for a device not in the table."""
    key = name.strip().lower()
    return next((d for d in DEVICES if key in (d.name.lower(), d.short.lower())), None)


def peak_tflops(name: str) -> float:
    """Peak dense bf16 TFLOP/s of the device called ``name`` (:func:`find`), 0 when unknown."""
    device = find(name)
    return device.peak_tflops if device else 0.0
