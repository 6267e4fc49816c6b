#!/bin/bash
#SBATCH --job-name=crash-plugin
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
# The full model with each mode's tuned adapters plugged back in: $WORK/<mode>/plugin.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
preflight "$WORK"
for mode in $(cfg modes uniform,remove,share | tr ',' ' '); do
  out=$WORK/$mode/plugin
  if [ -e "$out" ]; then echo "crash-hpc slurm: $out exists, skipped"; continue; fi
  crash_srun plugin --model "$MODEL" --emulator "$WORK/$mode/train/model" --out "$out" || exit $?
done
