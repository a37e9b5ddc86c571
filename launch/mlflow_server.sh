#!/usr/bin/env bash
# A local MLflow tracking server (sqlite runs, proxied artifacts) for pre-training runs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/mlflow_server.sh [--dir DIR] [--host HOST] [--port PORT] [--dry-run] [-- mlflow server args]

Serves runs from DIR/mlflow.db and artifacts from DIR/mlartifacts (default DIR: runs/mlflow
under the repository) on HOST:PORT (default 127.0.0.1:5000), in the foreground; stop it
with Ctrl-C. It first prints the line that points jobs at it:
  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
launch/pretrain.sh forwards MLFLOW_TRACKING_URI to the Ray job; pipeline.run logs there.
Binding another HOST (e.g. 0.0.0.0, so cluster nodes can log) serves everyone who can
reach it: MLflow has no authentication by default.
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$REPO/runs/mlflow HOST=127.0.0.1 PORT=5000 DRY=0
EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dir) DIR=${2:?}; shift ;;
    --host) HOST=${2:?}; shift ;;
    --port) PORT=${2:?}; shift ;;
    --dry-run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -f $REPO/.venv/bin/activate ]]; then
  # shellcheck source=/dev/null
  source "$REPO/.venv/bin/activate"
fi
DIR=$(realpath -m "$DIR")

if ! ((DRY)) && (exec 3<> "/dev/tcp/$HOST/$PORT") 2> /dev/null; then
  echo "error: $HOST:$PORT is already in use; pick another --port" >&2
  exit 1
fi
url_host=$HOST
[[ $HOST == 0.0.0.0 ]] && url_host=$(hostname -f)
cmd=(mlflow server --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$DIR/mlartifacts"
  --host "$HOST" --port "$PORT" "${EXTRA[@]}")
echo "export MLFLOW_TRACKING_URI=http://$url_host:$PORT"
echo "+ ${cmd[*]}"
((DRY)) && exit 0
mkdir -p "$DIR"
# MLflow 3's job runner (for GenAI jobs we do not use) starts several processes that slow the
# start on small machines and outlive SIGTERM for seconds; an operator's setting wins.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "${cmd[@]}"
