#!/usr/bin/env bash
# The GPU throughput benchmark on a lent device machine, in one prepared call.
#
#   bench/gpu_kit.sh wheels            # here, once: fill .whl/ (git-ignored) for the device's Python
#   bench/gpu_kit.sh run [ARGS...]     # there: install .whl/ into /tmp/site, then
#                                      # bench/gpu_throughput.py ARGS, its output kept in $OUT
#
# The device image has torch, CUDA, numpy, PyYAML, psutil, tqdm, einops, msgpack, ninja and
# py-cpuinfo, but not DeepSpeed, OmegaConf or pydantic: `wheels` takes those at the versions of
# requirements.lock (DeepSpeed has no wheel on PyPI: it is built here, pure Python, its ops
# left to build on first use), about 5 MiB in all. With no ARGS, `run` measures what issue 34
# asks: ViT-B/16 and ViT-L/16, the plain loop eager and with compiled blocks, and the engine
# under ZeRO-2 and ZeRO-3, eager and compiled.
#
#   device run: command "bash bench/gpu_kit.sh run", carry [".whl"], timeout_s 540
#
# Environment: PYTHON (default python3, the device image's), PY_VERSION for `wheels` (3.12,
# the device image's), SITE (/tmp/site), OUT (where the log goes; the current folder if unset).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
kit=(deepspeed hjson omegaconf antlr4-python3-runtime pydantic pydantic_core annotated-types typing-inspection)

pinned() {  # NAME==VERSION from requirements.lock (its names may use - or _)
  local name=$1 pattern
  pattern="^$(echo "$name" | sed 's/[-_]/[-_]/g')=="
  grep -i -m1 "$pattern" requirements.lock || { echo "gpu_kit: $name is not in requirements.lock" >&2; exit 2; }
}

case "${1:-}" in
  wheels)
    pyver=${PY_VERSION:-3.12}
    rm -rf .whl && mkdir -p .whl
    binary=() source_only=()
    for name in "${kit[@]}"; do
      if [[ $name == deepspeed ]]; then source_only+=("$(pinned "$name")"); else binary+=("$(pinned "$name")"); fi
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${binary[@]}"
    # DeepSpeed's setup.py imports torch, so it builds against the torch already here.
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${source_only[@]}"
    ls -l .whl
    du -sh .whl
    ;;
  run)
    shift
    [[ -d .whl ]] || { echo "gpu_kit: no .whl/ here: run 'bench/gpu_kit.sh wheels' first and carry .whl" >&2; exit 2; }
    site=${SITE:-/tmp/site}
    out=${OUT:-.}
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    (($#)) || set -- --compile --engine --zero 2,3 --modes eager,compiled
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu_throughput.log" || true
    "$py" -c "import torch, deepspeed, omegaconf; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" \
      | tee -a "$out/gpu_throughput.log"
    "$py" bench/gpu_throughput.py "$@" 2>&1 | tee -a "$out/gpu_throughput.log"
    ;;
  *)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
