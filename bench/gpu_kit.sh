#!/usr/bin/env bash
# Prepares, on this machine, what the GPU check (bench/gpu_check.sh) brings to a one-GPU machine
# that has PyPI's torch with CUDA but no MPI, HDF5, Boost or spdlog, and no network:
#   bench/gpu_kit.sh [--torch VERSION] [--venv DIR]
# - crash-hpc and comm_test built in build-gpu/ (env/build-cuda.sh) against the LibTorch of the
#   torch wheel that machine has (VERSION, default 2.11.0: the GPU machines' torch 2.11.0+cu130);
#   a binary runs only with the LibTorch it was built against, so the check refuses another;
# - the Debian packages of every library they load beyond glibc, libstdc++ and LibTorch (OpenMPI
#   with its components and its launcher, parallel HDF5, Boost.Program_options, spdlog, ICU, ...),
#   downloaded by name and unpacked with dpkg -x;
# packed as .gpu-kit/kit.tar.xz (git-ignored) with kit.json (versions, commit, packages). The
# device call carries .gpu-kit, which must fit beside the working tree in 64 MiB: hence one xz
# archive of the unpacked files the programs need rather than the .deb files themselves.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
torch_version=2.11.0
venv=${CRASH_GPU_VENV:-$root/../venv-gpu}
while [ $# -gt 0 ]; do
  case $1 in
    --torch) torch_version=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    *) echo "gpu_kit.sh: unknown option $1 (expected --torch VERSION, --venv DIR)" >&2; exit 2 ;;
  esac
done
# Every library crash-hpc and comm_test load (ldd, with OpenMPI's components), by Debian package.
packages=(libaec0 libatomic1 libboost-program-options1.74.0 libbrotli1 libcurl4 libevent-core-2.1-7
  libevent-pthreads-2.1-7 libfabric1 libffi8 libfmt9 libgmp10 libgnutls30 libgssapi-krb5-2
  libhdf5-openmpi-103-1 libhogweed6 libhwloc15 libibverbs1 ibverbs-providers libicu72 libidn2-0
  libcom-err2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 libldap-2.5-0 libmunge2 libnettle8 libnghttp2-14 libnl-3-200
  libnl-route-3-200 libnuma1 libopenmpi3 openmpi-bin openmpi-common libp11-kit0 libpcre2-8-0 libpmix2
  libpsm-infinipath1 libpsm2-2 libpsl5 librdmacm1 librtmp1 libsasl2-2 libspdlog1.10 libssh2-1 libssl3
  libsz2 libtasn1-6 libtcmalloc-minimal4 libucx0 libudev1 libunistring2 libuuid1 libzstd1)

if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "${have%%+*}" != "$torch_version" ]; then
  "$venv/bin/pip" install --quiet "torch==$torch_version"
  have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
fi
echo "gpu_kit: torch $have in $venv"
CRASH_CUDA_BUILD=$root/build-gpu CRASH_CUDA_TARGETS="crash-hpc comm_test" bash "$root/env/build-cuda.sh" "$venv"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/debs" "$stage/root/bin"
(cd "$stage/debs" && apt-get download "${packages[@]}" >/dev/null 2>&1) ||
  { echo "gpu_kit.sh: apt-get download failed (run apt-get update first)" >&2; exit 1; }
for deb in "$stage"/debs/*.deb; do dpkg -x "$deb" "$stage/root"; done
# What no program of the kit loads: documentation, Fortran/Java/OpenSHMEM bindings, unused ICU
# parts, every program but OpenMPI's launcher (orterun), its daemon (orted) and ompi_info.
r=$stage/root
rm -rf "$r/usr/share/doc" "$r/usr/share/man" "$r/usr/share/lintian" "$r/usr/share/locale" "$r/usr/sbin"
find "$r/usr/bin" -mindepth 1 -not -name orterun -not -name orted -not -name ompi_info -delete
rm -f "$r"/usr/lib/x86_64-linux-gnu/libmpi_{java,mpifh,usempi,usempif08}* "$r"/usr/lib/x86_64-linux-gnu/liboshmem*
rm -f "$r"/usr/lib/x86_64-linux-gnu/libicu{i18n,io,test,tu}*
for p in crash-hpc tests/comm_test; do
  cp "$root/build-gpu/$p" "$r/bin/"
  strip --strip-unneeded "$r/bin/$(basename "$p")"
done
torch_lib=$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nvidia=$("$venv/bin/python" -c 'import glob, os, torch; print(":".join(glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "lib"))))')
ld="$r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu:$r/usr/lib/x86_64-linux-gnu/pmix2/lib:$torch_lib:$nvidia"
# Every library must resolve inside the kit, LibTorch and the wheel's CUDA; system ones that a
# bare machine may lack are reported (glibc, libstdc++, libgcc and zlib are on every machine).
missing=$(LD_LIBRARY_PATH=$ld ldd "$r/bin/crash-hpc" "$r/bin/comm_test" "$r/usr/bin/orterun" "$r/usr/bin/orted" | awk '/=> \// {print $3}' | sort -u |
  grep -v -e "^$r" -e "^$torch_lib" -e "/nvidia/" -e "/libc\.so" -e "/libm\.so" -e "/libstdc++" -e "/libgcc_s" \
    -e "/libpthread" -e "/libdl\.so" -e "/librt\.so" -e "/libutil" -e "/libz\.so" -e "/libresolv" -e "/ld-linux" || true)
if [ -n "$missing" ]; then
  echo "gpu_kit.sh: these libraries come from this machine, not the kit; add their packages:" >&2
  echo "$missing" >&2
  exit 1
fi
commit=$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- . ':!.gitignore' || echo "+changes")
python3 - "$r/kit.json" "$have" "$commit" "$stage/debs" <<'EOF'
import json, os, subprocess, sys, time
out, torch, commit, debs = sys.argv[1:]
pkgs = [subprocess.run(["dpkg-deb", "-f", os.path.join(debs, d), "Package", "Version"], capture_output=True,
                       text=True).stdout.replace("\n", " ").strip() for d in sorted(os.listdir(debs))]
json.dump({"torch": torch, "commit": commit, "made": time.strftime("%Y-%m-%d %H:%M"), "debian_packages": pkgs},
          open(out, "w"), indent=1)
EOF
mkdir -p "$root/.gpu-kit"
tar -cJf "$root/.gpu-kit/kit.tar.xz" -C "$r" .
kit_bytes=$(stat -c %s "$root/.gpu-kit/kit.tar.xz")
tree_bytes=$(cd "$root" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null |
  awk '{s += $1} END {print s}')
echo "gpu_kit: .gpu-kit/kit.tar.xz $((kit_bytes / 1048576)) MiB (torch $have, commit $commit); working tree" \
  "$((tree_bytes / 1048576)) MiB; together $(((kit_bytes + tree_bytes) / 1048576)) of the 64 MiB a device call carries"
if [ $((kit_bytes + tree_bytes)) -gt $((64 * 1048576)) ]; then
  echo "gpu_kit.sh: the kit and the working tree exceed 64 MiB" >&2
  exit 1
fi
