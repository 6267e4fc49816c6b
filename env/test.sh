#!/usr/bin/env bash
# Sets up, builds and runs every test (ctest labels: unit, cli, mpi, e2e, slurm, faults), then
# the fuzz targets (build-fuzz) and the unit tests under ASan and UBSan (build-asan).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/env/format.sh" --check
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
ctest --test-dir "$root/build-fuzz" --output-on-failure -j "$jobs"

# ---- faults: the unit tests under AddressSanitizer and UndefinedBehaviorSanitizer ----
# build-asan (cmake/sanitize.cmake): every library at -O1 with both sanitizers; unit_tests and
# crash-hpc built, the `unit` label run (gtest, and the single-process cli tests of bad and
# hostile input, HF and lm-eval references). LeakSanitizer is on; env/lsan.supp may name
# one-time allocations of OpenMPI or LibTorch by function, never a whole library.
# A unity build: a cold sanitizer build took about 12 minutes on 2 cores, 6 as a unity build.
if [ ! -f "$root/build-asan/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$root/build-asan" "${generator[@]}" -DCMAKE_BUILD_TYPE=Debug -DCRASH_SANITIZE=ON \
    -DCMAKE_UNITY_BUILD=ON
fi
# Set for the build too: test discovery runs unit_tests.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1
export LSAN_OPTIONS=suppressions=$root/env/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cmake --build "$root/build-asan" -j "$jobs" --target unit_tests crash-hpc
ctest --test-dir "$root/build-asan" -L unit --output-on-failure -j "$(nproc)"
