#!/usr/bin/env python3
"""The cost sweep of docs/performance.md: images/s, achieved GFLOP/s and peak memory of the CPU
training step against batch size, K, image size and threads, for DINO, DINO-vMF and iBOT-vMF.
Each point is one run of the `scaling` bench binary (benches/scaling.rs: synthetic batch, a
warm-up step, then `--steps` timed steps), in its own process so its peak memory is its own.

    cargo bench --bench scaling --no-run    # builds target/release/deps/scaling-*
    python3 scripts/perf_sweep.py --steps 2 > sweep.md

Prints a Markdown table; `--peak-gflops` (default: derived from lscpu, see peak_gflops) turns
the achieved GFLOP/s into a fraction of the machine's peak.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time


def bench_binary():
    cands = [p for p in glob.glob("target/release/deps/scaling-*") if os.access(p, os.X_OK)
             and not p.endswith(".d")]
    if not cands:
        sys.exit("perf_sweep: no target/release/deps/scaling-*: run `cargo bench --bench scaling --no-run`")
    return max(cands, key=os.path.getmtime)


def peak_gflops():
    """Cores x FP32 FLOP per cycle x base clock. FLOP per cycle: 2 FMA units x 16 lanes x 2 with
    AVX-512 F (Intel Xeon server cores), 2 x 8 x 2 with AVX2 only; the clock from lscpu's
    BogoMIPS / 2 (the TSC rate under KVM, here the base clock). Turbo and AVX-512 licence
    clocks are not modelled: a bound, not a measurement."""
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((l for l in info.splitlines() if l.startswith("Flags:")), "")
    bogo = next((float(l.split()[-1]) for l in info.splitlines() if l.startswith("BogoMIPS:")), 4000.0)
    lanes = 16 if "avx512f" in flags else 8
    ghz = bogo / 2 / 1000
    cores = os.cpu_count() or 1
    return cores * 2 * lanes * 2 * ghz, f"{cores} cores x 2 FMA x {lanes} lanes x 2 x {ghz:.2f} GHz"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peak-gflops", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    args = ap.parse_args()
    exe = bench_binary()
    peak, how = peak_gflops()
    if args.peak_gflops:
        peak, how = args.peak_gflops, "given"
    methods = [("DINO", "dino", "dino"), ("DINO-vMF", "dino", "vmf"), ("iBOT-vMF", "ibot", "vmf")]
    base = dict(batch=64, k=4096, img=32, threads=2)
    sweeps = [("batch", [16, 64, 128]), ("k", [1024, 4096, 16384, 65536]), ("img", [32, 64, 96]),
              ("threads", [1, 2])]
    if args.quick:
        sweeps = [("batch", [16, 64]), ("k", [1024, 65536])]
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"peak {peak:.0f} GFLOP/s ({how})\n")
    print("| method | varied | batch | K | image px | threads | images/s | GFLOP/step | GFLOP/s | % of peak | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    t0 = time.time()
    for name, method, loss in methods:
        seen = set()
        for key, values in sweeps:
            for v in values:
                pt = dict(base, **{key: v})
                sig = tuple(sorted(pt.items()))
                if sig in seen:
                    continue
                seen.add(sig)
                cmd = [exe, f"method={method}", f"loss={loss}", f"batch={pt['batch']}",
                       f"k={pt['k']}", f"img={pt['img']}", f"steps={args.steps}"]
                env = dict(os.environ, RAYON_NUM_THREADS=str(pt["threads"]))
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"| {name} | {key}={v} | failed: {res.stderr.strip()[:80]} |")
                    continue
                j = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"| {name} | {key} | {j['batch']} | {j['k']} | {j['img']} | {j['threads']} | "
                      f"{j['images_per_s']:.1f} | {j['gflop_per_step']:.1f} | {j['gflop_per_s']:.1f} | "
                      f"{100 * j['gflop_per_s'] / peak:.1f} | {j['peak_mib']:.0f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s; load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
