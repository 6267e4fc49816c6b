#!/usr/bin/env bash
# Sets up, builds and runs the main job: the CRaSh pipeline on the demo model (examples/demo/),
# printing the CRaSh table; every stage's output and the plots go to demo-out/.
#   bash env/demo.sh [--study] [pipeline options...]
# --study runs the layer-pruning study instead (examples/demo/pruning_study.ini): every baseline
# at 25% and 50% of the layers removed, before and after healing; its outputs go to demo-study/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/build.sh" crash-hpc  # the program only: not the tests and benches
cd "$root"
config=examples/demo/pipeline.ini work=demo-out table=crash_table.md
if [ "${1:-}" = "--study" ]; then
  shift
  config=examples/demo/pruning_study.ini work=demo-study table=pruning_study.md
fi
start=$(date +%s)
build/crash-hpc pipeline --config "$config" --work "$work" --plot "$@"
echo "demo: the pipeline took $(($(date +%s) - start)) s; outputs in $work/ (the table also in $work/$table)"
