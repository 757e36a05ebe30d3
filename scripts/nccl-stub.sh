#!/usr/bin/env bash
# Builds the NCCL stand-in for CI, .toolchain/nccl-stub/libnccl.so.2, from scripts/nccl-stub.c
# (gcc): the NCCL calls of `--features nccl` for ranks on the CUDA backend's host simulator
# (threads of one process or processes of one mpirun, through POSIX shared memory). Prints the
# environment to use:
#   eval "$(scripts/nccl-stub.sh)"   -> DINOVMF_NCCL_LIB=<the stub>
# Never put it on a GPU machine: it reads "device" pointers as host memory.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src="$top/scripts/nccl-stub.c"
dest="$top/.toolchain/nccl-stub"
lib="$dest/libnccl.so.2"
if [ ! -f "$lib" ] || [ "$src" -nt "$lib" ]; then
    mkdir -p "$dest"
    gcc -std=c11 -Wall -Wextra -Werror -O2 -shared -fPIC -Wl,-soname,libnccl.so.2 \
        -o "$lib" "$src" -lrt
    echo "nccl-stub: built $lib" >&2
fi
echo "export DINOVMF_NCCL_LIB=$lib"
