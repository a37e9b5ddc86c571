#!/usr/bin/env bash
# Pre-train a ViT: get a Ray cluster, submit `python -m pipeline.run` to it with
# `ray job submit`, stream the job's logs and exit with the job's exit code.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/pretrain.sh [--slurm | --address URL] [--dry-run] [--plan] [--num-cpus N] [--upload]
                          [--sbatch-args "ARGS"] [--requeue] [--signal-lead S]
                          [<experiment.yaml>] [key=value ...]

Validates the config first (a bad one fails with exit code 2 before anything starts), then
runs `python -m pipeline.run <experiment.yaml> key=value ...` as a Ray job.
Default experiment: configs/experiment/demo.yaml. Relative output_dir values (the default
is runs/<name>) are relative to the repository root.

Where the job runs:
  (default)       a local single-node Ray cluster started for this run only: head on
                  127.0.0.1 with free ports and its own --temp-dir, stopped on exit
                  (Ctrl-C included) without touching any other Ray on the machine.
  --address URL   an existing cluster: its dashboard URL (http://head:8265) or GCS
                  address (head:6379). Nothing is started; Ctrl-C stops the job.
                  $RAY_ADDRESS selects this mode too. A run that a live job of this
                  cluster owns (its lease) is not submitted again: that job is followed
                  (its logs, then its exit status; Ctrl-C leaves it running).
  --slurm         outside an allocation: sbatch launch/slurm/pretrain.sbatch with these
                  arguments (plus --sbatch-args, e.g. "--nodes=4 --gpus-per-node=8
                  --partition=gpu"). Inside one ($SLURM_JOB_ID set, as in that sbatch
                  script or under salloc): Ray head on the first node, workers on the
                  others (srun), then the job with ray.num_workers=<nodes x GPUs per node>
                  ray.use_gpu=true when the nodes have GPUs (unless you set ray.* yourself).
  --requeue       (--slurm) sbatch --requeue: a job stopped by a signal (preemption, the
                  time-limit warning, scancel --signal=TERM) requeues itself and resumes from
                  its stop checkpoint and MLflow run; the log is appended to, not replaced
  --signal-lead S (--slurm) SLURM sends SIGTERM to the batch shell S seconds before the time
                  limit (sbatch --signal=B:TERM@S; default 300): time to checkpoint and stop

Options:
  --dry-run       print every command instead of running it (the config is still checked)
  --plan          print the plan (memory per ZeRO stage, time, GPU-hours, host cores,
                  checkpoints; `python -m pipeline.plan`) for the target in plan.* keys or
                  --sbatch-args, start nothing; exit 2 when the micro-batch does not fit
  --quiet         the job logs warnings, errors and its summary only (no step lines, no bars)
  --num-cpus N    CPUs Ray may use per node (default: local: the cores, or what the config
                  needs if more; SLURM: $SLURM_CPUS_ON_NODE)
  --upload        ship the repository to the cluster as the job's working_dir (for clusters
                  that do not share this filesystem; put the run dir on object storage with
                  ray.storage_path=s3://bucket/runs, output_dir stays a host-local scratch dir)
  -h, --help      this text

Environment:
  RAY_AUTH_MODE            token (default for clusters started here) or disabled; for
                           --address it is set to token when the dashboard asks for one
  PRETRAIN_RAY_TMPDIR      where the local cluster's (on SLURM: each node's) temp dir is made (default /tmp; keep
                           it short: Ray's socket paths must stay under 107 bytes)
  PRETRAIN_WAIT_S          seconds to wait for the cluster's nodes (default 120 local,
                           300 SLURM)
  SLURM_HOSTNAMES          node names, comma or space separated, instead of expanding
                           $SLURM_JOB_NODELIST with `scontrol show hostnames` (for tests and
                           hosts without scontrol; a plain comma list in SLURM_JOB_NODELIST
                           also works without scontrol)
  PRETRAIN_HEAD_IP         the head's IP on SLURM (default: `hostname --ip-address` on it)
  PRETRAIN_RAY_PORT, PRETRAIN_DASHBOARD_PORT   SLURM head ports (default 6379, 8265)
  PRETRAIN_SRUN_ARGS       extra flags for the srun steps that run Ray (e.g. --overlap)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARGS=("$@")
