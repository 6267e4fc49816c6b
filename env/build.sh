#!/usr/bin/env bash
# Installs the dependencies (setup.sh), configures and builds crash-hpc in build/:
#   env/build.sh            every target (the program, tests and benches)
#   env/build.sh TARGET...  only those targets (env/demo.sh builds crash-hpc alone)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/setup.sh"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Configured again after a configure that failed (a cache, but no build files).
if [ ! -f "$root/build/build.ninja" ] && [ ! -f "$root/build/Makefile" ]; then
  cmake -S "$root" -B "$root/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
fi
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$root/build" -j "$(nproc)" "${targets[@]}"
