#!/bin/bash
#SBATCH --job-name=crash-decompose
#SBATCH --time=04:00:00
# SFSD: the model with each decoder Linear factored, $WORK/sfsd (calibration on collect-task,
# or train-task; keep ratio CRASH_SFSD_RATIO, default 0.5).
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
out=$WORK/sfsd
skip_if_done "$out"
preflight "$WORK" "$MODEL"
task=$(cfg collect-task "$(cfg train-task)")
args=(--model "$MODEL" --data "$(prepared "$task")" --out "$out" --num-examples "$(cfg num-examples 512)"
      --ratio "${CRASH_SFSD_RATIO:-0.5}" --dtype "$DTYPE" $(grid_args))
while read -r t; do [ -z "$t" ] || args+=(--eval-data "$(prepared "$t")"); done < <(cfg_list eval-task)
crash_srun decompose "${args[@]}"
