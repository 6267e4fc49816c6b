#!/usr/bin/env bash
# Sets up, builds and runs the main job: the CRaSh pipeline on the demo model (examples/demo/),
# printing the CRaSh table; every stage's output and the plots go to demo-out/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/build.sh" crash-hpc  # the program only: not the tests and benches
cd "$root"
start=$(date +%s)
build/crash-hpc pipeline --config examples/demo/pipeline.ini --work demo-out --plot "$@"
echo "demo: the pipeline took $(($(date +%s) - start)) s; the report is demo-out/report.html (CRaSh table also in demo-out/crash_table.md)"
