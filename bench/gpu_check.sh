#!/usr/bin/env bash
# The GPU check on a one-GPU machine, in one command (the steps: bench/gpu_check.py):
#   bash bench/gpu_check.sh [gpu_check.py options]        (.gpu-kit carried; bench/gpu_kit.sh made it)
# Unpacks the kit (crash-hpc and comm_test built against this machine's LibTorch, and the Debian
# libraries they load) into a scratch folder, points the crash-hpc processes (not Python's) at
# them and at the torch wheel's libraries, checks that every library resolves, and runs the check.
# Results under $OUT (the device tool's folder) or /tmp/crash-gpu-check/out: gpu_check.json,
# gpu_check.md, gpu_check.log. Here, without a GPU, `--cpu` runs the same steps on the CPU:
#   PYTHON=../venv/bin/python CRASH_KIT_TORCH_PYTHON=../venv-gpu/bin/python bash bench/gpu_check.sh --cpu
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kit=${CRASH_GPU_KIT:-$root/.gpu-kit}
scratch=${CRASH_GPU_SCRATCH:-/tmp/crash-gpu-check}
out=${OUT:-$scratch/out}
python=${PYTHON:-python3}                         # the reference side: torch, transformers, h5py
torch_python=${CRASH_KIT_TORCH_PYTHON:-$python}   # the torch whose LibTorch the kit was built against
if [ ! -f "$kit/kit.tar.xz" ]; then
  echo "gpu_check.sh: no kit in $kit (run bench/gpu_kit.sh on the build machine, and carry .gpu-kit)" >&2
  exit 2
fi
k=$scratch/kit
rm -rf "$k"
mkdir -p "$k" "$out"
tar -xJf "$kit/kit.tar.xz" -C "$k"
want=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["torch"])' "$k/kit.json")
have=$("$torch_python" -c 'import torch; print(torch.__version__)')
if [ "$want" != "$have" ]; then
  echo "gpu_check.sh: the kit was built against torch $want; this machine has $have." >&2
  echo "  Run bench/gpu_kit.sh --torch ${have%%+*} on the build machine, then carry the new .gpu-kit." >&2
  exit 2
fi
torch_lib=$("$torch_python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nvidia=$("$torch_python" -c 'import glob, os, torch
print(":".join(sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "lib")))))')
ld="$k/usr/lib/x86_64-linux-gnu:$k/lib/x86_64-linux-gnu:$k/usr/lib/x86_64-linux-gnu/pmix2/lib:$torch_lib:$nvidia"
# OpenMPI finds its components and its daemon under OPAL_PREFIX. The jobs run under the kit's
# mpirun with one rank, so their process groups are NCCL communicators as on a cluster (a process
# started without a launcher gets local, single-process groups).
export OPAL_PREFIX=$k/usr OMPI_MCA_btl=self,vader PYTHONUNBUFFERED=1
launcher="$k/usr/bin/orterun --allow-run-as-root --bind-to none -np 1"
missing=$(LD_LIBRARY_PATH=$ld ldd "$k/bin/crash-hpc" "$k/bin/comm_test" "$k/usr/bin/orterun" "$k/usr/bin/orted" |
  grep "not found" | sort -u || true)
if [ -n "$missing" ]; then
  echo "gpu_check.sh: libraries not found (add their Debian packages to bench/gpu_kit.sh):" >&2
  echo "$missing" >&2
  exit 2
fi
{
  echo "kit: $(tr -d '\n' <"$k/kit.json" | head -c 300)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  fi
} | tee "$out/machine.txt"
"$python" "$root/bench/gpu_check.py" --bin "$k/bin" --ld-path "$ld" --launcher "$launcher" --out "$out" \
  --work "$scratch/work" "$@" 2>&1 |
  tee "$out/gpu_check.log"
