#!/bin/bash
#SBATCH --job-name=crash-collect
#SBATCH --time=04:00:00
# Every layer's hidden states on num-examples examples into $WORK/activations.h5 (resumes a .partial).
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
out=$WORK/activations.h5
skip_if_done "$out"
preflight "$WORK" "$MODEL"
task=$(cfg collect-task "$(cfg train-task)")
args=(--model "$MODEL" --data "$(prepared "$task")" --out "$out" --num-examples "$(cfg num-examples 512)"
      --pooling "$(cfg pooling mean)" --dtype "$DTYPE" $(grid_args))
[ ! -e "$out.partial" ] || args+=(--resume)
crash_srun collect "${args[@]}"
