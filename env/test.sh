#!/usr/bin/env bash
# Sets up, builds and runs every test (ctest labels: unit, cli, mpi, e2e, faults).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/build.sh"
cd "$root/build"
ctest --output-on-failure -j "$(nproc)" "$@"

# ---- faults: fuzzing of the parsers (libFuzzer, clang), in its own build folder ----
# build-fuzz: one target per parser of hostile input, 30 s each under ctest (faults.fuzz_*),
# failing on any crash or sanitizer report; fuzz/CMakeLists.txt says what each compiles.
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
jobs=$(nproc)
[ "$jobs" -gt 2 ] && jobs=2
if [ ! -f "$root/build-fuzz/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S "$root/fuzz" -B "$root/build-fuzz" "${generator[@]}"
fi
cmake --build "$root/build-fuzz" -j "$jobs"
ctest --test-dir "$root/build-fuzz" --output-on-failure
