#!/usr/bin/env bash
# Train without Ray: `python -m pipeline.train` under torchrun or the deepspeed launcher.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/train_dist.sh [--launcher torchrun|deepspeed] [--nproc N] [--nnodes N] [--dry-run]
                            [<experiment.yaml>] [key=value ...]

Runs the training loop alone (no Ray, no data prep, no evaluation watcher) on N local
processes with env:// rendezvous:
  torchrun  --standalone --nproc_per_node N -m pipeline.train <experiment.yaml> key=value ...
  deepspeed --num_gpus N --master_port <free port> --module pipeline.train <experiment.yaml> ...
The shards named by data.train must exist (launch/pretrain.sh or `python -m data_prep`
makes them). Without a GPU, DS_ACCELERATOR=cpu is set (gloo, bf16 on CPU).

On several nodes (torchrun only), run it once per node, e.g. under SLURM:
  srun --nodes=2 --ntasks-per-node=1 launch/train_dist.sh --nproc 8 <experiment.yaml> ...
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint <first node>:29400
           --rdzv-id $SLURM_JOB_ID -m pipeline.train <experiment.yaml> ...
The run dir (ray.storage_path, or output_dir) must be one every node sees.

One run, one writer: rank 0 takes the run dir's lease (pipeline.lease) before anything is
written and renews it; a run that a live job owns is not trained (exit 2, naming the owner),
and a rank 0 that finds its lease taken over stops without writing (exit 6).

Stopping: SIGTERM or SIGINT (scancel --signal=TERM, Ctrl-C, preemption) writes the run dir's
STOP; the ranks checkpoint at the next step boundary and the script exits 3, saying how to
resume (rerun the same command); a second signal stops at once.

  --launcher L   torchrun (default) or deepspeed
  --nproc N      processes per node (default: the GPUs here, else 2)
  --nnodes N     nodes (default: $SLURM_NNODES inside a SLURM job step, else 1)
  --dry-run      check the config and print the command only

Environment: PRETRAIN_RDZV_HOST (default: the step's first node), PRETRAIN_RDZV_PORT (29400).
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCHER=torchrun NPROC='' NNODES='' DRY=0 CONFIG=''
OVERRIDES=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --launcher) LAUNCHER=${2:?}; shift ;;
    --launcher=*) LAUNCHER=${1#*=} ;;
    --nproc) NPROC=${2:?}; shift ;;
    --nproc=*) NPROC=${1#*=} ;;
    --nnodes) NNODES=${2:?}; shift ;;
    --nnodes=*) NNODES=${1#*=} ;;
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
NNODES=${NNODES:-$([[ -n ${SLURM_STEP_ID:-} ]] && echo "${SLURM_NNODES:-1}" || echo 1)}
# The world size is the process count; validate the batch split against it.
OVERRIDES+=("ray.num_workers=$((NPROC * NNODES))")
out=$("$PYTHON" "$REPO/launch/validate.py" --print data.train --print run_dir "$CONFIG" "${OVERRIDES[@]}") || exit $?
mapfile -t v <<< "$out"
train=${v[0]} run_dir=${v[1]}
if [[ $train != *://* && ! -e $(cd "$REPO" && realpath -m "$train") ]]; then
  echo "error: data.train=$train does not exist; make the shards first (launch/pretrain.sh or python -m data_prep)" >&2
  ((DRY)) || exit 1
fi

case $LAUNCHER in
  torchrun)
    if ((NNODES > 1)); then
      host=${PRETRAIN_RDZV_HOST:-}
      if [[ -z $host ]]; then
        host=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?--nnodes > 1 outside SLURM needs PRETRAIN_RDZV_HOST}}" | head -n 1)
      fi
      cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv-backend c10d
        --rdzv-endpoint "$host:${PRETRAIN_RDZV_PORT:-29400}" --rdzv-id "${SLURM_JOB_ID:-train_dist}" -m pipeline.train)
    else
      cmd=(torchrun --standalone --nproc_per_node "$NPROC" -m pipeline.train)
    fi ;;
  deepspeed)
    ((NNODES == 1)) || { echo "error: --launcher deepspeed runs on one node here; use torchrun for --nnodes $NNODES" >&2; exit 2; }
    port=$("$PYTHON" "$REPO/launch/cluster.py" free-ports 1)
    cmd=(deepspeed --num_gpus "$NPROC" --master_port "$port" --module pipeline.train) ;;
  *) echo "error: --launcher must be torchrun or deepspeed, got $LAUNCHER" >&2; exit 2 ;;
esac
cmd+=("$CONFIG" "${OVERRIDES[@]}")
echo "+ (cd $REPO && DS_ACCELERATOR=${DS_ACCELERATOR:-} ${cmd[*]})"
((DRY)) && exit 0
cd "$REPO"

latest() { "$PYTHON" -m pipeline.rundir latest "$run_dir"; }
# The first SIGTERM/SIGINT asks the ranks for a stop checkpoint through the run dir's STOP (under
# srun they get the signal themselves too); a second one stops at once.
stopping=0 child=''
# shellcheck disable=SC2317 # called from the traps below
on_signal() {
  if ((stopping)); then kill -KILL -- "-$child" 2> /dev/null || kill -KILL "$child" 2> /dev/null; exit "$1"; fi
  stopping=1
  echo "stop requested: the ranks checkpoint at the next step boundary (signal again to stop at once)" >&2
  "$PYTHON" -m pipeline.rundir stop "$run_dir" "signal to launch/train_dist.sh on $(hostname)" >&2 || true
}
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
before=$(latest)  # the latest checkpoint at launch: a stop that saved one leaves a newer one
# Rank 0 writes its exit status here (torchrun turns any failure into 1): 2 when a live job owns
# the run (rank 0 takes the run dir's lease, pipeline.lease), 5 diverged, 6 taken over.
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
export PIPELINE_STATUS_FILE=$status_file
setsid "${cmd[@]}" &
child=$!
rc=0
while :; do  # a trapped signal interrupts wait; go on until the launcher has ended
  if wait "$child"; then rc=0; else rc=$?; fi
  kill -0 "$child" 2> /dev/null || break
done
status=$(cat "$status_file")
if ((rc != 0)) && [[ -n $status && $status != 0 ]]; then
  # 2 and 6: the run is another job's, so its STOP is not this launch's to clear
  ((status == EXIT_CONFIG || status == EXIT_LOST || status == EXIT_DIVERGED)) && exit "$status"
  rc=$status
elif ((rc != 0)) && "$PYTHON" -m pipeline.guard diverged "$run_dir"; then
  exit "$EXIT_DIVERGED"  # rank 0 ran on another node; the run dir says why
fi
if ((stopping)); then
  "$PYTHON" -m pipeline.rundir clear-stop "$run_dir" || true
  now=$(latest)
  if [[ -n $now && $now != "$before" ]]; then
    echo "stopped with checkpoint $now; to resume, rerun the same command" >&2
    exit "$EXIT_STOPPED"
  fi
fi
exit "$rc"
