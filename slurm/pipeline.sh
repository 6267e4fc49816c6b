#!/bin/bash
# Submits the CRaSh pipeline as one Slurm job per stage, each starting when the one before it
# ended well (--dependency=afterok): prepare -> collect -> similarity -> cluster -> emulate ->
# train (one job per mode, side by side) -> plugin -> eval (and the CRaSh table); with
# CRASH_DECOMPOSE=1 also SFSD (decompose) after prepare.
#
#   CRASH_CONFIG=examples/demo/pipeline.ini CRASH_WORK=run CRASH_NTASKS=4 slurm/pipeline.sh
#
# Settings: see slurm/common.sh (CRASH_<KEY> or the INI file). Resources, as sbatch options:
#   CRASH_NODES (1), CRASH_NTASKS (tasks of the grid stages, 1), CRASH_GPUS_PER_NODE (none),
#   CRASH_CPUS_PER_TASK, CRASH_PARTITION, CRASH_ACCOUNT, CRASH_TIME_<STAGE> (e.g. CRASH_TIME_TRAIN=2-00:00:00),
#   CRASH_STOP_BEFORE (seconds before the time limit a training gets SIGUSR1, 300),
#   CRASH_SBATCH_ARGS (any other sbatch options, for every job).
# Prints one line per job (stage and job id) and writes them to $WORK/logs/jobs.txt; the
# logs are $WORK/logs/<stage>-<jobid>.out.
set -e
export CRASH_SLURM_DIR=${CRASH_SLURM_DIR:-$(cd "$(dirname "$0")" && pwd)}
[ -z "$CRASH_CONFIG" ] || export CRASH_CONFIG=$(realpath "$CRASH_CONFIG")
source "$CRASH_SLURM_DIR/common.sh"
export CRASH_BIN CRASH_MPI
require model
require train-task
require eval-task

res=(--nodes="${CRASH_NODES:-1}")
[ -z "$CRASH_GPUS_PER_NODE" ] || res+=(--gpus-per-node="$CRASH_GPUS_PER_NODE")
[ -z "$CRASH_CPUS_PER_TASK" ] || res+=(--cpus-per-task="$CRASH_CPUS_PER_TASK")
[ -z "$CRASH_PARTITION" ] || res+=(--partition="$CRASH_PARTITION")
[ -z "$CRASH_ACCOUNT" ] || res+=(--account="$CRASH_ACCOUNT")
grid_tasks=(--ntasks="${CRASH_NTASKS:-1}")

: >"$WORK/logs/jobs.txt"
# submit STAGE LOGNAME DEPENDENCY SBATCH-OPTIONS...: prints the job id.
submit() {
  local stage=$1 log=$2 dep=$3 time_var="CRASH_TIME_$(echo "$1" | tr a-z A-Z)"
  shift 3
  local a=("${res[@]}" --output="$WORK/logs/$log-%j.out" --error="$WORK/logs/$log-%j.out")
  [ -z "$dep" ] || a+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  [ -z "${!time_var}" ] || a+=(--time="${!time_var}")
  local id
  id=$(sbatch --parsable "${a[@]}" $CRASH_SBATCH_ARGS "$@" "$CRASH_SLURM_DIR/$stage.sh" | cut -d';' -f1)
  [ -n "$id" ] || die "sbatch of $stage.sh gave no job id"
  echo "$log $id" | tee -a "$WORK/logs/jobs.txt" >&2
  echo "$id"
}

prepare=$(submit prepare prepare "" --ntasks=1)
collect=$(submit collect collect "$prepare" "${grid_tasks[@]}")
similarity=$(submit similarity similarity "$collect" "${grid_tasks[@]}")
cluster=$(submit cluster cluster "$similarity" --ntasks=1)
emulate=$(submit emulate emulate "$cluster" --ntasks=1)
trains=()
for mode in $(cfg modes uniform,remove,share | tr ',' ' '); do
  trains+=("$(submit train "train-$mode" "$emulate" "${grid_tasks[@]}" --signal="USR1@${CRASH_STOP_BEFORE:-300}" \
    --export=ALL,CRASH_MODE="$mode")")
done
plugin=$(submit plugin plugin "$(IFS=:; echo "${trains[*]}")" --ntasks=1)
submit eval eval "$plugin" "${grid_tasks[@]}" >/dev/null
if [ "${CRASH_DECOMPOSE:-0}" = 1 ]; then submit decompose decompose "$prepare" "${grid_tasks[@]}" >/dev/null; fi
