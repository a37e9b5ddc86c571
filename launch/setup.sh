#!/usr/bin/env bash
# Set up the project in ./.venv: torch first (the CPU build where no GPU is present, so an
# unpinned torch never pulls a multi-GB CUDA build; a machine with a GPU keeps or gets a
# CUDA build), then this package and its dependencies.
#
#   launch/setup.sh          # runtime
#   launch/setup.sh --dev    # + test tools (pytest, moto, s3fs, ruff; shellcheck via apt-get when root)
#
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_INDEX_URL (a
# wheel index for torch, e.g. PyTorch's CPU index on machines without a local CPU wheel).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install -q "torch>=2.4,<2.15"
  else
    "$py" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi

if [ "$dev" = 1 ]; then
  "$py" -m pip install -q -e ".[dev]"
  if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null) || echo "setup.sh: could not install shellcheck" >&2
  fi
else
  "$py" -m pip install -q -e .
fi
"$py" -c "import torch, deepspeed, ray, mlflow, webdataset; print(f'ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}')"
