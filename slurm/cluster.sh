#!/bin/bash
#SBATCH --job-name=crash-cluster
#SBATCH --ntasks=1
#SBATCH --time=00:30:00
# The middle layers (between the adapters) in k contiguous clusters: $WORK/clusters.json.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
out=$WORK/clusters.json
skip_if_done "$out"
preflight "$WORK"
adapters=$(cfg adapters 2,2)
layers=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$MODEL/config.json") ||
  die "$MODEL/config.json: cannot read num_hidden_layers"
args=(--cka "$WORK/cka.h5" --k "$(cfg k 4)" --method "$(cfg cluster-method adjacent)"
      --layers "${adapters%,*}:$((layers - ${adapters#*,}))" --out "$out")
[ -z "$(cfg plot)" ] || args+=(--plot)
crash_srun cluster "${args[@]}"
