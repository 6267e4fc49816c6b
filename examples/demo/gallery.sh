#!/usr/bin/env bash
# The README's gallery (docs/gallery/*.png) from a finished demo pipeline (bash env/demo.sh):
# CKA with clusters and the cluster segments (from the pipeline), the logit lens of the demo
# model, and loss landscapes between the full model and the plugged-in models.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$root/demo-out}
bin=$root/build/crash-hpc
out=$root/docs/gallery
mkdir -p "$out"
data=$work/prepared/wordnet_valid
"$bin" lens --model "$root/examples/demo/model" --data "$data" --out "$work/lens.h5" --num-examples 128 --plot --overwrite
# theta(alpha) = (1 - alpha) theta_full + alpha theta_plugin, and the plane through the full
# model and the uniform and share plug-ins.
"$bin" landscape --model "$root/examples/demo/model" --model-b "$work/share/plugin" --data "$data" \
  --out "$work/landscape_line.h5" --points 21 --num-examples 128 --plot --overwrite
"$bin" landscape --model "$root/examples/demo/model" --model-b "$work/uniform/plugin" --model-c "$work/share/plugin" \
  --data "$data" --out "$work/landscape_plane.h5" --grid 15 --range -1:2 --num-examples 64 --plot --overwrite
cp "$work/cka.png" "$out/cka.png"
cp "$work/clusters.png" "$out/clusters.png"
cp "$work/lens.png" "$out/lens.png"
cp "$work/landscape_line.png" "$out/landscape_line.png"
cp "$work/landscape_plane.png" "$out/landscape_plane.png"
echo "gallery: $(ls "$out")"
