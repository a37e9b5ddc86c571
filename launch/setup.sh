#!/usr/bin/env bash
# Set up the project in ./.venv: torch first (the CPU build where no GPU is present, so an
# unpinned torch never pulls a multi-GB CUDA build; a machine with a GPU keeps or gets a
# CUDA build), then this package and its dependencies with the installed torch pinned, so
# no later resolver step can swap it for another build.
#
#   launch/setup.sh            # runtime
#   launch/setup.sh --dev      # + test tools (pytest, moto, s3fs, ruff) and, as root, the system
#                              #   packages of the tests (shellcheck, slurm-wlm, munge, chromium)
#   launch/setup.sh --fresh    # delete .venv first (what CI does)
#   launch/setup.sh --locked   # install the known-good versions of requirements.lock
#   launch/setup.sh --venv DIR # another venv directory (default .venv)
#
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_INDEX_URL (a
# wheel index for torch, e.g. PyTorch's CPU index on machines without a local CPU wheel).
# Writes DIR/freeze.txt (the exact versions installed) and prints the venv's size.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dev=0 fresh=0 locked=0 venv=.venv
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --fresh) fresh=1 ;;
    --locked) locked=1 ;;
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

start=$(date +%s)
if [ "$fresh" = 1 ]; then rm -rf "$venv"; fi
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
"$py" -m pip install -q --upgrade "pip<27"

# pip byte-compiles what it installs one file at a time; compileall does it on every core once
# the installs are done (below), 25 s sooner on two cores. The byte code must be there: where
# PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile each module it imports.
install=("$py" -m pip install -q --no-compile)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! "$py" -c "import torch" 2>/dev/null; then
  if has_gpu; then
    "${install[@]}" "torch>=2.4,<2.15"
  else
    "${install[@]}" "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi

# Pin the torch that is now installed (e.g. 2.13.0+cpu) for every later install: pip 26
# otherwise replaces a CPU build with the newest CUDA one that the package's range allows.
torch_version=$("$py" -c "import torch; print(torch.__version__)")
constraints=$venv/constraints.txt
echo "torch==$torch_version" >"$constraints"
if [ "$locked" = 1 ]; then
  grep -v -i -E '^(torch|vit-pretrain)[ =]' requirements.lock >>"$constraints"
fi

# The system packages of the test tiers that need them (shellcheck: the launch scripts' lint;
# slurm-wlm and munge: the real SLURM of the cluster tier; chromium: the browser tier). Only
# as root with apt-get; elsewhere those tests skip and pytest's last lines say which and why.
system_packages() {
  local missing=() cmd pkg cmd_pkg
  for cmd_pkg in shellcheck:shellcheck slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge chromium:chromium; do
    cmd=${cmd_pkg%%:*} pkg=${cmd_pkg#*:}
    if ! PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 && [[ " ${missing[*]} " != *" $pkg "* ]]; then
      missing+=("$pkg")
    fi
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: not installing ${missing[*]} (needs root and apt-get): their test tiers will skip" >&2
    return 0
  fi
  echo "setup.sh: installing system packages for the tests: ${missing[*]}"
  if ! (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null); then
    echo "setup.sh: could not install ${missing[*]}: their test tiers will skip" >&2
  fi
}
# DeepSpeed's CPU ops (the shared-memory comm op every CPU rank loads, CPU Adam for optimizer
# offload) are built here, not by the first training processes: a process killed mid-build
# leaves a lock that stalls every later one. They take minutes of compiler time, so DeepSpeed
# goes in first and both builds run beside the install of everything else, from the repository
# root (pipeline/ds_ops.py: into the venv's torch_extensions, with the venv's ninja, as training).
ops=(ShareMemCommBuilder CPUAdamBuilder) op_builds=()
if ! has_gpu; then
  deepspeed_req=$("$py" -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('deepspeed')))")
  "${install[@]}" -c "$constraints" "$deepspeed_req"
  for op in "${ops[@]}"; do
    DS_ACCELERATOR=cpu "$py" -m pipeline.ds_ops "$op" >"$venv/build_$op.log" 2>&1 &
    op_builds+=($!)
  done
fi
packages=()
if [ "$dev" = 1 ]; then system_packages & packages+=($!); fi

extra=""
if [ "$dev" = 1 ]; then extra="[dev]"; fi
"${install[@]}" -c "$constraints" -e ".$extra"
# Not the packages' own test suites, which no process here imports: a seventh of the files, 13 s
# of two cores. (A few files that packages ship but never import do not compile, as under
# pip: not an error.)
"$py" -m compileall -q -j 0 -x '/(tests?|_tests)/' \
  "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true

now=$("$py" -c "import torch; print(torch.__version__)")
if [ "$now" != "$torch_version" ]; then
  echo "setup.sh: torch changed from $torch_version to $now during the install" >&2
  exit 1
fi
"$py" -m pip freeze --exclude-editable >"$venv/freeze.txt"
if [ "$dev" = 1 ]; then echo "setup.sh: installed (pip freeze):"; sed 's/^/  /' "$venv/freeze.txt"; fi
"$py" -c "import torch, deepspeed, ray, mlflow, webdataset; print(f'ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}')"
for pid in "${packages[@]}"; do wait "$pid"; done
# A build that failed (say, a package it imports replaced by the install beside it) goes again
# now that the install is done; a second failure stops the setup with its log.
for i in "${!op_builds[@]}"; do
  wait "${op_builds[$i]}" && continue
  op=${ops[$i]}
  DS_ACCELERATOR=cpu "$py" -m pipeline.ds_ops "$op" >"$venv/build_$op.log" 2>&1 ||
    { echo "setup.sh: building DeepSpeed's $op failed:" >&2; cat "$venv/build_$op.log" >&2; exit 1; }
done

size=$(du -sm "$venv" | cut -f1)
done_line="setup.sh: $(cd "$venv" && pwd) is ${size} MB, set up in $(( $(date +%s) - start )) s; exact versions in $venv/freeze.txt"
echo "$done_line"
# What this run was asked to do and its last line: tests/test_setup.py checks a fresh --locked
# venv that CI has just built (from these very files) instead of building a second one.
{
  echo "fresh=$fresh locked=$locked dev=$dev"
  sha256sum launch/setup.sh requirements.lock pyproject.toml
  echo "$done_line"
} >"$venv/setup-record"
