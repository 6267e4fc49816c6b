#!/usr/bin/env bash
# Installs every system dependency of crash-hpc from Debian 12 packages.
# Non-interactive and idempotent: packages already present are left alone.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp libgoogle-perftools-dev libtcmalloc-minimal4 libdnnl-dev
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libboost-program-options-dev
  nlohmann-json3-dev
  libspdlog-dev libfmt-dev
  libpcre2-dev libicu-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-numpy python3-h5py python3-matplotlib python3-pil
  chromium fonts-dejavu-core fonts-liberation
  hyperfine
  slurm-wlm munge
  clang libclang-rt-14-dev clang-format
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Torch must use the OpenMP OpenBLAS: the pthread or reference BLAS is about ten times slower.
if command -v update-alternatives >/dev/null; then
  lib=$(update-alternatives --list libblas.so.3-x86_64-linux-gnu 2>/dev/null | grep openblas-openmp || true)
  [ -z "$lib" ] || ${SUDO:-} update-alternatives --quiet --set libblas.so.3-x86_64-linux-gnu "$lib" || true
fi
