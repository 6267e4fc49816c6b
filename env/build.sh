#!/usr/bin/env bash
# Installs the dependencies (setup.sh), configures and builds crash-hpc in build/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/setup.sh"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Configured again after a configure that failed (a cache, but no build files).
if [ ! -f "$root/build/build.ninja" ] && [ ! -f "$root/build/Makefile" ]; then
  cmake -S "$root" -B "$root/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$root/build" -j "$(nproc)"
