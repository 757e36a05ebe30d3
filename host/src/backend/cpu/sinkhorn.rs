//! Sinkhorn-Knopp teacher targets on the CPU: core's `sinkhorn::sinkhorn_targets_over_ranks`
//! (the plain reference, which the tests below hold this to at 2e-5 of an f64 evaluation) made
//! for a batch's thousands of rows and prototypes. The same rounds on `ln Q` (column scaling to
//! `1/K`, row scaling to `1/N`, the last row scaling a softmax), with the maximum and sums of
//! every column round over all data-parallel ranks, but:
//!
//! - exponentials are [`exp`] (`fastmath`), compiled for AVX-512 / AVX2 + FMA / baseline and
//!   chosen at run time, with the same bits at every level (tested);
//! - the column passes run over blocks of [`COLS`] columns in parallel (each column's sum still
//!   over the rows in order: the bits do not depend on the thread count), the row passes over
//!   rows in parallel, each row's sums in eight fixed lanes;
//! - a column round's scaling is applied in the row pass that follows it, and the last round
//!   also gives each target row's entropy, `lse - sum_k p_k x_k` (no logarithm per entry).
use rayon::prelude::*;

use dinovmf_core::sinkhorn::SinkhornRanks;

use super::fastmath::{detected_simd_level, exp, multiversion, simd_level, SimdLevel};

/// Columns per parallel task of the column passes.
pub const COLS: usize = 256;

