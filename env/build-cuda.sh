#!/usr/bin/env bash
# The GPU build: crash-hpc against the CUDA LibTorch of PyPI's torch wheel, in build-cuda/.
#   env/build-cuda.sh [VENV]     (default VENV: $CRASH_CUDA_VENV, else ../venv-cuda beside the repository)
#   CRASH_CUDA_BUILD=DIR   the build folder (default build-cuda/)
#   CRASH_CUDA_TARGETS="a b"   build these targets alone and skip the unit run (bench/gpu_kit.sh does)
# The virtual environment lives outside the repository (the wheel brings several GB of CUDA
# libraries). When VENV has no torch, the script makes it and installs torch from PyPI (the one
# step that needs the network). Configures with torch.utils.cmake_prefix_path, builds every target
# (the NCCL communicator and the .cuda() paths compile wherever the CUDA toolkit is), then runs the
# unit tests on the CPU: a machine without a GPU must pass them with this LibTorch too.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${CRASH_CUDA_VENV:-$root/../venv-cuda}}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch
fi
prefix=$("$venv/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
torch_lib=$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
echo "build-cuda: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
build=${CRASH_CUDA_BUILD:-$root/build-cuda}
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
if [ -n "${CRASH_CUDA_TARGETS:-}" ]; then
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$(nproc)" --target $CRASH_CUDA_TARGETS
  exit 0
fi
cmake --build "$build" -j "$(nproc)"
# The wheel's CUDA libraries sit in the venv's nvidia/ packages; torch's RPATH finds them.
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ctest --test-dir "$build" -L unit --output-on-failure -j "$(nproc)"
