#!/usr/bin/env bash
# The GPU check, prepared here and run as ONE script on a lent GPU machine (H100/H200, driver
# 580, PyTorch, nvcc, compute-sanitizer; no Rust, no network).
#
#   scripts/gpu-check.sh              build what travels into target/gpu-check/ and write
#                                     target/gpu-check/remote.sh
#   scripts/gpu-check.sh --dry-run    the same, then run remote.sh HERE on the simulator
#                                     (verify-kernels --sim, DINOVMF_CUDA_SIM=1 for train, the
#                                     driver stub on LD_LIBRARY_PATH) to test its logic: every
#                                     step, timeout, the deadline, the log and the summary. Only
#                                     in a dry run, the DINO comparison and the train run use the
#                                     tiny preset and the side by side small32 at batch 8 (the
#                                     simulator cannot run ViT-S/16 steps in a step's limit); the
#                                     kernel checks keep their sizes.
#
# What travels (target/gpu-check/, git-ignored; carry exactly that one folder):
#   dinovmf          release `--features cuda` binary, stripped, PTX embedded, no rpath
#   dinovmf.ptx      the same PTX (for ptxas / cuobjdump facts)
#   side_by_side.py  scripts/side_by_side.py
#   dino/            the official DINO files, from third_party/dino (scripts/fetch-dino.sh)
#   remote.sh        the script below
#
# With the device tool (one call, then give the machine back):
#   run(command="bash target/gpu-check/remote.sh", carry=["target/gpu-check"], timeout_s=480)
#   give_back()
# remote.sh keeps to an overall deadline of GPU_CHECK_BUDGET seconds (default 420 = 7 min),
# each step under its own `timeout`, goes on after a failing step, writes the full log to
# $OUT/gpu-check.log, the summary to $OUT/summary.txt (and prints it last, so the reply's tail
# shows it), and brings back at most 8 files (train runs write to /tmp, not $OUT).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
eval "$(scripts/cuda-stub.sh)"
out="$top/target/gpu-check"
mkdir -p "$out"
cargo build --release -p dinovmf --features cuda --bin dinovmf
cp target/release/dinovmf "$out/dinovmf"
strip "$out/dinovmf"
if readelf -d "$out/dinovmf" | grep -Ei 'rpath|runpath'; then
    echo "gpu-check: the binary carries an rpath/runpath" >&2
    exit 1
fi
cp ptx/dinovmf.ptx "$out/dinovmf.ptx"
cp scripts/side_by_side.py "$out/side_by_side.py"
if [ -f third_party/dino/main_dino.py ]; then
    rm -rf "$out/dino"
    cp -r third_party/dino "$out/dino"
else
    echo "gpu-check: third_party/dino missing (run scripts/fetch-dino.sh); the side-by-side step will fail" >&2
fi

cat > "$out/remote.sh" <<'REMOTE'
#!/usr/bin/env bash
# Written by scripts/gpu-check.sh: the whole GPU check in one run (see there).
set -u
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
budget=${GPU_CHECK_BUDGET:-420}
dry=${GPU_CHECK_DRY:-0}
start=$(date +%s)
runs=$(mktemp -d /tmp/gpu-check-runs.XXXXXX)
cores=$(nproc)
sim=""
# The sizes of the GPU run. A dry run (the simulator on a CPU machine) shrinks only the runs whose
# size is not what is being checked, so that every step finishes and its logic is exercised.
cmp_dino="--preset small32"
train_args="--preset vit-s16 --batch-size 64 --max-steps 8"
sbs_args="--preset vit-s16 --n-local 8 --steps 8 --rounds 1 --dinovmf-steps 8"
if [ "$dry" = 1 ]; then
    sim="--sim"
    export DINOVMF_CUDA_SIM=1
    cmp_dino="--preset tiny"
    train_args="--preset tiny --batch-size 8 --max-steps 2"
    sbs_args="--preset small32 --batch 8 --n-local 2 --steps 1 --warmup 1 --rounds 1"
fi
rows=()

# step NAME LIMIT_S CMD...: runs CMD under `timeout` (its own limit, cut to what is left of the
# overall budget), its output appended to the log; records status and seconds; never stops the
# script.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 10 ]; then
        rows+=("$(printf '%-28s %-10s %6s  %s' "$name" skipped - "overall deadline reached")")
        echo "== $name: skipped (deadline)" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local st=ok note=""
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=TIMEOUT; note="killed after ${limit}s";
    elif [ $rc -ne 0 ]; then st=FAIL; note="exit $rc"; fi
    [ -n "${NOTE:-}" ] && note="${note:+$note; }$NOTE"
    rows+=("$(printf '%-28s %-10s %5ss  %s' "$name" "$st" "$dt" "$note")")
    echo "== $name: $st (${dt}s) $note" | tee -a "$LOG"
    NOTE=""
}
absent() {
    rows+=("$(printf '%-28s %-10s %6s  %s' "$1" absent - "$2")")
    echo "== $1: absent ($2)" | tee -a "$LOG"
}

