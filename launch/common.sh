# Shared by launch/pretrain.sh and launch/train_dist.sh (sourced, not run).
# resolve_config_and_python: CONFIG (default: the demo) made absolute and checked; the
# project's .venv activated when present; PYTHON set.
# shellcheck shell=bash disable=SC2034 # (the EXIT_* constants are used by the scripts that source this)

# Exit statuses, the same numbers as pipeline/stop.py's Exit (`python -m pipeline.stop` prints
# them; tests/test_stop.py checks that the two agree).
EXIT_OK=0
EXIT_FAILED=1
EXIT_CONFIG=2
EXIT_STOPPED=3
EXIT_UNDELIVERED=4
EXIT_DIVERGED=5
EXIT_LOST=6
EXIT_NO_SPACE=7

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