MODE=local ADDRESS=${RAY_ADDRESS:-} DRY=0 PLAN=0 NUM_CPUS='' UPLOAD=0 CONFIG='' SBATCH_ARGS='' REQUEUE=0 SIGNAL_LEAD=''
OVERRIDES=() QUIET=()
[[ -n $ADDRESS ]] && MODE=address
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --slurm) MODE=slurm ;;
    --address) MODE=address ADDRESS=${2:?--address needs a URL}; shift ;;
    --address=*) MODE=address ADDRESS=${1#*=} ;;
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;
    --num-cpus) NUM_CPUS=${2:?--num-cpus needs a number}; shift ;;
    --num-cpus=*) NUM_CPUS=${1#*=} ;;
    --upload) UPLOAD=1 ;;
    --quiet) QUIET=(--quiet) ;;
    --sbatch-args) SBATCH_ARGS=${2?--sbatch-args needs a string}; shift ;;
    --sbatch-args=*) SBATCH_ARGS=${1#*=} ;;
    --requeue) REQUEUE=1 ;;
    --signal-lead) SIGNAL_LEAD=${2:?--signal-lead needs seconds}; shift ;;
    --signal-lead=*) SIGNAL_LEAD=${1#*=} ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1") ;;
    *) [[ -z $CONFIG ]] || { echo "error: two experiment configs: $CONFIG and $1" >&2; exit 2; }
       CONFIG=$1 ;;
  esac
  shift
done
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"
resolve_config_and_python
if ((PLAN)); then  # no cluster, no data: the plan of this config on the target hardware
  cd "$REPO" && exec "$PYTHON" -m pipeline.plan "$CONFIG" "${OVERRIDES[@]}" "--sbatch-args=$SBATCH_ARGS"
fi
RAY=$(dirname "$PYTHON")/ray
[[ -x $RAY ]] || RAY=ray

