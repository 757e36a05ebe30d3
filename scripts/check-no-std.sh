#!/usr/bin/env bash
# Proves dinovmf-core is no_std: builds it for a Cortex-M4F (thumbv7em-none-eabihf), a target
# with no standard library, from source with -Zbuild-std=core.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
eval "$(scripts/toolchain.sh env)"
"$RUSTC" --version
cargo build -p dinovmf-core --release --target thumbv7em-none-eabihf -Zbuild-std=core \
    --target-dir target/no-std
echo "no_std check: dinovmf-core builds for thumbv7em-none-eabihf"
