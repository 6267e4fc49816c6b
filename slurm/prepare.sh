#!/bin/bash
#SBATCH --job-name=crash-prepare
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
# Tokenizes every task of the pipeline once into $WORK/prepared/<task>.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
require model
require train-task
# Windows of text the model can take (prepare's default, 512, may exceed its positions).
window=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(min(512, c.get('max_position_embeddings', c.get('n_positions', 512))))" "$MODEL/config.json") ||
  die "$MODEL/config.json: cannot read max_position_embeddings"
preflight "$WORK/prepared"
{ cfg_list train-task; cfg_list collect-task; cfg_list valid-task; cfg_list eval-task; } | sort -u | while read -r task; do
  [ -n "$task" ] || continue
  out=$(prepared "$task")
  if [ -e "$out" ]; then echo "crash-hpc slurm: $out exists, skipped"; continue; fi
  crash_srun prepare --task "$task" --tokenizer "$MODEL" --out "$out" --window "$window" || exit $?
done
