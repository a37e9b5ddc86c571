"""The accelerators the pipeline knows: peak dense bf16 TFLOP/s and memory, by the name CUDA
reports (matched as a substring, longest name first). Used by the plan before launch, the MFU
metric of training and the GPU benchmark."""

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
GPU_MEMORY_GIB = {"H200": 141.0, "H100": 80.0, "A100": 80.0, "L40S": 48.0, "A10G": 24.0, "L4": 24.0}