# 1. Device facts.
if command -v nvidia-smi >/dev/null; then
    step "nvidia-smi" 20 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; echo "cpu cores: $(nproc)"'
else
    absent "nvidia-smi" "not on this machine"
fi
# 2. ptxas / SASS facts: registers, spills, shared memory per kernel for this GPU's arch.
arch=sm_90
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
[ -n "$cc" ] && arch="sm_$cc"
if command -v ptxas >/dev/null; then
    step "ptxas $arch" 60 bash -c "ptxas -v -arch=$arch dinovmf.ptx -o /tmp/dinovmf.cubin 2>&1 | tee $OUT/ptxas.txt | grep -c 'Used' ; grep -i 'spill' $OUT/ptxas.txt | grep -v ' 0 bytes spill stores, 0 bytes spill loads' || echo 'no spills'; command -v cuobjdump >/dev/null && cuobjdump -sass /tmp/dinovmf.cubin | grep -c -E '^\s+/\*[0-9a-f]{4}\*/' | sed 's/^/SASS instructions: /'"
else
    absent "ptxas" "no CUDA toolkit on PATH"
fi
# 3. Kernels against dinovmf-core, small shapes then production shapes (sampled).
step "verify-kernels" 120 ./dinovmf verify-kernels $sim
step "verify-kernels --large" 120 ./dinovmf verify-kernels $sim --skip-kernels --large
# 4. Training steps on the device against the CPU.
step "compare-cpu DINO" 60 ./dinovmf verify-kernels $sim --skip-kernels --compare-cpu --steps 3 $cmp_dino --loss dino
step "compare-cpu DINO-vMF" 60 ./dinovmf verify-kernels $sim --skip-kernels --compare-cpu --steps 5 --loss vmf
step "compare-cpu iBOT-vMF" 60 ./dinovmf verify-kernels $sim --skip-kernels --compare-cpu --steps 3 --method ibot --loss vmf
# 5. Memory errors in the kernel verification.
if command -v compute-sanitizer >/dev/null; then
    step "compute-sanitizer memcheck" 150 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 ./dinovmf verify-kernels $sim
else
    absent "compute-sanitizer" "not on this machine"
fi
# 6. Throughput: 8 ViT-S/16 steps (batch 64, 2 x 224 + 8 x 96 crops, K 65536), all cores feeding.
step "train ViT-S/16 8 steps" 150 bash -c "./dinovmf train --device cuda $train_args --workers $cores --no-eval --no-figures -q --out $runs/vits && grep -o '\"images_per_sec\": *[0-9.]*' $runs/vits/summary.json"
# 7. The official DINO step next to dinovmf, same model, crops, batch, precision.
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
    dev=cuda
    [ "$dry" = 1 ] && dev=cpu
    step "side-by-side PyTorch DINO" 150 "$PY" side_by_side.py --device $dev $sbs_args --dino ./dino --dinovmf ./dinovmf --workers "$cores"
else
    absent "side-by-side PyTorch DINO" "no PyTorch in python3"
fi
rm -rf "$runs"

{
    echo
    echo "gpu-check summary ($(( $(date +%s) - start ))s of a ${budget}s budget; full log: gpu-check.log)"
    printf '%-28s %-10s %6s  %s\n' step status time note
    for r in "${rows[@]}"; do echo "$r"; done
    # The lines a reader needs from the log, if they are there.
    grep -hE '^(verify-kernels on|[0-9]+ (checks|large checks)|module: |[0-9]+ kernels, max|ratio dinovmf|official DINO|dinovmf +:|"images_per_sec)' "$LOG" 2>/dev/null | head -20
    grep -h 'FAIL' "$LOG" 2>/dev/null | head -15 | sed 's/^/  /'
} | tee "$SUMMARY"
REMOTE
chmod +x "$out/remote.sh"
size=$(du -sh "$out" | cut -f1)
echo "gpu-check: $out ($size) ready; on the GPU machine: bash target/gpu-check/remote.sh (carry [\"target/gpu-check\"])"
if [ $dry = 1 ]; then
    export LD_LIBRARY_PATH="$CUDA_LIBRARY_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export OUT="$top/target/gpu-check-dry"
    rm -rf "$OUT"
    GPU_CHECK_DRY=1 GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-420}" bash "$out/remote.sh"
    echo "gpu-check --dry-run: files under \$OUT: $(find "$OUT" -type f | wc -l) (at most 8 come back)"
fi
