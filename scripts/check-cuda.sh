#!/usr/bin/env bash
# The CUDA backend on a machine without a GPU (CI): builds `dinovmf --features nccl` (= cuda +
# NCCL loaded at run time) against the driver link stub (scripts/cuda-stub.sh), then, with the
# stub on LD_LIBRARY_PATH and scripts/nccl-stub.sh's stand-in libnccl as DINOVMF_NCCL_LIB:
#   - `dinovmf train --device cuda` and `verify-kernels` fail with a clear "no usable CUDA
#     device" message, never a panic (host/tests/cuda_stub.rs);
#   - every kernel of ptx/dinovmf.ptx passes `verify-kernels` on the host simulator, the kernels
#     at ViT-S/16 and ViT-B/16 shapes pass on their corner blocks (host/tests/gpu_sim_large.rs), and the
#     CUDA backend's training step (and the whole trainer) on the simulator matches the CPU
#     backend (host/tests/gpu_sim.rs), and its bf16 step is within the bf16 tolerance of the f32
#     step (host/tests/gpu_sim_bf16.rs);
#   - two NCCL ranks of the CUDA backend on the simulator with half the batch each train as one
#     rank with the whole batch (host/tests/nccl_sim.rs);
#   - the binary has no rpath/runpath (a GPU machine must load its real libcuda.so.1) and does
#     not link libnccl (it is opened at run time, only by data-parallel CUDA runs).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
eval "$(scripts/cuda-stub.sh)"
eval "$(scripts/nccl-stub.sh)"
export LD_LIBRARY_PATH="$CUDA_LIBRARY_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DINOVMF_CUDA_STUB=1
cargo test -p dinovmf --features nccl --test cuda_stub --test gpu_sim --test gpu_sim_bf16 \
    --test gpu_sim_large --test nccl_sim
bin="${CARGO_TARGET_DIR:-target}/debug/dinovmf"
if readelf -d "$bin" | grep -Ei 'rpath|runpath'; then
    echo "check-cuda: $bin carries an rpath/runpath; it must find libcuda.so.1 through the system" >&2
    exit 1
fi
readelf -d "$bin" | grep -q 'NEEDED.*libcuda.so.1' || {
    echo "check-cuda: $bin does not link libcuda.so.1 (was the cuda feature built?)" >&2
    exit 1
}
if readelf -d "$bin" | grep -q 'NEEDED.*libnccl'; then
    echo "check-cuda: $bin links libnccl; it must open it at run time" >&2
    exit 1
fi
echo "check-cuda: cuda build links libcuda.so.1 (no rpath), errors cleanly without a GPU; kernels and step pass on the simulator"
