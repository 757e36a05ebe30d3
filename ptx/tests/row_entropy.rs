//! `row_entropy` (collapse signals on the device) against `core::collapse::entropy` in f64.
mod common;
use common::*;
use dinovmf_core::collapse::entropy;
use dinovmf_ptx::kernels::head;

/// Softmax rows of random logits (strictly positive probabilities), with a few exact zeros
/// put in so the `p = 0` convention is exercised.
fn prob_rows(seed: u64, rows: usize, k: usize) -> Vec<f32> {
    let mut r = rng(seed);
    let mut p = rand_vec(&mut r, rows * k, -6.0, 6.0);
    for row in p.chunks_exact_mut(k) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
        for x in row.iter_mut() {
            *x = (*x - m).exp() / s;
        }
        row[k / 3] = 0.0;
    }
    p
}

#[test]
fn row_entropy_matches_core_entropy_f64_rtol_1e5() {
    for (rows, k, seed) in [
        (1, 1, 1),
        (3, 255, 2),
        (5, 256, 3),
        (2, 257, 4),
        (4, 1000, 5),
    ] {
        let p = prob_rows(seed, rows, k);
        let mut ent = poison(rows);
        launch("row_entropy", [rows as u32, 1, 1], |b| {
            head::row_entropy(b, &mut ent, &p, rows, k)
        });
        let want: Vec<f64> = p.chunks_exact(k).map(|r| entropy(&to_f64(r))).collect();
        assert_close(
            &format!("row_entropy rows {rows} k {k} (rtol 1e-5, atol 1e-6)"),
            &ent,
            &want,
            1e-5,
            1e-6,
        );
    }
}
