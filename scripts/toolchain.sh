#!/usr/bin/env bash
# Installs, privately under .toolchain/, a Rust compiler whose library source matches it, so that
# `-Zbuild-std=core` can build dinovmf-core for targets rustup cannot provide here
# (thumbv7em-none-eabihf, nvptx64-nvidia-cuda). Debian's rustc-web 1.96 packages are always
# reachable; they are unpacked (not installed), so no system state changes.
#
# Prints the environment to use: `eval "$(scripts/toolchain.sh env)"`.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dest="$top/.toolchain/debian"
stamp="$dest/.complete"
pkgs=(rustc-web rust-web-src libstd-rust-web-1.96 libstd-rust-web-dev libllvm22 llvm-22)

install() {
    [ -f "$stamp" ] && return 0
    echo "toolchain: fetching Debian's rustc 1.96 + library source into $dest" >&2
    rm -rf "$dest" && mkdir -p "$dest/debs"
    (cd "$dest/debs" && {
        apt-get download "${pkgs[@]}" >/dev/null 2>&1 || {
            apt-get update -qq >/dev/null 2>&1 || true
            apt-get download "${pkgs[@]}" >/dev/null
        }
    })
    for f in "$dest"/debs/*.deb; do dpkg -x "$f" "$dest"; done
    rm -rf "$dest/debs"
    "$dest/usr/bin/rustc" --version >/dev/null 2>&1 || {
        LD_LIBRARY_PATH="$dest/usr/lib/x86_64-linux-gnu" "$dest/usr/bin/rustc" --version >&2
    }
    touch "$stamp"
}

env_lines() {
    echo "export LD_LIBRARY_PATH=\"$dest/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
    echo "export RUSTC=\"$dest/usr/bin/rustc\""
    echo "export RUSTC_BOOTSTRAP=1"
    echo "export DINOVMF_LLVM_BIN=\"$dest/usr/lib/llvm-22/bin\""
}

case "${1:-install}" in
    install) install ;;
    env) install; env_lines ;;
    *) echo "usage: $0 [install|env]" >&2; exit 2 ;;
esac
