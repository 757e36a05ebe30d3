//! Sinkhorn-Knopp teacher targets on the GPU (core's `sinkhorn`, which the kernel checks hold
//! them to): the teacher logits go into `q[n, k]` ([`sinkhorn_logits`]), then each round is one
//! [`sinkhorn_columns`] launch (columns to total `1/k`, in log space) and one [`sinkhorn_rows`]
//! launch (rows to total `1/n`; the last round writes each row's softmax, the targets).
//!
//! With the batch's rows split over data-parallel ranks a column round is three launches, with
//! the host's all-reduces between them (core's `sinkhorn_columns_over_ranks`):
//! [`sinkhorn_column_max`] (then the maximum over ranks), [`sinkhorn_column_sums`] (then the sum
//! over ranks), [`sinkhorn_column_scale`]; the row rounds take the whole batch's row count.
//! The fused column round and the three pieces share their arithmetic, so on one rank they give
//! the same bits.
use super::for_each_elem;
use crate::block::{block_reduce_lse, Block, Lse};
use crate::math as m;

/// `q[i, j] = scale[j] dots[i, j] + bias[j]`, one thread per element.
pub fn sinkhorn_logits<B: Block>(
    b: &mut B,
    q: &mut [f32],
    dots: &[f32],
    scale: &[f32],
    bias: &[f32],
    n: usize,
    k: usize,
) {
    for_each_elem(b, n * k, |i| {
        let j = i % k;
        q[i] = scale[j] * dots[i] + bias[j];
    });
}

/// Column `j`'s maximum over the `n` rows of `q[n, k]`.
#[inline(always)]
fn column_max(q: &[f32], n: usize, k: usize, j: usize) -> f32 {
    let mut mx = f32::NEG_INFINITY;
    for i in 0..n {
        mx = mx.max(q[i * k + j]);
    }
    mx
}

/// Column `j`'s `sum_i exp(q[i, j] - mx)`, rows in order.
#[inline(always)]
fn column_sum(q: &[f32], n: usize, k: usize, j: usize, mx: f32) -> f32 {
    let mut s = 0.0f32;
    for i in 0..n {
        s += m::exp(q[i * k + j] - mx);
    }
    s
}

/// What a column round subtracts from column `j`: its log-sum-exp `mx + ln s`, plus `ln k`.
#[inline(always)]
fn column_shift(mx: f32, s: f32, ln_k: f32) -> f32 {
    mx + m::ln(s) + ln_k
}

/// One column round in place on `ln Q = q[n, k]`: thread `j` subtracts `LSE_i q[i, j] + ln k`
/// from its column (rows in order, as core's `sinkhorn_columns_inplace`).
pub fn sinkhorn_columns<B: Block>(b: &mut B, q: &mut [f32], n: usize, k: usize) {
    let ln_k = m::ln(k as f32);
    for_each_elem(b, k, |j| {
        let mx = column_max(q, n, k, j);
        let c = column_shift(mx, column_sum(q, n, k, j, mx), ln_k);
        for i in 0..n {
            q[i * k + j] -= c;
        }
    });
}

/// A split column round's first piece: `col_max[j]` = column `j`'s maximum over the `n` rows
/// here (core's `sinkhorn_column_max`), one thread per column.
pub fn sinkhorn_column_max<B: Block>(
    b: &mut B,
    col_max: &mut [f32],
    q: &[f32],
    n: usize,
    k: usize,
) {
    for_each_elem(b, k, |j| col_max[j] = column_max(q, n, k, j));
}

/// Its second piece: `col_sum[j] = sum_i exp(q[i, j] - col_max[j])` over the `n` rows here, with
/// `col_max` the maximum over the whole batch (core's `sinkhorn_column_sums`).
pub fn sinkhorn_column_sums<B: Block>(
    b: &mut B,
    col_sum: &mut [f32],
    q: &[f32],
    col_max: &[f32],
    n: usize,
    k: usize,
) {
    for_each_elem(b, k, |j| col_sum[j] = column_sum(q, n, k, j, col_max[j]));
}

/// Its last piece: `q[i, j] -= col_max[j] + ln col_sum[j] + ln k` (the whole batch's maximum and
/// sums), one thread per element (core's `sinkhorn_column_scale`, which leaves `col_max` alone
/// here).
pub fn sinkhorn_column_scale<B: Block>(
    b: &mut B,
    q: &mut [f32],
    col_max: &[f32],
    col_sum: &[f32],
    n: usize,
    k: usize,
) {
    let ln_k = m::ln(k as f32);
    for_each_elem(b, n * k, |i| {
        let j = i % k;
        q[i] -= column_shift(col_max[j], col_sum[j], ln_k);
    });
}

/// One row round in place on the `n` rows here of a batch of `batch_rows` rows (`n` on one
/// rank), one block of [`WIDE_BLOCK`](super::WIDE_BLOCK) per row: subtracts
/// `LSE_j q[i, j] + ln batch_rows` (`last == 0`), or (`last != 0`, the final round times the
/// row count) writes the row's softmax `exp(q - LSE)`.
pub fn sinkhorn_rows<B: Block>(
    b: &mut B,
    q: &mut [f32],
    n: usize,
    batch_rows: usize,
    k: usize,
    last: bool,
) {
    let row = b.dims().bid[0] as usize;
    let bdim = b.dims().bdim as usize;
    let ln_n = m::ln(batch_rows as f32);
    let mut l = b.local(Lse::EMPTY);
    b.each(&mut l, |t, st, _| {
        if row < n {
            let mut j = t as usize;
            while j < k {
                st.push(q[row * k + j]);
                j += bdim;
            }
        }
    });
    block_reduce_lse(b, &mut l, |st| st, 0);
    b.each(&mut l, |t, st, _| {
        if row < n {
            let lse = st.value();
            let mut j = t as usize;
            while j < k {
                let x = &mut q[row * k + j];
                *x = if last {
                    m::exp(*x - lse)
                } else {
                    *x - lse - ln_n
                };
                j += bdim;
            }
        }
    });
}
