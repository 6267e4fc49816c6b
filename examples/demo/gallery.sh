#!/usr/bin/env bash
# The README's gallery (docs/gallery/*.png) from a finished demo pipeline (bash env/demo.sh):
# CKA with clusters and the cluster segments (from the pipeline), the logit lens of the demo
# model, loss landscapes between the full model and the plugged-in models, and the top of the
# run report (report.png).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$root/demo-out}
bin=$root/build/crash-hpc
out=$root/docs/gallery
mkdir -p "$out"
data=$work/prepared/wordnet_valid
"$bin" lens --model "$root/examples/demo/model" --data "$data" --out "$work/gallery_lens.h5" --num-examples 128 --plot --overwrite
# theta(alpha) = (1 - alpha) theta_full + alpha theta_plugin, and the plane through the full
# model and the uniform and share plug-ins.
"$bin" landscape --model "$root/examples/demo/model" --model-b "$work/share/plugin" --data "$data" \
  --out "$work/landscape_line.h5" --points 21 --num-examples 128 --plot --overwrite
"$bin" landscape --model "$root/examples/demo/model" --model-b "$work/uniform/plugin" --model-c "$work/share/plugin" \
  --data "$data" --out "$work/landscape_plane.h5" --grid 15 --range -1:2 --num-examples 64 --plot --overwrite
cp "$work/cka.png" "$out/cka.png"
cp "$work/clusters.png" "$out/clusters.png"
cp "$work/gallery_lens.png" "$out/lens.png"
cp "$work/landscape_line.png" "$out/landscape_line.png"
cp "$work/landscape_plane.png" "$out/landscape_plane.png"
# The run report (pipeline --report) in headless Chromium: checked, and its screenshot kept.
/usr/bin/python3 "$root/tests/e2e/report_in_browser.py" "$bin" "$work" "$work/report-full.png"
/usr/bin/python3 - "$work/report-full.png" "$out/report.png" <<'PY'
import sys
from PIL import Image
# The top of the page (summary, CRaSh table, first figures), at 1280 px: what a reader sees first.
page = Image.open(sys.argv[1])
page.crop((0, 0, page.width, min(page.height, 1900))).save(sys.argv[2], optimize=True)
PY
echo "gallery: $(ls "$out")"
