# Shared by launch/pretrain.sh and launch/train_dist.sh (sourced, not run).
# resolve_config_and_python: CONFIG (default: the demo) made absolute and checked; the
# project's .venv activated when present; PYTHON set.
# shellcheck shell=bash

resolve_config_and_python() {
  CONFIG=${CONFIG:-$REPO/configs/experiment/demo.yaml}
  [[ -f $CONFIG ]] || { echo "error: experiment config not found: $CONFIG" >&2; exit 2; }
  CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
  if [[ -f $REPO/.venv/bin/activate ]]; then
    # shellcheck source=/dev/null
    source "$REPO/.venv/bin/activate"
  fi
  PYTHON=$(command -v python3 || command -v python)
  export PYTHON
}
