#!/bin/bash
# The slurm/ scripts on a real one-node Slurm (tests/slurm/cluster.sh): preflight failures,
# the CRaSh pipeline on the demo model (2 tasks, MPI on CPU, a reduced config) submitted by
# slurm/pipeline.sh, and a training sent SIGUSR1 that checkpoints, requeues and completes.
#   run_slurm_test.sh BUILD_DIR SOURCE_DIR     (as root; exit 77: skipped)
set -u
BUILD=$(realpath "$1")
SRC=$(realpath "$2")
BIN=$BUILD/crash-hpc
if [ "$(id -u)" != 0 ] || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm test: needs root and slurm-wlm + munge (env/setup.sh); skipped"
  exit 77
fi
T=$(mktemp -d /tmp/crash-slurm-test.XXXXXX)
source "$SRC/tests/slurm/cluster.sh"
cleanup() {
  scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
  slurm_cluster_stop
  if [ -n "${KEEP_SLURM_TEST:-}" ]; then echo "slurm test: kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
START=$(date +%s)
failures=0
check() {  # DESCRIPTION COMMAND...
  if "${@:2}"; then echo "ok: $1"; else echo "FAILED: $1"; failures=$((failures + 1)); fi
}
slurm_cluster_start "$T/slurm" || exit 1
# A copy of the program: a build relinking build/crash-hpc meanwhile cannot break a job.
cp "$BIN" "$T/crash-hpc" && BIN=$T/crash-hpc
HOST=$(hostname -s)
cd "$SRC"

# --- preflight failures: exit 2, one line naming the node and the check -------------------
expect_fail() {  # DESCRIPTION CHECK-NAME COMMAND...
  local out rc
  out=$("${@:3}" 2>&1)
  rc=$?
  echo "$out" | grep "preflight check" | head -2
  check "$1: exit 2" test $rc -eq 2
  check "$1: names the check and the node" bash -c 'grep -q "preflight check '"'$2'"' failed on node $0" <<<"$1"' "$HOST" "$out"
}
: >"$T/a-file"
expect_fail "fake SLURM_NTASKS" "world size" env -u SLURM_STEP_NUM_TASKS SLURM_NTASKS=3 "$BIN" preflight --out "$T/pf"
expect_fail "step of 2 tasks told 3" "world size" \
  srun --mpi=pmix -n 2 bash -c "SLURM_STEP_NUM_TASKS=3 exec $BIN preflight --out $T/pf"
expect_fail "unwritable output folder" "parallel HDF5 in $T/a-file/out" \
  srun --mpi=pmix -n 2 "$BIN" preflight --out "$T/a-file/out"
mkdir -p "$T/huge"
python3 -c "import json,sys; c=json.load(open(sys.argv[1])); c.update(num_hidden_layers=4000, hidden_size=8192, ffn_dim=32768, num_attention_heads=64); json.dump(c, open(sys.argv[2],'w'))" \
  examples/demo/model/config.json "$T/huge/config.json"
expect_fail "model too large for memory" "memory per rank" srun --mpi=pmix -n 2 "$BIN" preflight --out "$T/pf" --model "$T/huge"
check "preflight passes on 2 tasks with the demo model" srun --mpi=pmix -n 2 "$BIN" preflight --out "$T/pf" --model examples/demo/model
check "preflight left no file behind" test -z "$(ls -A "$T/pf")"

# --- the pipeline -------------------------------------------------------------------------
W=$T/work
export CRASH_CONFIG=$SRC/examples/demo/pipeline.ini CRASH_BIN=$BIN CRASH_WORK=$W CRASH_NTASKS=2 CRASH_THREADS=1
export CRASH_MODES=share CRASH_STEPS=30 CRASH_BATCH_SIZE=16 CRASH_NUM_EXAMPLES=64 CRASH_EVAL_EXAMPLES=100
bash slurm/pipeline.sh || { echo "FAILED: pipeline.sh"; exit 1; }
declare -A JOB
while read -r stage id; do JOB[$stage]=$id; done <"$W/logs/jobs.txt"
state() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }

# The signal path: once the training has logged a step, SIGUSR1 to its tasks (what
# --signal=USR1@T sends near the time limit).
train=${JOB[train-share]}
signalled=0
while [ $(($(date +%s) - START)) -lt 480 ]; do
  s=$(state "$train")
  if [ "$s" = RUNNING ] && [ -s "$W/share/train/train_log.jsonl" ]; then
    scancel --signal=USR1 "$train" && signalled=1
    echo "slurm test: sent SIGUSR1 to training job $train after $(wc -l <"$W/share/train/train_log.jsonl") logged steps"
    break
  fi
  case $s in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;; esac
  sleep 0.5
done
check "training signalled while it ran" test $signalled -eq 1

# Every job to its end.
ids=$(cut -d' ' -f2 "$W/logs/jobs.txt")
while [ $(($(date +%s) - START)) -lt 600 ]; do
  pending=0
  for id in $ids; do
    case $(state "$id") in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) ;; *) pending=1 ;; esac
  done
  [ $pending = 1 ] || break
  sleep 2
done
while read -r stage id; do
  info=$(scontrol show job "$id")
  check "$stage job $id completed with exit 0:0" bash -c 'grep -q "JobState=COMPLETED" <<<"$0" && grep -q " ExitCode=0:0" <<<"$0"' "$info"
  check "$stage log $W/logs/$stage-$id.out has the preflight" grep -q "preflight: .* ok" "$W/logs/$stage-$id.out"
  grep -q "JobState=COMPLETED" <<<"$info" || tail -20 "$W/logs/$stage-$id.out"
done <"$W/logs/jobs.txt"

for f in prepared/wordnet_train activations.h5 cka.h5 clusters.json share/emulator/crash_plan.json \
  share/train/model/config.json share/plugin/config.json eval/full.json eval/share-emulator-zero-shot.json \
  eval/share-emulator-fine-tuned.json eval/share-plugin.json crash_table.md report.html; do
  check "output $f" test -e "$W/$f"
done
check "no .partial or .tmp left" test -z "$(find "$W" -name '*.partial' -o -name '*.tmp')"

# The signalled training: stopped with a checkpoint, requeued, resumed, all steps done.
log=$W/logs/train-share-$train.out
check "training stopped by the signal with a checkpoint" grep -q "stopped by a signal after step" "$log"
check "train.sh requeued the job" grep -q "requeueing job $train" "$log"
check "the requeued run resumed" grep -q "resuming from" "$log"
check "the job restarted once" bash -c 'scontrol show job "$0" | grep -q "Restarts=1"' "$train"
check "train_log reaches step 30" python3 -c "
import json, sys
steps = [json.loads(l).get('step') for l in open(sys.argv[1]) if 'loss' in l]
sys.exit(0 if steps and steps[-1] == 30 else 1)" "$W/share/train/train_log.jsonl"
check "CRaSh table has the share row" grep -q "| share |" "$W/crash_table.md"

echo "slurm test: $failures failures in $(($(date +%s) - START)) s"
[ $failures -eq 0 ]
