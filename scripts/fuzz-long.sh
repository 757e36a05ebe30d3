#!/usr/bin/env bash
# Long fuzzing runs of the property tests in host/tests/fuzz.rs (outside CI, which runs 32 cases
# a target). Each target runs in batches of BATCH cases, every batch with its own RNG seed, until
# MINUTES of wall-clock time have passed for it; JOBS targets run at once. A failing batch stops
# that target and its output (the minimal failing input) is kept in the log.
#
#   scripts/fuzz-long.sh [MINUTES=10] [JOBS=2] [BATCH=500]     log and counts in target/fuzz-long/
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
jobs=${2:-2}
batch=${3:-500}
out=target/fuzz-long
mkdir -p "$out"

bin=$(cargo test -p dinovmf --test fuzz --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "fuzz":
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "fuzz-long: could not build the fuzz test binary" >&2; exit 1; }
mapfile -t targets < <("$bin" --list 2>/dev/null | sed -n 's/: test$//p')

one_target() {
    local t=$1 start now cases=0 seed=1 status=ok
    start=$(date +%s)
    while :; do
        if ! PROPTEST_CASES=$batch PROPTEST_RNG_SEED=$seed PROPTEST_DISABLE_FAILURE_PERSISTENCE=1 \
            "$bin" --exact "$t" --test-threads 1 >"$out/$t.last" 2>&1; then
            status="FAILED (seed $seed, see $out/$t.last)"
            break
        fi
        cases=$((cases + batch))
        seed=$((seed + 1))
        now=$(date +%s)
        [ $((now - start)) -ge $((minutes * 60)) ] && break
    done
    now=$(date +%s)
    printf '%-60s %9d cases %5d s  %s\n' "$t" "$cases" $((now - start)) "$status" | tee -a "$out/summary.txt"
}

: >"$out/summary.txt"
echo "fuzz-long: ${#targets[@]} targets, $minutes min each, $jobs at once, batches of $batch cases ($bin)"
running=0
for t in "${targets[@]}"; do
    one_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait
if grep -q FAILED "$out/summary.txt"; then exit 1; fi
