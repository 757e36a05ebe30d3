//! Sinkhorn-Knopp teacher targets (method.md, "Anti-collapse tools"): instead of centering each
//! row with a running center, the teacher's assignments are balanced within the batch.
//!
//! The spec's procedure on teacher logits `l[n, K]` (all global views of the batch together):
//! `Q = exp(l - max)`, then `n_iter` rounds of "scale each prototype's column to total `1/K`,
//! scale each row to total `1/n`", finally each row times `n`, so it sums to 1. The shift by the
//! batch maximum is one scalar and cancels in the first column scaling, so the result is the
//! same for any shift.
//!
//! Here the matrix is kept as `ln Q` and every scaling is a subtraction of a log-sum-exp: the
//! same numbers in exact arithmetic, but no entry can underflow to 0 (at a teacher temperature of
//! 0.02 a row's logits span 100 nats, and `exp(-100)` is below f32's range). The last row scaling
//! and the final `* n` together are a row softmax, which is what the last round writes.
//!
//! No gradient flows through the teacher, so there is no backward.
use crate::ops::softmax::log_sum_exp;
use crate::real::Real;

/// The spec's default number of rounds.
pub const SINKHORN_DEFAULT_ITERS: u32 = 3;

/// One column round on `ln Q[n, k]` (row-major) in place: every column gets
/// `ln Q_ik -= LSE_i(ln Q_ik) + ln k`, so its entries total `1/k`. `col_max`, `col_sum` are `[k]`
/// scratch.
pub fn sinkhorn_columns_inplace<T: Real>(
    log_q: &mut [T],
    col_max: &mut [T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
) {
    let (col_max, col_sum) = (&mut col_max[..k], &mut col_sum[..k]);
    col_max.fill(T::NEG_INFINITY);
    for row in log_q.chunks_exact(k).take(n) {
        for (m, &x) in col_max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
    col_sum.fill(T::ZERO);
    for row in log_q.chunks_exact(k).take(n) {
        for ((s, &m), &x) in col_sum.iter_mut().zip(col_max.iter()).zip(row) {
            *s += (x - m).exp();
        }
    }
    let ln_k = T::from_usize(k).ln();
    // `col_max` now holds the whole subtrahend of each column.
    for (m, &s) in col_max.iter_mut().zip(col_sum.iter()) {
        *m = *m + s.ln() + ln_k;
    }
    for row in log_q.chunks_exact_mut(k).take(n) {
        for (x, &c) in row.iter_mut().zip(col_max.iter()) {
            *x -= c;
        }
    }
}

/// One row round on `ln Q[n, k]` in place: `ln Q_ik -= LSE_k(ln Q_ik) + ln n` (rows total `1/n`).
pub fn sinkhorn_rows_inplace<T: Real>(log_q: &mut [T], n: usize, k: usize) {
    let ln_n = T::from_usize(n).ln();
    for row in log_q.chunks_exact_mut(k).take(n) {
        let c = log_sum_exp(row) + ln_n;
        for x in row.iter_mut() {
            *x -= c;
        }
    }
}

/// The final round's row scaling times `n`: each row becomes its softmax, in place.
pub fn sinkhorn_final_rows_inplace<T: Real>(log_q: &mut [T], n: usize, k: usize) {
    for row in log_q.chunks_exact_mut(k).take(n) {
        let lse = log_sum_exp(row);
        for x in row.iter_mut() {
            *x = (*x - lse).exp();
        }
    }
}

/// Sinkhorn-Knopp targets in place: `q[n, k]` holds the teacher logits on entry and the targets
/// `P_t` (rows summing to 1) on exit, after `n_iter` rounds (`n_iter >= 1`; 0 is treated as 1,
/// the host refuses it). `col_max`, `col_sum` are `[k]` scratch.
pub fn sinkhorn_targets_inplace<T: Real>(
    q: &mut [T],
    col_max: &mut [T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
    n_iter: u32,
) {
    debug_assert!(q.len() >= n * k && col_max.len() >= k && col_sum.len() >= k);
    if n == 0 || k == 0 {
        return;
    }
    let rounds = n_iter.max(1);
    for r in 0..rounds {
        sinkhorn_columns_inplace(q, col_max, col_sum, n, k);
        if r + 1 < rounds {
            sinkhorn_rows_inplace(q, n, k);
        } else {
            sinkhorn_final_rows_inplace(q, n, k);
        }
    }
}

/// [`sinkhorn_targets_inplace`] from separate logits `l[n, k]` into `p_t[n, k]`.
pub fn sinkhorn_targets_forward<T: Real>(
    p_t: &mut [T],
    l: &[T],
    col_max: &mut [T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
    n_iter: u32,
) {
    p_t[..n * k].copy_from_slice(&l[..n * k]);
    sinkhorn_targets_inplace(p_t, col_max, col_sum, n, k, n_iter);
}
