#!/usr/bin/env bash
# Runs the comparison benches of bench/README.md one after another with the settings of its
# table, printing each one's wall time, and keeps the whole output in a log.
#   PYTHON=~/venv/bin/python bash bench/run_all.sh           # the figures (about 12 minutes, 2 cores)
#   PYTHON=~/venv/bin/python bash bench/run_all.sh --smoke   # tiny sizes: each bench runs end to end
# PYTHON: a Python with torch, transformers, numpy and h5py (PyPI; never a venv inside the checkout).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
dir=${BENCH_DIR:-/tmp/crash-bench}
mkdir -p "$dir"
suffix=""
[ "${1:-}" != --smoke ] || suffix=-smoke
log=${LOG:-$dir/run_all$suffix.log}
cd "$root"
cmake --build build -j2 --target crash-hpc bench_forward bench_archive bench_gemm crash-hpc-glibc bench_forward_glibc \
  bench_gemm_glibc >/dev/null

run() {
  echo "== $*"
  local start=$SECONDS
  "$@"
  echo "== $((SECONDS - start)) s"
  echo
}

{
  echo "== $(date -u '+%F %T UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (modified)'), $(nproc) CPUs"
  start=$SECONDS
  if [ "${1:-}" = --smoke ]; then
    run "$py" bench/collect.py --dir "$dir" --examples 16 --batch 8 --seq 32 --repeats 1 --gemm-repeats 1
    run "$py" bench/forward.py --dir "$dir" --batch 2 --seq 32 --iters 2 --gemm-repeats 1
    run "$py" bench/train.py --dir "$dir" --batch 2 --seq 32 --steps 3 --gemm-repeats 1 --allocators tcmalloc,glibc
    run "$py" bench/decompose.py --dir "$dir" --examples 4 --seq 32 --batch 2 --gemm-repeats 1
    run "$py" bench/archive.py --dir "$dir" --examples 256 --layers 8 --width 1024 --repeats 1
  else
    run "$py" bench/collect.py --dir "$dir"
    run "$py" bench/forward.py --dir "$dir"
    run "$py" bench/train.py --dir "$dir" --allocators tcmalloc,glibc
    run "$py" bench/decompose.py --dir "$dir"
    run "$py" bench/archive.py --dir "$dir"
  fi
  echo "== all: $((SECONDS - start)) s"
} 2>&1 | tee "$log"
echo "log: $log"
