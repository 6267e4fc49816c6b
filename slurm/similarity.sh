#!/bin/bash
#SBATCH --job-name=crash-similarity
#SBATCH --time=01:00:00
# Linear CKA between every pair of layers: $WORK/cka.h5.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
out=$WORK/cka.h5
skip_if_done "$out"
preflight "$WORK"
args=(--archive "$WORK/activations.h5" --out "$out")
[ -z "$(cfg plot)" ] || args+=(--plot)
crash_srun similarity "${args[@]}"
