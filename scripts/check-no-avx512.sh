#!/usr/bin/env bash
# The CPU backend's run-time dispatch on CPUs without AVX-512 (and without AVX2): runs the GEMM
# and fast-math unit tests of the host library under QEMU user-mode emulation of a Haswell
# (AVX2 + FMA, no AVX-512) and of a Nehalem (SSE4.2 only), so the `gemm` crate and
# fastmath's kernels take their lower paths and must still pass the same f64-reference tests
# (fastmath's also compare every level bit for bit). Needs qemu-user (Debian: apt-get install
# qemu-user, installed here with apt-get when missing); QEMU 7.2 or newer emulates AVX2. CI runs it.
#
#   scripts/check-no-avx512.sh            # builds the test binary first
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq qemu-user >/dev/null
    command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found after installing qemu-user" >&2; exit 1; }
fi
bin=$(cargo test -p dinovmf --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "no test binary" >&2; exit 1; }
# Each emulated CPU with the SIMD level its run-time dispatch must pick there (checked by
# fastmath's dispatch_picks_the_level_the_cpu_has; the bf16 products fall back to the emulation).
# The GEMM driver's three heaviest tests are skipped here (11 minutes under QEMU): they run
# natively in the test suite at every SIMD level up to the CPU's, and threads or large sizes
# use no instruction the remaining tests (every Op pair, strided views, edge sizes) do not.
for cpu_level in Haswell:avx2 Nehalem:baseline; do
    cpu=${cpu_level%%:*}
    echo "== qemu-x86_64 -cpu $cpu (expected level ${cpu_level#*:}): backend::cpu::gemm, backend::cpu::fastmath, backend::cpu::rows, backend::cpu::loss_rows, backend::cpu::sinkhorn"
    # (QEMU warns about each CPUID feature of the model it does not emulate: filtered out.)
    DINOVMF_EXPECT_SIMD=${cpu_level#*:} DINOVMF_EXPECT_BF16=emulated \
        qemu-x86_64 -cpu "$cpu" "$bin" --test-threads 1 backend::cpu::gemm backend::cpu::fastmath \
        backend::cpu::rows backend::cpu::loss_rows backend::cpu::sinkhorn --skip thread_count_does_not_change_bits \
        --skip matches_f64_reference_large_every_level --skip bit_identical_to_the_gemm_crate \
        2> >(grep -v "TCG doesn.t support" >&2)
done
