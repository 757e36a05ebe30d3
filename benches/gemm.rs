//! The CPU backend's matrix products at the default preset's shapes (small32, patch 8: 2176
//! global-crop token rows, width 96, MLP 384) and at ViT-S/16's: the f32 GEMM (our driver,
//! `backend::cpu::gemm_f32`) against the `gemm` crate it replaced (same microkernels) and
//! against the bf16 path (`--precision bf16`: AVX512-BF16 where the CPU has it, else the
//! emulation). Before timing, ours is checked against the crate (and says whether the bits are
//! the same) and bf16 against ours within the bf16 rounding bound. Prints GFLOP/s per shape and
//! the ratios; alternates the kernels so a change of the machine's load hits all of them.
//!
//! `cargo bench -p dinovmf-suite --bench gemm` (`RAYON_NUM_THREADS` sets the threads).
mod timing;

use dinovmf::backend::cpu::gemm::{matmul, matmul_gemm_crate, Op};
use dinovmf::backend::cpu::gemm_bf16::{bf16_kernel, matmul_bf16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use timing::time;

fn main() {
    println!(
        "bf16 kernel: {:?}, {} threads",
        bf16_kernel(),
        rayon::current_num_threads()
    );
    println!(
        "| shape | what | m x n x k | ops | gemm crate GFLOP/s | ours GFLOP/s | ours / crate \
         | same bits | bf16 GFLOP/s | bf16 / ours |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let shapes: &[(&str, &str, usize, usize, usize, Op, Op)] = &[
        ("small32", "qkv", 2176, 288, 96, Op::N, Op::T),
        ("small32", "qkv dx", 2176, 96, 288, Op::N, Op::N),
        ("small32", "qkv dw", 288, 96, 2176, Op::T, Op::N),
        ("small32", "fc1", 2176, 384, 96, Op::N, Op::T),
        ("small32", "fc2", 2176, 96, 384, Op::N, Op::T),
        ("small32", "fc1 dx", 2176, 96, 384, Op::N, Op::N),
        ("small32", "fc1 dw", 384, 96, 2176, Op::T, Op::N),
        // One head of one image's attention (17 tokens, head width 32): single-threaded, as the
        // attention calls them from inside its loop over images.
        ("small32", "attn q k^T", 17, 17, 32, Op::N, Op::T),
        ("small32", "attn p v", 17, 32, 17, Op::N, Op::N),
        ("small32", "attn dp^T q", 17, 32, 17, Op::T, Op::N),
        (
            "ViT-S/16",
            "qkv (one image pair)",
            394,
            1152,
            384,
            Op::N,
            Op::T,
        ),
        (
            "ViT-S/16",
            "fc1 (one image pair)",
            394,
            1536,
            384,
            Op::N,
            Op::T,
        ),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(model, what, m, n, k, oa, ob) in shapes {
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (mut c32, mut c16) = (vec![0f32; m * n], vec![0f32; m * n]);
        let mut cref = vec![0f32; m * n];
        matmul(m, n, k, &a, oa, &b, ob, &mut c32, false);
        matmul_gemm_crate(m, n, k, &a, oa, &b, ob, &mut cref, false);
        let same = c32
            .iter()
            .zip(&cref)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        let drift = largest_difference(&c32, &cref);
        assert!(
            drift <= 1e-5 * k as f32,
            "{what}: our driver differs from the gemm crate by {drift}"
        );
        matmul_bf16(m, n, k, &a, oa, &b, ob, &mut c16, false);
        // |a|, |b| < 1: each product off by at most 2^-7, a sum of k by k 2^-7.
        let bound = k as f32 / 128.0;
        let worst = largest_difference(&c32, &c16);
        assert!(
            worst <= bound,
            "{what}: bf16 differs from f32 by {worst} > {bound}"
        );
        let flop = 2.0 * (m * n * k) as f64;
        let reps = ((2e9 / flop) as usize).clamp(3, 100_000);
        let (mut t32, mut t16, mut tref) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            tref = tref.min(time(reps, || {
                matmul_gemm_crate(m, n, k, &a, oa, &b, ob, &mut cref, false)
            }));
            t32 = t32.min(time(reps, || {
                matmul(m, n, k, &a, oa, &b, ob, &mut c32, false)
            }));
            t16 = t16.min(time(reps, || {
                matmul_bf16(m, n, k, &a, oa, &b, ob, &mut c16, false)
            }));
        }
        let op = |o| if o == Op::N { "N" } else { "T" };
        println!(
            "| {model} | {what} | {m} x {n} x {k} | {}{} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {:.2} |",
            op(oa),
            op(ob),
            flop / tref / 1e9,
            flop / t32 / 1e9,
            tref / t32,
            if same { "yes" } else { "no" },
            flop / t16 / 1e9,
            t32 / t16
        );
    }
}

/// The largest `|x - y|` over the two products.
fn largest_difference(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).fold(0f32, |w, (a, b)| w.max((a - b).abs()))
}
