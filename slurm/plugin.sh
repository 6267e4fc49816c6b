#!/bin/bash
#SBATCH --job-name=crash-plugin
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
# The full model with each mode's tuned adapters plugged back in: $WORK/<mode>/plugin.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
preflight "$WORK"
plugin_model() { crash_srun plugin --model "$MODEL" --emulator "$WORK/$1/train/model" --out "$2"; }  # MODE OUT
for_each_mode plugin plugin_model
