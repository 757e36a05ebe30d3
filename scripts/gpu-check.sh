#!/usr/bin/env bash
# Prepares the GPU check for a session that has a GPU machine (H100/H200, driver 580, no Rust,
# no network there): builds the release `dinovmf --features cuda` HERE (linked against the
# driver stub of scripts/cuda-stub.sh; the PTX is embedded in the binary), strips it, and puts
# it in target/gpu-check/ (ignored by git; carry that folder to the GPU machine).
#
#   scripts/gpu-check.sh            build target/gpu-check/dinovmf and print the remote command
#
# The remote command (run from the repository root on the GPU machine, with carry
# ["target/gpu-check"]; the real driver's libcuda.so.1 is found by the loader, the stub is
# never shipped and the binary has no rpath):
#
#   cd target/gpu-check && nvidia-smi -L && ./dinovmf verify-kernels \
#     && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 5 \
#     && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 3 --preset small32 --loss dino \
#     && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 3 --method ibot --loss vmf \
#     && ./dinovmf train --device cuda --preset tiny --out "$OUT/tiny" -q \
#     && ./dinovmf train --device cuda --preset small32 --max-steps 200 --no-eval --out "$OUT/small32" -q
#
# verify-kernels prints one row per kernel and size (max abs / rel error against dinovmf-core,
# tolerance, ok) and exits non-zero on any mismatch; --compare-cpu prints the device's and the
# CPU's losses side by side (and gradients / state differences) and fails beyond rel 1e-3.
# compute-sanitizer (present there) can wrap any of these: compute-sanitizer ./dinovmf verify-kernels
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
eval "$(scripts/cuda-stub.sh)"
cargo build --release -p dinovmf --features cuda --bin dinovmf
out="$top/target/gpu-check"
mkdir -p "$out"
cp target/release/dinovmf "$out/dinovmf"
strip "$out/dinovmf"
if readelf -d "$out/dinovmf" | grep -Ei 'rpath|runpath'; then
    echo "gpu-check: the binary carries an rpath/runpath" >&2
    exit 1
fi
size=$(du -h "$out/dinovmf" | cut -f1)
cat <<MSG
gpu-check: $out/dinovmf ($size, links libcuda.so.1, PTX embedded)
On the GPU machine (run tool, carry ["target/gpu-check"]):
  cd target/gpu-check && nvidia-smi -L && ./dinovmf verify-kernels \\
    && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 5 \\
    && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 3 --preset small32 --loss dino \\
    && ./dinovmf verify-kernels --skip-kernels --compare-cpu --steps 3 --method ibot --loss vmf \\
    && ./dinovmf train --device cuda --preset tiny --out "\$OUT/tiny" -q \\
    && ./dinovmf train --device cuda --preset small32 --max-steps 200 --no-eval --out "\$OUT/small32" -q
MSG
