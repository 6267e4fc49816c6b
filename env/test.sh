#!/usr/bin/env bash
# Sets up, builds and runs every test (ctest labels: unit, cli, mpi, e2e).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/build.sh"
cd "$root/build"
ctest --output-on-failure -j "$(nproc)" "$@"
