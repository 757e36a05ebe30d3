//! The fused residual + LayerNorm epilogue of the CPU backend (issue 16) against the two
//! passes it replaces, one thread, at the default preset's shapes (small32, patch 8: 2176
//! global-crop token rows and 1280 local-crop rows of width 96): `out = x + s (branch +
//! bias)` then `fastmath::layernorm_rows` of `out`, against `fastmath::residual_layernorm_rows`
//! doing both per row. Checks the two agree to the bit, then alternates them (so a change of
//! the machine's load hits both) and prints the median time of each over the rounds.
//!
//! `cargo bench -p dinovmf-suite --bench epilogue`
mod timing;

use dinovmf::backend::cpu::fastmath::{layernorm_rows, residual_layernorm_rows};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use timing::{median, time};

fn main() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let d = 96;
    println!("| rows x d | two passes (us) | fused (us) | fused / two |");
    println!("|---|---|---|---|");
    for rows in [2176usize, 1280] {
        let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (x, br, bias, gamma, beta) = (rnd(rows * d), rnd(rows * d), rnd(d), rnd(d), rnd(d));
        let s = 1.25f32;
        let mut out = vec![0.0f32; rows * d];
        let mut y = vec![0.0f32; rows * d];
        let (mut m, mut r) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        let two = |out: &mut [f32], y: &mut [f32], m: &mut [f32], r: &mut [f32]| {
            for ((o, xr), brr) in out
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(br.chunks_exact(d))
            {
                for (((o, &x), &b), &bb) in o.iter_mut().zip(xr).zip(brr).zip(&bias) {
                    *o = x + s * (b + bb);
                }
            }
            layernorm_rows(y, m, r, out, &gamma, &beta, 1e-6);
        };
        let fused = |out: &mut [f32], y: &mut [f32], m: &mut [f32], r: &mut [f32]| {
            residual_layernorm_rows(out, y, m, r, &x, &br, &bias, s, &gamma, &beta, 1e-6);
        };
        let bits =
            |vs: [&[f32]; 4]| -> Vec<u32> { vs.concat().iter().map(|v| v.to_bits()).collect() };
        two(&mut out, &mut y, &mut m, &mut r);
        let want = bits([&out, &y, &m, &r]);
        fused(&mut out, &mut y, &mut m, &mut r);
        let got = bits([&out, &y, &m, &r]);
        assert!(
            want == got,
            "fused and two-pass results differ at {rows} x {d}"
        );
        let (mut t2, mut tf) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            t2.push(time(200, || two(&mut out, &mut y, &mut m, &mut r)));
            tf.push(time(200, || fused(&mut out, &mut y, &mut m, &mut r)));
        }
        let (a, b) = (median(t2), median(tf));
        println!(
            "| {rows} x {d} | {:.1} | {:.1} | {:.2} |",
            a * 1e6,
            b * 1e6,
            b / a
        );
    }
}
