#!/usr/bin/env bash
# Builds the Cortex-M4F firmware (firmware/) around an exported model and an input image, and runs
# it under QEMU's mps2-an386 board with semihosting. Installs what it needs privately: Debian's
# QEMU 7.2 and the libraries it lacks, unpacked under target/firmware/qemu (no root, no system
# change), and the compiler of scripts/toolchain.sh (for -Zbuild-std=core).
#
#   scripts/firmware.sh build MODEL IMAGE   builds; prints the ELF path and its section sizes
#   scripts/firmware.sh run MODEL IMAGE     builds, then runs it (prints the firmware's output)
#   scripts/firmware.sh qemu                installs QEMU only; prints its path
#
# MODEL is a file from `dinovmf export`; IMAGE the raw RGB u8 input at the model's size
# (`dinovmf assign --save-input` writes one). QEMU runs with -icount shift=0: one instruction per
# nanosecond of virtual time, deterministic.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
qdir="$top/target/firmware/qemu"
qpkgs=(qemu-system-arm libfdt1 libcapstone4 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2
    libndctl6 libdaxctl1 libnl-3-200 libnl-route-3-200)
target=thumbv7em-none-eabihf

install_qemu() {
    if [ ! -f "$qdir/.complete" ]; then
        echo "firmware: fetching QEMU (qemu-system-arm 7.2) into $qdir" >&2
        rm -rf "$qdir" && mkdir -p "$qdir/debs"
        (cd "$qdir/debs" && {
            apt-get download "${qpkgs[@]}" >/dev/null 2>&1 || {
                apt-get update -qq >/dev/null 2>&1 || true
                apt-get download "${qpkgs[@]}" >/dev/null
            }
        })
        for f in "$qdir"/debs/*.deb; do dpkg -x "$f" "$qdir"; done
        rm -rf "$qdir/debs"
        touch "$qdir/.complete"
    fi
    export LD_LIBRARY_PATH="$qdir/usr/lib/x86_64-linux-gnu:$qdir/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    QEMU="$qdir/usr/bin/qemu-system-arm"
    if ! "$QEMU" --version >/dev/null 2>&1; then
        echo "firmware: $QEMU does not start; missing libraries:" >&2
        ldd "$QEMU" | grep "not found" >&2 || true
        exit 1
    fi
}

find_lld() {
    local c
    for c in "$(rustup which --toolchain stable rustc 2>/dev/null | xargs -r dirname)/../lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld" \
        "$HOME"/.rustup/toolchains/*/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld \
        "$(command -v ld.lld 2>/dev/null || true)"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    echo "firmware: no rust-lld or ld.lld found (install rustup's stable toolchain)" >&2
    exit 1
}

build() {
    local model image
    model=$(realpath "$1")
    image=$(realpath "$2")
    eval "$("$top/scripts/toolchain.sh" env)"
    local lld
    lld=$(find_lld)
    (cd "$top/firmware" &&
        DINOVMF_FW_MODEL="$model" DINOVMF_FW_IMAGE="$image" \
            CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER="$lld" \
            CARGO_TARGET_THUMBV7EM_NONE_EABIHF_RUSTFLAGS="-C link-arg=-Tlink.x" \
            cargo build --release --target "$target" -Zbuild-std=core \
            --target-dir "$top/target/firmware/build" >&2)
    ELF="$top/target/firmware/build/$target/release/dinovmf-firmware"
    echo "elf $ELF"
    # Flash holds .vector_table + .text + .rodata (+ the .data initialisers); RAM holds .data +
    # .bss, and the stack above them.
    "$DINOVMF_LLVM_BIN/llvm-size" -A "$ELF" |
        awk '/^\.(vector_table|text|rodata|data|bss|uninit) / { print "section " $1 " " $2 }'
}

case "${1:-}" in
    qemu)
        install_qemu
        echo "$QEMU"
        ;;
    build)
        [ $# -eq 3 ] || { echo "usage: $0 build MODEL IMAGE" >&2; exit 2; }
        build "$2" "$3"
        ;;
    run)
        [ $# -eq 3 ] || { echo "usage: $0 run MODEL IMAGE" >&2; exit 2; }
        install_qemu
        build "$2" "$3"
        timeout "${DINOVMF_QEMU_TIMEOUT:-300}" "$QEMU" -machine mps2-an386 -cpu cortex-m4 \
            -nographic -monitor none -serial none -icount shift=0 \
            -semihosting-config enable=on,target=native -kernel "$ELF"
        ;;
    *)
        echo "usage: $0 build|run MODEL IMAGE, or $0 qemu" >&2
        exit 2
        ;;
esac
