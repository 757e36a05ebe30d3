#!/usr/bin/env bash
# Builds the GPU kernels (crate `ptx/`, package dinovmf-ptx) into ONE self-contained PTX module,
# ptx/dinovmf.ptx, validates it with ptxas for sm_80 and sm_90 and prints registers / spills /
# shared memory per kernel. Installs what it needs privately under .toolchain/ on first use
# (Debian's rustc 1.96 + library source via scripts/toolchain.sh; ptxas from the pinned PyPI
# wheel nvidia-cuda-nvcc==13.0.88). Deterministic: rebuilding gives the same bytes.
#
#   scripts/build-ptx.sh            build, validate, write ptx/dinovmf.ptx
#   scripts/build-ptx.sh --check    the same, then fail if ptx/dinovmf.ptx changed (CI)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out="$top/ptx/dinovmf.ptx"

eval "$(scripts/toolchain.sh env)"

# --- ptxas, from the CUDA 13.0 nvcc wheel (matches the GPU machines' driver 580) -------------
nvcc_dir="$top/.toolchain/nvcc"
ptxas="$nvcc_dir/nvidia/cu13/bin/ptxas"
wheel_ver=13.0.88
wheel_sha=56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
if [ ! -x "$ptxas" ]; then
    echo "build-ptx: fetching ptxas (nvidia-cuda-nvcc==$wheel_ver) into $nvcc_dir" >&2
    mkdir -p "$nvcc_dir"
    (cd "$nvcc_dir" && python3 -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3.11 "nvidia-cuda-nvcc==$wheel_ver" >&2)
    whl=$(ls "$nvcc_dir"/nvidia_cuda_nvcc-"$wheel_ver"-*.whl)
    echo "$wheel_sha  $whl" | sha256sum -c --quiet -
    python3 - "$whl" "$nvcc_dir" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("nvidia/cu13/bin/ptxas", sys.argv[2])
PY
    chmod +x "$ptxas"
    rm -f "$whl"
fi

# --- Rust -> PTX -------------------------------------------------------------------------------
# Fat LTO pulls every called function (core, libm, dinovmf-core) into the one module; the
# immediate-abort panic strategy turns each bounds check into an inline trap; no debug info, so
# no paths end up in the output.
target_dir="$top/target/ptx"
export CARGO_PROFILE_RELEASE_LTO=fat
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_OPT_LEVEL=3
export CARGO_PROFILE_RELEASE_PANIC=abort
export CARGO_PROFILE_RELEASE_INCREMENTAL=false
export RUSTFLAGS="-Ctarget-cpu=sm_80 -Zunstable-options -Cpanic=immediate-abort --remap-path-prefix=$top=."
"$RUSTC" --version >&2
cargo rustc -q -p dinovmf-ptx --release --target nvptx64-nvidia-cuda -Zbuild-std=core \
    --crate-type=cdylib --target-dir "$target_dir" -- --emit=asm -Zno-link
asm="$target_dir/nvptx64-nvidia-cuda/release/deps/dinovmf_ptx.s"
[ -s "$asm" ] || { echo "build-ptx: no PTX produced at $asm" >&2; exit 1; }

# --- checks --------------------------------------------------------------------------------------
if grep -n '\.extern \.func' "$asm" >&2; then
    echo "build-ptx: the module calls functions it does not contain (see above)" >&2
    exit 1
fi
entries=$(grep -c '^\.visible \.entry' "$asm")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for arch in sm_80 sm_90; do
    "$ptxas" -v -arch="$arch" "$asm" -o "$tmp/$arch.cubin" 2>"$tmp/$arch.log" || {
        cat "$tmp/$arch.log" >&2
        echo "build-ptx: ptxas failed for $arch" >&2
        exit 1
    }
done

# Registers / spills / shared memory per kernel, both architectures side by side.
python3 - "$tmp/sm_80.log" "$tmp/sm_90.log" <<'PY'
import re, sys
def parse(path):
    rows, cur = {}, None
    for line in open(path):
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1); rows[cur] = {"regs": 0, "spill": 0, "smem": 0, "stack": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[cur]["stack"] = int(m.group(1)); rows[cur]["spill"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[cur]["smem"] = int(s.group(1)) if s else 0
    return rows
a, b = parse(sys.argv[1]), parse(sys.argv[2])
print(f"{'kernel':28} | {'sm_80 regs spill stack smem':>28} | {'sm_90 regs spill stack smem':>28}")
for k in sorted(a):
    x, y = a[k], b.get(k, {"regs": 0, "spill": 0, "stack": 0, "smem": 0})
    f = lambda r: f"{r['regs']:>10} {r['spill']:>5} {r['stack']:>5} {r['smem']:>6}"
    print(f"{k:28} | {f(x)} | {f(y)}")
PY

cp "$asm" "$tmp/new.ptx"
if [ "${1:-}" = "--check" ]; then
    if ! cmp -s "$tmp/new.ptx" "$out"; then
        echo "build-ptx: ptx/dinovmf.ptx is not what the sources build (rebuild and commit it)" >&2
        exit 1
    fi
fi
cp "$tmp/new.ptx" "$out"
echo "build-ptx: $entries kernels, $(wc -c <"$out") bytes -> ${out#"$top"/} (ptxas sm_80, sm_90: ok)"