/// The eight lanes of a sum, combined pairwise (the order of `fastmath`'s lane sums).
#[inline(always)]
fn combine(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

multiversion! {
    /// `col_max[j] = max_i q[i, c0 + j]` over the rows of `q[rows, k]`.
    pub fn column_max / column_max_at(q: &[f32], k: usize, c0: usize, col_max: &mut [f32]) {
        let w = col_max.len();
        col_max.fill(f32::NEG_INFINITY);
        for row in q.chunks_exact(k) {
            for (m, &x) in col_max.iter_mut().zip(&row[c0..c0 + w]) {
                *m = if x > *m { x } else { *m };
            }
        }
    }
}

multiversion! {
    /// `col_sum[j] = sum_i exp(q[i, c0 + j] - col_max[j])` over the rows of `q[rows, k]`, in
    /// row order.
    pub fn column_sums / column_sums_at(
        q: &[f32],
        k: usize,
        c0: usize,
        col_max: &[f32],
        col_sum: &mut [f32],
    ) {
        let w = col_sum.len();
        let col_max = &col_max[..w];
        col_sum.fill(0.0);
        for row in q.chunks_exact(k) {
            for ((s, &m), &x) in col_sum.iter_mut().zip(col_max).zip(&row[c0..c0 + w]) {
                *s += exp(x - m);
            }
        }
    }
}

multiversion! {
    /// One row after a column round: `row -= shift` (the column scaling), then either the row
    /// scaling `row -= lse(row) + ln_n` (returns 0), or with `last` the row's softmax in place
    /// (returns its entropy).
    pub fn row_pass / row_pass_at(row: &mut [f32], shift: &[f32], ln_n: f32, last: bool) -> f32 {
        let k = row.len();
        let shift = &shift[..k];
        let mut mx = [f32::NEG_INFINITY; 8];
        let mut m_rest = f32::NEG_INFINITY;
        {
            let mut cr = row.chunks_exact_mut(8);
            let cs = shift.chunks_exact(8);
            let rs = cs.remainder();
            for (x, c) in (&mut cr).zip(cs) {
                for j in 0..8 {
                    x[j] -= c[j];
                    mx[j] = if x[j] > mx[j] { x[j] } else { mx[j] };
                }
            }
            for (x, &c) in cr.into_remainder().iter_mut().zip(rs) {
                *x -= c;
                m_rest = if *x > m_rest { *x } else { m_rest };
            }
        }
        let m = mx.into_iter().fold(m_rest, |a, v| if v > a { v } else { a });
        let mut acc = [0.0f32; 8];
        let mut s_rest = 0.0f32;
        let cr = row.chunks_exact(8);
        let rr = cr.remainder();
        for x in cr {
            for j in 0..8 {
                acc[j] += exp(x[j] - m);
            }
        }
        for &x in rr {
            s_rest += exp(x - m);
        }
        let lse = m + (combine(acc) + s_rest).ln();
        if !last {
            let c = lse + ln_n;
            for x in row.iter_mut() {
                *x -= c;
            }
            return 0.0;
        }
        let mut acc = [0.0f32; 8];
        let mut px_rest = 0.0f32;
        let mut cr = row.chunks_exact_mut(8);
        for x in &mut cr {
            for j in 0..8 {
                let p = exp(x[j] - lse);
                acc[j] += p * x[j];
                x[j] = p;
            }
        }
        for x in cr.into_remainder() {
            let p = exp(*x - lse);
            px_rest += p * *x;
            *x = p;
        }
        lse - (combine(acc) + px_rest)
    }
}

/// Sinkhorn-Knopp targets of this rank's `n` rows in place: `q[n, k]` holds the teacher logits
/// on entry and the targets on exit (rows summing to 1), after `n_iter` rounds (0 counts as 1,
/// like core); `row_ent[n]` gets each target row's entropy. `col_max`, `col_sum` are `[k]`
/// scratch. Every rank must call it, even with `n == 0`.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_targets_over_ranks<R: SinkhornRanks<f32>>(
    q: &mut [f32],
    col_max: &mut [f32],
    col_sum: &mut [f32],
    row_ent: &mut [f32],
    n: usize,
    k: usize,
    n_iter: u32,
    ranks: &mut R,
) -> Result<(), R::Error> {
    let batch_rows = ranks.batch_rows(n);
    if batch_rows == 0 || k == 0 {
        return Ok(());
    }
    let (q, col_max, col_sum) = (&mut q[..n * k], &mut col_max[..k], &mut col_sum[..k]);
    let (ln_k, ln_n) = ((k as f32).ln(), (batch_rows as f32).ln());
    let rounds = n_iter.max(1);
    for r in 0..rounds {
        {
            let q = &*q;
            col_max
                .par_chunks_mut(COLS)
                .enumerate()
                .for_each(|(b, m)| column_max(q, k, b * COLS, m));
        }
        ranks.max_over_ranks(col_max)?;
        {
            let (q, cm) = (&*q, &*col_max);
            col_sum
                .par_chunks_mut(COLS)
                .enumerate()
                .for_each(|(b, s)| column_sums(q, k, b * COLS, &cm[b * COLS..], s));
        }
        ranks.sum_over_ranks(col_sum)?;
        // The column scaling's subtrahend, `max + ln sum + ln K`, into `col_max`.
        for (m, &s) in col_max.iter_mut().zip(col_sum.iter()) {
            *m = *m + s.ln() + ln_k;
        }
        let last = r + 1 == rounds;
        let shift = &*col_max;
        q.par_chunks_mut(k)
            .zip(row_ent[..n].par_iter_mut())
            .for_each(|(row, e)| *e = row_pass(row, shift, ln_n, last));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinovmf_core::collapse::entropy;
    use dinovmf_core::sinkhorn::WholeBatch;
    use rand::{Rng, SeedableRng};

    /// Teacher logits at temperature 0.02: rows spanning ~100 nats, a few dominant prototypes.
    fn logits(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * k)
            .map(|i| rng.gen_range(-50.0f32..50.0) + if i % 37 == 1 { 40.0 } else { 0.0 })
            .collect()
    }

    fn run_at(level: SimdLevel, l: &[f32], n: usize, k: usize, iters: u32) -> (Vec<f32>, Vec<f32>) {
        let mut q = l.to_vec();
        let (mut cm, mut cs, mut ent) = (vec![0.0; k], vec![0.0; k], vec![f32::NAN; n]);
        // The kernels at `level`, driven like `sinkhorn_targets_over_ranks`.
        let (ln_k, ln_n) = ((k as f32).ln(), (n as f32).ln());
        for r in 0..iters.max(1) {
            for b in 0..k.div_ceil(COLS) {
                let w = COLS.min(k - b * COLS);
                column_max_at(level, &q, k, b * COLS, &mut cm[b * COLS..b * COLS + w]);
            }
            for b in 0..k.div_ceil(COLS) {
                let w = COLS.min(k - b * COLS);
                let (m, s) = (&cm[b * COLS..], &mut cs[b * COLS..b * COLS + w]);
                column_sums_at(level, &q, k, b * COLS, m, s);
            }
            for (m, &s) in cm.iter_mut().zip(&cs) {
                *m = *m + s.ln() + ln_k;
            }
            for (row, e) in q.chunks_exact_mut(k).zip(ent.iter_mut()) {
                *e = row_pass_at(level, row, &cm, ln_n, r + 1 == iters.max(1));
            }
        }
        (q, ent)
    }

    #[test]
    fn targets_within_2e5_of_core_in_f64() {
        for (n, k, iters) in [
            (1, 1, 1),
            (3, 7, 3),
            (16, 300, 3),
            (128, 1024, 3),
            (40, 517, 1),
        ] {
            let l = logits(n, k, (n * k) as u64);
            let mut q = l.clone();
            let (mut cm, mut cs, mut ent) = (vec![0.0; k], vec![0.0; k], vec![f32::NAN; n]);
            let Ok(()) = sinkhorn_targets_over_ranks(
                &mut q,
                &mut cm,
                &mut cs,
                &mut ent,
                n,
                k,
                iters,
                &mut WholeBatch,
            );
            let mut q64: Vec<f64> = l.iter().map(|&x| x as f64).collect();
            let (mut cm64, mut cs64) = (vec![0.0f64; k], vec![0.0f64; k]);
            dinovmf_core::sinkhorn::sinkhorn_targets_inplace(
                &mut q64, &mut cm64, &mut cs64, n, k, iters,
            );
            for (i, (&a, &b)) in q.iter().zip(&q64).enumerate() {
                // The rounds work on ln Q of ~100 nats: f32's 6e-8 of that is ~6e-6 of a
                // target per operation (core's own f32 evaluation is off by as much).
                assert!(
                    (a as f64 - b).abs() <= 2e-5 * b.max(1e-3 / k as f64),
                    "n={n} k={k}: target {i}: {a} against {b}"
                );
            }
            // And no less accurate than core's own f32 evaluation (up to 2x, or 1e-6).
            let mut q32 = l.clone();
            let (mut cm32, mut cs32) = (vec![0.0f32; k], vec![0.0f32; k]);
            dinovmf_core::sinkhorn::sinkhorn_targets_inplace(
                &mut q32, &mut cm32, &mut cs32, n, k, iters,
            );
            let worst = |v: &[f32]| {
                v.iter().zip(&q64).fold(0.0f64, |m, (&a, &b)| {
                    m.max((a as f64 - b).abs() / b.max(1e-3 / k as f64))
                })
            };
            let (ours, core32) = (worst(&q), worst(&q32));
            assert!(
                ours <= 2.0 * core32 + 1e-6,
                "n={n} k={k}: relative error {ours:e}, core's f32 {core32:e}"
            );
            for (r, row) in q64.chunks_exact(k).enumerate() {
                let h = entropy(row);
                assert!(
                    (ent[r] as f64 - h).abs() <= 2e-5 * (1.0 + h),
                    "n={n} k={k}: entropy of row {r}: {} against {h}",
                    ent[r]
                );
            }
            // The public driver equals the kernels run one block and one row at a time.
            let (q1, e1) = run_at(detected_simd_level(), &l, n, k, iters);
            assert!(q1 == q && e1 == ent, "n={n} k={k}: driver against kernels");
        }
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        let (n, k) = (24, 601);
        let l = logits(n, k, 5);
        let bits = |(q, e): (Vec<f32>, Vec<f32>)| {
            q.iter().chain(&e).map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let best = bits(run_at(detected_simd_level(), &l, n, k, 3));
        for level in [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512] {
            assert!(bits(run_at(level, &l, n, k, 3)) == best, "{level:?}");
        }
    }
}
