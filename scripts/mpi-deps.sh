#!/usr/bin/env bash
# Installs what `--features mpi` needs on Debian/Ubuntu: Open MPI (library, headers, mpicc,
# mpirun) and libclang (the mpi crate's bindgen reads mpi.h). Does nothing when they are
# already there. Needs root (CI runs as root) or sudo.
set -euo pipefail
need=()
command -v mpicc >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -eq 0 ]; then
    echo "mpi-deps: Open MPI and libclang already installed"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${need[@]}" >/dev/null
echo "mpi-deps: installed ${need[*]}"
