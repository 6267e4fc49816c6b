#!/bin/bash
#SBATCH --job-name=crash-emulate
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
# The emulator of every mode (uniform, remove, share): $WORK/<mode>/emulator.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
preflight "$WORK"
emulator() {  # MODE OUT
  mkdir -p "$WORK/$1"
  crash_srun emulate --model "$MODEL" --mode "$1" --clusters "$WORK/clusters.json" --adapters "$(cfg adapters 2,2)" \
    --out "$2"
}
for_each_mode emulator emulator
