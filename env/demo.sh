#!/usr/bin/env bash
# Sets up, builds and runs the main job on the demo model; results go to demo-out/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/build.sh"
out="$root/demo-out"
mkdir -p "$out"
"$root/build/crash-hpc" forward --config "$root/examples/demo-forward.ini" \
  --model "$root/tests/fixtures/models/opt_preln" --input "$root/examples/demo-tokens.jsonl" \
  --out "$out/forward.h5" --overwrite
echo "demo: logits and hidden states in $out/forward.h5 (h5py: f['logits'], f['hidden_states/0'], ...)"
