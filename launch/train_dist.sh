#!/usr/bin/env bash
# Train without Ray: `python -m pipeline.train` under torchrun or the deepspeed launcher.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/train_dist.sh [--launcher torchrun|deepspeed] [--nproc N] [--dry-run]
                            [<experiment.yaml>] [key=value ...]

Runs the training loop alone (no Ray, no data prep, no evaluation watcher) on N local
processes with env:// rendezvous:
  torchrun  --standalone --nproc_per_node N -m pipeline.train <experiment.yaml> key=value ...
  deepspeed --num_gpus N --master_port <free port> --module pipeline.train <experiment.yaml> ...
The shards named by data.train must exist (launch/pretrain.sh or `python -m data_prep`
makes them). Without a GPU, DS_ACCELERATOR=cpu is set (gloo, bf16 on CPU).

  --launcher L   torchrun (default) or deepspeed
  --nproc N      processes (default: the GPUs here, else 2)
  --dry-run      check the config and print the command only
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCHER=torchrun NPROC='' DRY=0 CONFIG=''
OVERRIDES=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --launcher) LAUNCHER=${2:?}; shift ;;
    --launcher=*) LAUNCHER=${1#*=} ;;
    --nproc) NPROC=${2:?}; shift ;;
    --nproc=*) NPROC=${1#*=} ;;
    --dry-run) DRY=1 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1") ;;
    *) CONFIG=$1 ;;
  esac
  shift
done
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"
resolve_config_and_python

gpus=0
if command -v nvidia-smi > /dev/null; then gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true); fi
NPROC=${NPROC:-$((gpus > 0 ? gpus : 2))}
((gpus > 0)) || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# The world size is the process count here; validate the batch split against it.
OVERRIDES+=("ray.num_workers=$NPROC")
train=$("$PYTHON" "$REPO/launch/validate.py" --print data.train "$CONFIG" "${OVERRIDES[@]}") || exit $?
if [[ $train != *://* && ! -e $(cd "$REPO" && realpath -m "$train") ]]; then
  echo "error: data.train=$train does not exist; make the shards first (launch/pretrain.sh or python -m data_prep)" >&2
  ((DRY)) || exit 1
fi

case $LAUNCHER in
  torchrun) cmd=(torchrun --standalone --nproc_per_node "$NPROC" -m pipeline.train) ;;
  deepspeed)
    port=$("$PYTHON" "$REPO/launch/cluster.py" free-ports 1)
    cmd=(deepspeed --num_gpus "$NPROC" --master_port "$port" --module pipeline.train) ;;
  *) echo "error: --launcher must be torchrun or deepspeed, got $LAUNCHER" >&2; exit 2 ;;
esac
cmd+=("$CONFIG" "${OVERRIDES[@]}")
echo "+ (cd $REPO && DS_ACCELERATOR=${DS_ACCELERATOR:-} ${cmd[*]})"
((DRY)) && exit 0
cd "$REPO"
exec "${cmd[@]}"
