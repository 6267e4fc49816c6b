#!/bin/bash
#SBATCH --job-name=crash-eval
#SBATCH --time=04:00:00
# Every setting on every eval-task ($WORK/eval/<setting>.json), then the CRaSh table
# ($WORK/crash_table.md, by the pipeline job, which finds every stage done) and the run report
# ($WORK/report.html).
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
require eval-task
preflight "$WORK/eval" "$MODEL"
data=()
while read -r t; do data+=(--data "$(prepared "$t")"); done < <(cfg_list eval-task)
evaluate() {  # MODEL_DIR SETTING
  local out=$WORK/eval/$2.json
  if [ -e "$out" ]; then echo "crash-hpc slurm: $out exists, skipped"; return; fi
  crash_srun eval --model "$1" --out "$out" --details "$WORK/eval/$2.details.jsonl" --overwrite --batch-size "$(cfg eval-batch-size 16)" \
    --num-examples "$(cfg eval-examples -1)" --dtype "$DTYPE" "${data[@]}" $(grid_args) || exit $?
}
modes=$(cfg modes uniform,remove,share | tr ',' ' ')
evaluate "$MODEL" full
for mode in $modes; do
  evaluate "$WORK/$mode/emulator" "$mode-emulator-zero-shot"
  evaluate "$WORK/$mode/train/model" "$mode-emulator-fine-tuned"
  evaluate "$WORK/$mode/plugin" "$mode-plugin"
done
# The table: the pipeline job skips every stage whose output exists, which here is all of them.
args=(--model "$MODEL" --work "$WORK" --modes "$(cfg modes uniform,remove,share)" --train-task "$(cfg train-task)"
  --report)
while read -r t; do args+=(--eval-task "$t"); done < <(cfg_list eval-task)
[ -z "$(cfg valid-task)" ] || args+=(--valid-task "$(cfg valid-task)")
[ -z "$(cfg collect-task)" ] || args+=(--collect-task "$(cfg collect-task)")
srun --ntasks=1 --mpi="$CRASH_MPI" "$CRASH_BIN" pipeline "${args[@]}" $(common_args) </dev/null