quote() {  # a word as the shell reads it, single-quoted only where needed
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
say() {  # print a command; $SAY_TAIL (a redirection, a comment) is printed as it is
  local w line='+'
  for w in "$@"; do line+=" $(quote "$w")"; done
  printf '%s%s\n' "$line" "${SAY_TAIL:-}"
}
run() { say "$@"; ((DRY)) || "$@"; }  # print, then run unless --dry-run
die() { echo "error: $*" >&2; exit 1; }
have_token() { [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; }
user_set() { local o; for o in "${OVERRIDES[@]}"; do [[ $o == "$1"=* ]] && return 0; done; return 1; }
cluster() { "$PYTHON" "$REPO/launch/cluster.py" "$@"; }

# Ray >= 2.5x turns token auth on for new clusters; clients must then send the token.
use_token_auth() {
  [[ ${RAY_AUTH_MODE:-} == disabled ]] && return 0
  if ! have_token; then run "$RAY" get-auth-token --generate > /dev/null; fi
  [[ ${RAY_AUTH_MODE:-} == token ]] || say export RAY_AUTH_MODE=token
  export RAY_AUTH_MODE=token
}

gpu_overrides() {  # $1: total GPUs of the cluster
  if (($1 > 0)) && ! user_set ray.num_workers && ! user_set ray.use_gpu; then
    OVERRIDES+=("ray.num_workers=$1" ray.use_gpu=true)
  fi
}

check_config() {  # validates, then sets NAME and OUTPUT_DIR
  local out
  # From the repo: a relative output_dir (runs/<name>) is made absolute under it.
  out=$(cd "$REPO" && "$PYTHON" "$REPO/launch/validate.py" --print name --print output_dir --print ray.num_workers \
    --print ray.cpus_per_worker --print eval.enabled --print eval.num_cpus --print run_dir "$CONFIG" "${OVERRIDES[@]}") || exit $?
  local -a v
  mapfile -t v <<< "$out"
  NAME=${v[0]} OUTPUT_DIR=${v[1]} RUN_DIR=${v[6]}
  CPUS_NEEDED=$(awk -v w="${v[2]}" -v c="${v[3]}" -v e="${v[4]}" -v ec="${v[5]}" \
    'BEGIN { n = w * c + (e == "True" ? ec : 0); print (n == int(n)) ? n : int(n) + 1 }')
  echo "config ok: $CONFIG ${OVERRIDES[*]}"
}

local_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    local -a ids
    IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi > /dev/null; then
    nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# --- the job and how it is submitted --------------------------------------------------
JOB_ID='' SUBMIT_PID='' DASHBOARD=''
submit() {  # ray job submit to $DASHBOARD, waiting interruptibly; exits with the job's code
  JOB_ID=pretrain-$(tr -c 'A-Za-z0-9_-' '-' <<< "$NAME" | sed 's/-$//')-$(date +%Y%m%d-%H%M%S)
  if ((!UPLOAD)) && [[ $OUTPUT_DIR != *://* ]]; then
    # Absolute (resolved under the repo by check_config), so that paths interpolated from
    # ${output_dir} (data.train, ...) mean the same in Ray's workers, whose working
    # directory is Ray's, not the repository.
    OVERRIDES+=("output_dir=$OUTPUT_DIR")
  fi
  # The job's environment from this shell (not credentials: those belong to the cluster).
  local -a entry=(env) runtime=()
  local var
  for var in MLFLOW_TRACKING_URI DS_ACCELERATOR AWS_ENDPOINT_URL AWS_DEFAULT_REGION FSSPEC_S3_ENDPOINT_URL \
    NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
    [[ -z ${!var:-} ]] || entry+=("$var=${!var}")
  done
  if ((UPLOAD)); then
    local rel=${CONFIG#"$REPO"/}
    [[ $rel != "$CONFIG" ]] || die "--upload ships the repository: put $CONFIG inside $REPO"
    [[ $OUTPUT_DIR == /* || $OUTPUT_DIR == *://* ]] ||
      echo "warning: output_dir=$OUTPUT_DIR lands inside the job's temporary working_dir; pass output_dir=<shared path>" >&2
    runtime=(--runtime-env-json "$(cluster upload-env "$REPO")")
    entry+=(python -m pipeline.run "${QUIET[@]}" "${DEAD_OWNER[@]}" "$rel" "${OVERRIDES[@]}")
  else
    # Same filesystem: the repo root as working directory (runs/<name> lands there), this
    # python. bash -c 'cd "$0" && exec "$@"' needs no quoting of the words after it.
    # shellcheck disable=SC2016
    entry=(bash -c 'cd "$0" && exec "$@"' "$REPO" "${entry[@]}" "$PYTHON" -m pipeline.run "${QUIET[@]}" "${DEAD_OWNER[@]}" "$CONFIG" "${OVERRIDES[@]}")
  fi
  local -a cmd=("$RAY" job submit --address "$DASHBOARD" --submission-id "$JOB_ID" "${runtime[@]}" -- "${entry[@]}")
  say "${cmd[@]}"
  ((DRY)) && return 0
  "${cmd[@]}" &
  SUBMIT_PID=$!
  local rc=0
  while :; do  # a trapped signal interrupts wait; the job goes on until it has stopped itself
    if wait "$SUBMIT_PID"; then rc=0; else rc=$?; fi
    kill -0 "$SUBMIT_PID" 2> /dev/null || break
  done
  SUBMIT_PID=
  # `ray job submit` exits 0 for a job that `ray job stop` stopped: ask for the driver's status.
  local code run_dir=()
  [[ $UPLOAD == 1 && $RUN_DIR != *://* ]] || run_dir=(--run-dir "$RUN_DIR")
  code=$(cd "$REPO" && { cluster exit-code "$DASHBOARD" "$JOB_ID" "${run_dir[@]}" 2> /dev/null || true; })
  [[ $code =~ ^[0-9]+$ && $code != 0 ]] && rc=$code
  if ((rc != 0)); then
    if ((rc == EXIT_STOPPED)); then
      local again="launch/pretrain.sh ${ARGS[*]}"
      [[ $MODE == slurm ]] && again+=" with the same --sbatch-args (pretrain.sh --requeue makes SLURM do it)"
      echo "stopped with a checkpoint (exit status $EXIT_STOPPED); to resume from it, run again: $again"
    fi
  else
    [[ $UPLOAD == 1 || $OUTPUT_DIR == *://* ]] || echo "outputs: $OUTPUT_DIR"
  fi
  JOB_ID=
  return "$rc"
}

# A run whose live owner is a job of this cluster (a rerun after the submitting client died):
# follow that job and exit with its status instead of submitting a second one, which the
# run's lease would refuse. Ctrl-C leaves the job running (this script did not start it).
# A job of this cluster that has ended (its driver killed: FAILED) owns nothing: its lease
# is taken over at once (pipeline.run --dead-owner), never followed.
DEAD_OWNER=()
attach() {
  local owner state job code job_state
  owner=$(cd "$REPO" && "$PYTHON" -m pipeline.rundir owner "$RUN_DIR" 2> /dev/null) || return 0
  read -r state job _ <<< "$owner"
  [[ $state == live && $job != - ]] || return 0
  job_state=$(cd "$REPO" && { cluster job-state "$DASHBOARD" "$job" 2> /dev/null || true; })
  [[ -n $job_state ]] || return 0
  if [[ $job_state != RUNNING && $job_state != PENDING ]]; then
    echo "run $NAME is owned by job $job of this cluster, which has ended ($job_state): taking the run over"
    DEAD_OWNER=(--dead-owner "$job")
    return 0
  fi
  echo "run $NAME is owned by job $job of this cluster (${owner#* * }): following it (Ctrl-C leaves it running)"
  run "$RAY" job logs --address "$DASHBOARD" --follow "$job" || true
  code=$(cd "$REPO" && { cluster exit-code "$DASHBOARD" "$job" --run-dir "$RUN_DIR" 2> /dev/null || true; })
  exit "${code:-$EXIT_FAILED}"
}

# --- teardown: only what this script started ------------------------------------------
STARTED_PIDS=() STEP_PIDS=() RAY_TMP='' DRY_STOP=()
cleanup() {
  local rc=$?
  # A signal now (SLURM's time-limit warning while Ray stops) must not replace the job's status.
  trap - EXIT
  trap '' INT TERM
  if ((DRY)); then
    ((${#DRY_STOP[@]} == 0)) || printf '+ %s\n' "${DRY_STOP[@]}"
    exit "$rc"
  fi
  [[ -z $SUBMIT_PID ]] || kill "$SUBMIT_PID" 2> /dev/null || true
  if [[ -n $JOB_ID && $MODE == address ]]; then
    echo "stopping job $JOB_ID" >&2
    "$RAY" job stop --no-wait --address "$DASHBOARD" "$JOB_ID" > /dev/null 2>&1 || true
  fi
  if ((${#STEP_PIDS[@]})); then  # srun passes USR1 on to launch/cluster.py node, which ends its node
    echo "stopping the Ray nodes of this job (srun pids ${STEP_PIDS[*]})" >&2
    kill -USR1 "${STEP_PIDS[@]}" 2> /dev/null || true
  fi
  if ((${#STARTED_PIDS[@]})); then
    echo "stopping the Ray processes started here (pids ${STARTED_PIDS[*]})" >&2
    kill -TERM "${STARTED_PIDS[@]}" 2> /dev/null || true
  fi
  local pid i
  for pid in "${STARTED_PIDS[@]}" "${STEP_PIDS[@]}"; do
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2> /dev/null || kill -KILL "$pid" 2> /dev/null || true
  done
  [[ -n $RAY_TMP && -d $RAY_TMP ]] && rm -rf "$RAY_TMP"
  [[ -n $RAY_TMP ]] && rm -f "$RAY_TMP.head.log"
  exit "$rc"
}

start_local() {
  local need=${NUM_CPUS:-$(($(nproc) > CPUS_NEEDED ? $(nproc) : CPUS_NEEDED))}
  local -a ports
  read -ra ports <<< "$(cluster free-ports 4)"
  use_token_auth
  local parent=${PRETRAIN_RAY_TMPDIR:-/tmp}
  if ((DRY)); then
    RAY_TMP=$parent/pretrain-ray.XXXXXX
    say mktemp -d "$RAY_TMP"
  else
    RAY_TMP=$(mktemp -d "$parent/pretrain-ray.XXXXXX")
  fi
  DASHBOARD=http://127.0.0.1:${ports[1]}
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 (Ray swaps a loopback
  # --node-ip-address for the host's IP otherwise); no drain wait on SIGTERM.
  # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` gives the driver time to checkpoint (Ray's
  # default: SIGKILL 3 s after the SIGTERM).
  local -a head_cmd=(env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_JOB_STOP_WAIT_TIME_S=600
    setsid "$RAY" start --head --block --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1
    --port "${ports[0]}" --dashboard-port "${ports[1]}" --ray-client-server-port "${ports[2]}"
    --dashboard-agent-listen-port "${ports[3]}" --num-cpus "$need" --temp-dir "$RAY_TMP"
    --disable-usage-stats)
  SAY_TAIL=" > $RAY_TMP/head.log 2>&1 &" say "${head_cmd[@]}"
  if ! ((DRY)); then
    (cd "$REPO" && exec "${head_cmd[@]}") > "$RAY_TMP/head.log" 2>&1 &
    STARTED_PIDS+=($!)
  fi
  wait_nodes 1 "${PRETRAIN_WAIT_S:-120}" || { tail -n 20 "$RAY_TMP/head.log" >&2; exit 1; }
  DRY_STOP=("kill -TERM <pid of ray start --block>  # on exit: stops this cluster only (not ray stop: that stops every Ray on the host)"
    "rm -rf $RAY_TMP")
}

wait_nodes() {  # $1 nodes within $2 seconds; gives up early when the head's process ended
  local -a cmd=("$PYTHON" "$REPO/launch/cluster.py" wait-nodes "$DASHBOARD" "$1" --timeout "$2")
  ((${#STARTED_PIDS[@]})) && cmd+=(--pid "${STARTED_PIDS[0]}")
  run "${cmd[@]}"
}

slurm_hosts() {
  if [[ -n ${SLURM_HOSTNAMES:-} ]]; then
    local -a names
    IFS=$', \t\n' read -ra names <<< "$SLURM_HOSTNAMES"
    printf '%s\n' "${names[@]}"
    return
  fi
  local expanded=''
  # scontrol needs the cluster's config; without it (a login host, a test) a plain list still works.
  if command -v scontrol > /dev/null && expanded=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" 2> /dev/null); then
    printf '%s\n' "$expanded"
  elif [[ ${SLURM_JOB_NODELIST:?} != *\[* ]]; then
    tr ',' '\n' <<< "$SLURM_JOB_NODELIST"
  else
    die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST (no scontrol, or it has no SLURM config here); set SLURM_HOSTNAMES"
  fi
}

start_slurm() {
  local names
  names=$(slurm_hosts) || exit 1
  local -a hosts
  mapfile -t hosts <<< "$names"
  [[ -n ${hosts[0]} ]] || die "no hosts in the SLURM allocation"
  local head_host=${hosts[0]} cpus=${NUM_CPUS:-${SLURM_CPUS_ON_NODE:-$(nproc)}} gpus=${SLURM_GPUS_ON_NODE:-0}
  local port=${PRETRAIN_RAY_PORT:-6379} dash=${PRETRAIN_DASHBOARD_PORT:-8265}
  echo "slurm: head $head_host, workers ${hosts[*]:1}, ${#hosts[@]} node(s) x $cpus CPUs x $gpus GPUs"
  gpu_overrides $((${#hosts[@]} * gpus))
  check_config
  # In the batch script (it runs on the first node) the head runs in the batch step itself,
  # which `scancel --signal=TERM` leaves alone; under salloc it is a job step on the first node.
  local here=0
  [[ ${SLURMD_NODENAME:-} == "$head_host" ]] && here=1
  local ip=${PRETRAIN_HEAD_IP:-}
  if [[ -z $ip ]]; then
    local -a probe=(hostname --ip-address)
    ((here)) || probe=(srun --nodes=1 --ntasks=1 -w "$head_host" "${probe[@]}")
    say "${probe[@]}"
    if ((DRY)); then ip="<ip of $head_host>"; else ip=$("${probe[@]}" | awk '{print $1}'); fi
  fi
  use_token_auth
  # Workers on other nodes get the token from srun's environment when $HOME is not shared.
  if [[ ${RAY_AUTH_MODE:-} == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
    # shellcheck disable=SC2016 # printed, not expanded
    say export 'RAY_AUTH_TOKEN=$(ray get-auth-token)'
    ((DRY)) || { RAY_AUTH_TOKEN=$("$RAY" get-auth-token 2> /dev/null); export RAY_AUTH_TOKEN; }
  fi
  RAY_TMP=${PRETRAIN_RAY_TMPDIR:-/tmp}/ray-slurm-${SLURM_JOB_ID:-0}  # node-local on every node; one per job
  DASHBOARD=http://$ip:$dash
  local -a step=(srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus") srun_extra
  read -ra srun_extra <<< "${PRETRAIN_SRUN_ARGS:-}"
  step+=("${srun_extra[@]}")
  # A job step's Ray node runs under launch/cluster.py node: SIGTERM to the step (scancel
  # --signal=TERM) becomes a graceful stop of the job instead of the end of the node.
  local -a node=("$PYTHON" "$REPO/launch/cluster.py" node --)
  local -a common=(--num-cpus "$cpus" --num-gpus "$gpus" --temp-dir "$RAY_TMP" --block --disable-usage-stats)
  # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` gives the driver time to checkpoint (Ray's default: 3 s, then SIGKILL).
  local -a cmd=(env RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_JOB_STOP_WAIT_TIME_S=600 "$RAY" start --head
    --node-ip-address "$ip" --port "$port" --dashboard-host "$ip" --dashboard-port "$dash" "${common[@]}")
  if ((here)); then
    cmd=(setsid "${cmd[@]}")
    SAY_TAIL=" > $RAY_TMP.head.log 2>&1 &" say "${cmd[@]}"
    if ! ((DRY)); then "${cmd[@]}" > "$RAY_TMP.head.log" 2>&1 & STARTED_PIDS+=($!); fi
  else
    cmd=("${step[@]}" -w "$head_host" "${node[@]}" "${cmd[@]}")
    SAY_TAIL=" &" say "${cmd[@]}"
    if ! ((DRY)); then "${cmd[@]}" & STEP_PIDS+=($!); fi
  fi
  local host
  for host in "${hosts[@]:1}"; do
    cmd=("${step[@]}" -w "$host" "${node[@]}" "$RAY" start --address "$ip:$port" "${common[@]}")
    SAY_TAIL=" &" say "${cmd[@]}"
    if ! ((DRY)); then "${cmd[@]}" & STEP_PIDS+=($!); fi
  done
  wait_nodes "${#hosts[@]}" "${PRETRAIN_WAIT_S:-300}"
  DRY_STOP=("kill -USR1 <pids of the srun steps above>  # on exit: each node's Ray processes end"
    "kill -TERM <pid of the head's ray start --block>")
}

sbatch_submit() {
  local -a extra opts=()
  read -ra extra <<< "$SBATCH_ARGS"
  [[ -z $SIGNAL_LEAD || $SIGNAL_LEAD =~ ^[0-9]+$ ]] || die "--signal-lead needs whole seconds, got $SIGNAL_LEAD"
  [[ -z $SIGNAL_LEAD ]] || opts+=("--signal=B:TERM@$SIGNAL_LEAD")
  ((REQUEUE)) && opts+=(--requeue --open-mode=append)
  check_config
  run mkdir -p "$REPO/runs/slurm"
  run env PRETRAIN_REPO="$REPO" PRETRAIN_REQUEUE="$REQUEUE" sbatch --chdir "$REPO" --output "$REPO/runs/slurm/%x-%j.out" \
    "${opts[@]}" "${extra[@]}" "$REPO/launch/slurm/pretrain.sbatch" "${QUIET[@]}" "$CONFIG" "${OVERRIDES[@]}"
}

# SIGTERM/SIGINT (preemption, scancel, Ctrl-C) while the job runs: a graceful stop through
# the run dir's STOP (the workers checkpoint at the next step boundary, the job exits 3 and
# so does this script); a second signal stops everything at once.
STOPPING=0 RUN_DIR=''
on_signal() {  # $1: the exit status for an immediate stop
  if ((STOPPING)) || [[ -z $SUBMIT_PID ]]; then exit "$1"; fi
  STOPPING=1
  echo "stop requested: the job checkpoints at the next step boundary and exits (signal again to stop at once)" >&2
  if [[ $RUN_DIR == *://* || $MODE == local || $UPLOAD == 0 ]]; then
    (cd "$REPO" && "$PYTHON" -m pipeline.rundir stop "$RUN_DIR" "signal to launch/pretrain.sh") >&2 ||
      "$RAY" job stop --no-wait --address "$DASHBOARD" "$JOB_ID" > /dev/null 2>&1 || true
  else  # the run dir is a path on the cluster: the job's driver turns SIGTERM into the same stop
    "$RAY" job stop --no-wait --address "$DASHBOARD" "$JOB_ID" > /dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

case $MODE in
  local)
    gpu_overrides "$(local_gpus)"
    check_config
    start_local
    ;;
  address)
    check_config
    DASHBOARD=$ADDRESS
    if ! ((DRY)); then
      auth=$(cluster probe "$ADDRESS" --timeout 5) || exit 1
      if [[ $auth == token || ($auth == unknown && -z ${RAY_AUTH_MODE:-}) ]] && have_token; then
        export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
      elif [[ $auth == token && ${RAY_AUTH_MODE:-} != disabled ]]; then
        die "$ADDRESS asks for a Ray auth token: put it in ~/.ray/auth_token or \$RAY_AUTH_TOKEN"
      fi
      attach
    fi
    ;;
  slurm)
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
      sbatch_submit
      exit 0
    fi
    start_slurm
    ;;
esac
submit
