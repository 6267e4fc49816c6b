# Shared by every script in slurm/ (sourced). Settings, in order of precedence:
#   1. environment variables CRASH_<KEY> (key upper-cased, '-' as '_'): CRASH_STEPS=20
#   2. the INI file $CRASH_CONFIG, the same file `crash-hpc pipeline --config` reads
#   3. the defaults of the crash-hpc jobs
# Also: CRASH_BIN (the program, default build/crash-hpc of this checkout), CRASH_WORK (= work),
# CRASH_MPI (srun's --mpi; default pmix when srun has it, else pmi2).

CRASH_SLURM_DIR=${CRASH_SLURM_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
CRASH_BIN=${CRASH_BIN:-$(cd "$CRASH_SLURM_DIR/.." && pwd)/build/crash-hpc}

die() {
  echo "crash-hpc slurm: $*" >&2
  exit 2
}

[ -z "$CRASH_CONFIG" ] || [ -r "$CRASH_CONFIG" ] || die "CRASH_CONFIG=$CRASH_CONFIG: cannot read the file"
[ -x "$CRASH_BIN" ] || die "CRASH_BIN=$CRASH_BIN: not an executable (build it, or point CRASH_BIN at crash-hpc)"

# All values of KEY in the INI file, one a line (eval-task may repeat).
cfg_ini() {
  [ -n "$CRASH_CONFIG" ] || return 0
  sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\(.*[^[:space:]]\)[[:space:]]*\$/\1/p" "$CRASH_CONFIG"
}

# cfg KEY [DEFAULT]: one value.
cfg() {
  local var="CRASH_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!var}" ]; then echo "${!var}"; return; fi
  local v
  v=$(cfg_ini "$1" | tail -1)
  echo "${v:-$2}"
}

# cfg_list KEY: every value, one a line (the variable takes a comma-separated list).
cfg_list() {
  local var="CRASH_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!var}" ]; then echo "${!var}" | tr ',' '\n'; return; fi
  cfg_ini "$1"
}

require() {
  [ -n "$(cfg "$1")" ] || die "no '$1': set it in CRASH_CONFIG or as CRASH_$(echo "$1" | tr 'a-z-' 'A-Z_')"
}

WORK=$(cfg work)
[ -n "$WORK" ] || die "no work folder: set CRASH_WORK or 'work' in CRASH_CONFIG"
MODEL=$(cfg model)
DTYPE=$(cfg dtype float32)
TP=$(cfg tp 1)
PP=$(cfg pp 1)
BACKEND=$(cfg backend mpi)
THREADS=$(cfg threads "${SLURM_CPUS_PER_TASK:-0}")

# srun's PMI: Debian's OpenMPI speaks PMIx, not PMI-2.
if [ -z "$CRASH_MPI" ]; then
  if srun --mpi=list 2>&1 | grep -qw pmix; then CRASH_MPI=pmix; else CRASH_MPI=pmi2; fi
fi

task_name() { basename "${1%.*}"; }
prepared() { echo "$WORK/prepared/$(task_name "$1")"; }

# Arguments every grid job takes (the pipeline job passes the same).
grid_args() {
  local a=(--tp "$TP" --pp "$PP" --backend "$BACKEND")
  [ -z "$(cfg pp-layers)" ] || a+=(--pp-layers "$(cfg pp-layers)")
  echo "${a[@]}"
}
common_args() { echo --log-level "$(cfg log-level info)" --threads "$THREADS"; }

# crash_srun JOB ARGS...: the job on every task of this allocation.
crash_srun() {
  local job=$1
  shift
  echo "crash-hpc slurm: $(date -u +%FT%TZ) srun --mpi=$CRASH_MPI $CRASH_BIN $job $*" >&2
  # stdin from /dev/null: srun would otherwise swallow the input of a loop around it.
  srun --mpi="$CRASH_MPI" --kill-on-bad-exit=1 "$CRASH_BIN" "$job" "$@" $(common_args) </dev/null
}

# preflight OUT [MODEL]: the launch, collectives, parallel HDF5 and memory, before the stage.
preflight() {
  local a=(--out "$1" --dtype "$DTYPE" $(grid_args))
  [ -z "$2" ] || a+=(--model "$2")
  crash_srun preflight "${a[@]}" || exit $?
}

# for_each_mode NAME COMMAND...: COMMAND MODE OUT for every mode (uniform, remove, share, or
# 'modes'), OUT being $WORK/<mode>/NAME; a mode whose OUT exists is skipped. Ends the script
# on the first failure.
for_each_mode() {
  local name=$1 mode out
  shift
  for mode in $(cfg modes uniform,remove,share | tr ',' ' '); do
    out=$WORK/$mode/$name
    if [ -e "$out" ]; then echo "crash-hpc slurm: $out exists, skipped"; continue; fi
    "$@" "$mode" "$out" || exit $?
  done
}

# done_or OUT: ends the script when the stage's output is complete already (as the pipeline job skips it).
skip_if_done() {
  if [ -e "$1" ]; then
    echo "crash-hpc slurm: $1 exists, stage skipped"
    exit 0
  fi
}

mkdir -p "$WORK/logs" "$WORK/prepared" "$WORK/eval"
