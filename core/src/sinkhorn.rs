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
//! With the batch's rows split over data-parallel ranks, each column round's maximum and sums
//! are taken over all ranks ([`SinkhornRanks`]) and the row scale is `1/N` for the whole
//! batch's `N` rows; the row rounds need nothing else (a row lives on one rank).
//!
//! No gradient flows through the teacher, so there is no backward.
use crate::ops::softmax::log_sum_exp;
use crate::real::Real;

/// The spec's default number of rounds.
pub const SINKHORN_DEFAULT_ITERS: u32 = 3;

/// What a Sinkhorn round needs from the rest of the batch when the batch's rows are split over
/// several data-parallel ranks (each holding `ln Q` of its own rows). Every rank makes the same
/// calls in the same order. [`WholeBatch`] is the one-process case: every call is the identity.
pub trait SinkhornRanks<T> {
    type Error;
    /// The batch's row count over all ranks, given this rank's `local` rows.
    fn batch_rows(&self, local: usize) -> usize;
    /// `col_max[k]` becomes the element-wise maximum over ranks.
    fn max_over_ranks(&mut self, col_max: &mut [T]) -> Result<(), Self::Error>;
    /// `col_sum[k]` becomes the element-wise sum over ranks.
    fn sum_over_ranks(&mut self, col_sum: &mut [T]) -> Result<(), Self::Error>;
}

/// The whole batch in one place: no other ranks.
#[derive(Clone, Copy, Debug, Default)]
pub struct WholeBatch;

impl<T> SinkhornRanks<T> for WholeBatch {
    type Error = core::convert::Infallible;
    fn batch_rows(&self, local: usize) -> usize {
        local
    }
    fn max_over_ranks(&mut self, _: &mut [T]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn sum_over_ranks(&mut self, _: &mut [T]) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A column round's first piece: `col_max[k]` = each column's maximum over the `n` rows here.
pub fn sinkhorn_column_max<T: Real>(log_q: &[T], col_max: &mut [T], n: usize, k: usize) {
    let col_max = &mut col_max[..k];
    col_max.fill(T::NEG_INFINITY);
    for row in log_q.chunks_exact(k).take(n) {
        for (m, &x) in col_max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
}

/// A column round's second piece: `col_sum[k]` = `sum_i exp(ln Q_ik - col_max_k)` over the `n`
/// rows here (`col_max` the maximum over the whole batch).
pub fn sinkhorn_column_sums<T: Real>(
    log_q: &[T],
    col_max: &[T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
) {
    let col_sum = &mut col_sum[..k];
    col_sum.fill(T::ZERO);
    for row in log_q.chunks_exact(k).take(n) {
        for ((s, &m), &x) in col_sum.iter_mut().zip(col_max.iter()).zip(row) {
            *s += (x - m).exp();
        }
    }
}

/// A column round's last piece: `ln Q_ik -= col_max_k + ln col_sum_k + ln k` on the `n` rows
/// here, so every column of the whole batch totals `1/k`. `col_max` is overwritten by that
/// subtrahend.
pub fn sinkhorn_column_scale<T: Real>(
    log_q: &mut [T],
    col_max: &mut [T],
    col_sum: &[T],
    n: usize,
    k: usize,
) {
    let ln_k = T::from_usize(k).ln();
    for (m, &s) in col_max[..k].iter_mut().zip(col_sum.iter()) {
        *m = *m + s.ln() + ln_k;
    }
    for row in log_q.chunks_exact_mut(k).take(n) {
        for (x, &c) in row.iter_mut().zip(col_max.iter()) {
            *x -= c;
        }
    }
}

/// One column round over a batch split across ranks: the three pieces, with the maximum and
/// the sums taken over all ranks in between.
pub fn sinkhorn_columns_over_ranks<T: Real, R: SinkhornRanks<T>>(
    log_q: &mut [T],
    col_max: &mut [T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
    ranks: &mut R,
) -> Result<(), R::Error> {
    sinkhorn_column_max(log_q, col_max, n, k);
    ranks.max_over_ranks(&mut col_max[..k])?;
    sinkhorn_column_sums(log_q, &col_max[..k], col_sum, n, k);
    ranks.sum_over_ranks(&mut col_sum[..k])?;
    sinkhorn_column_scale(log_q, col_max, &col_sum[..k], n, k);
    Ok(())
}

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
    let Ok(()) = sinkhorn_columns_over_ranks(log_q, col_max, col_sum, n, k, &mut WholeBatch);
}

/// One row round on the `rows` rows here of a batch of `batch_rows` rows:
/// `ln Q_ik -= LSE_k(ln Q_ik) + ln batch_rows` (rows total `1/batch_rows`).
pub fn sinkhorn_rows_of_batch<T: Real>(log_q: &mut [T], rows: usize, batch_rows: usize, k: usize) {
    let ln_n = T::from_usize(batch_rows).ln();
    for row in log_q.chunks_exact_mut(k).take(rows) {
        let c = log_sum_exp(row) + ln_n;
        for x in row.iter_mut() {
            *x -= c;
        }
    }
}

/// One row round on `ln Q[n, k]` in place: `ln Q_ik -= LSE_k(ln Q_ik) + ln n` (rows total `1/n`).
pub fn sinkhorn_rows_inplace<T: Real>(log_q: &mut [T], n: usize, k: usize) {
    sinkhorn_rows_of_batch(log_q, n, n, k);
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

/// [`sinkhorn_targets_inplace`] on this rank's `n` rows of a batch split over ranks: the same
/// rounds, the column statistics over every rank's rows and the row scale `1/N` of the whole
/// batch's `N` rows, so that the union of the ranks' results is the one-process result (up to
/// the order of the column sums). Every rank must call it, even with `n == 0`.
pub fn sinkhorn_targets_over_ranks<T: Real, R: SinkhornRanks<T>>(
    q: &mut [T],
    col_max: &mut [T],
    col_sum: &mut [T],
    n: usize,
    k: usize,
    n_iter: u32,
    ranks: &mut R,
) -> Result<(), R::Error> {
    debug_assert!(q.len() >= n * k && col_max.len() >= k && col_sum.len() >= k);
    let batch_rows = ranks.batch_rows(n);
    if batch_rows == 0 || k == 0 {
        return Ok(());
    }
    let rounds = n_iter.max(1);
    for r in 0..rounds {
        sinkhorn_columns_over_ranks(q, col_max, col_sum, n, k, ranks)?;
        if r + 1 < rounds {
            sinkhorn_rows_of_batch(q, n, batch_rows, k);
        } else {
            sinkhorn_final_rows_inplace(q, n, k);
        }
    }
    Ok(())
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
    let Ok(()) = sinkhorn_targets_over_ranks(q, col_max, col_sum, n, k, n_iter, &mut WholeBatch);
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
