#!/usr/bin/env bash
# The CUDA backend on a machine without a GPU (CI): builds `dinovmf --features cuda` against the
# driver link stub (scripts/cuda-stub.sh), then, with the stub on LD_LIBRARY_PATH:
#   - `dinovmf train --device cuda` and `verify-kernels` fail with a clear "no usable CUDA
#     device" message, never a panic (host/tests/cuda_stub.rs);
#   - every kernel of ptx/dinovmf.ptx passes `verify-kernels` on the host simulator, the kernels
#     at ViT-S/16 and ViT-B/16 shapes pass on their corner blocks (host/tests/gpu_sim_large.rs), and the
#     CUDA backend's training step (and the whole trainer) on the simulator matches the CPU
#     backend (host/tests/gpu_sim.rs), and its bf16 step is within the bf16 tolerance of the f32
#     step (host/tests/gpu_sim_bf16.rs);
#   - the binary has no rpath/runpath (a GPU machine must load its real libcuda.so.1).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
eval "$(scripts/cuda-stub.sh)"
export LD_LIBRARY_PATH="$CUDA_LIBRARY_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DINOVMF_CUDA_STUB=1
cargo test -p dinovmf --features cuda --test cuda_stub --test gpu_sim --test gpu_sim_bf16 --test gpu_sim_large
bin="${CARGO_TARGET_DIR:-target}/debug/dinovmf"
if readelf -d "$bin" | grep -Ei 'rpath|runpath'; then
    echo "check-cuda: $bin carries an rpath/runpath; it must find libcuda.so.1 through the system" >&2
    exit 1
fi
readelf -d "$bin" | grep -q 'NEEDED.*libcuda.so.1' || {
    echo "check-cuda: $bin does not link libcuda.so.1 (was the cuda feature built?)" >&2
    exit 1
}
echo "check-cuda: cuda build links libcuda.so.1 (no rpath), errors cleanly without a GPU; kernels and step pass on the simulator"
