#!/bin/bash
#SBATCH --job-name=crash-emulate
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
# The emulator of every mode (uniform, remove, share): $WORK/<mode>/emulator.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
preflight "$WORK"
for mode in $(cfg modes uniform,remove,share | tr ',' ' '); do
  out=$WORK/$mode/emulator
  if [ -e "$out" ]; then echo "crash-hpc slurm: $out exists, skipped"; continue; fi
  mkdir -p "$WORK/$mode"
  crash_srun emulate --model "$MODEL" --mode "$mode" --clusters "$WORK/clusters.json" --adapters "$(cfg adapters 2,2)" \
    --out "$out" || exit $?
done
