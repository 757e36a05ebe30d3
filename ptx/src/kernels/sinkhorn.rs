//! Sinkhorn-Knopp teacher targets on the GPU (core's `sinkhorn`, which the kernel checks hold
//! them to): the teacher logits go into `q[n, k]` ([`sinkhorn_logits`]), then each round is one
//! [`sinkhorn_columns`] launch (columns to total `1/k`, in log space) and one [`sinkhorn_rows`]
//! launch (rows to total `1/n`; the last round writes each row's softmax, the targets).
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

/// One column round in place on `ln Q = q[n, k]`: thread `j` subtracts `LSE_i q[i, j] + ln k`
/// from its column (rows in order, as core's `sinkhorn_columns_inplace`).
pub fn sinkhorn_columns<B: Block>(b: &mut B, q: &mut [f32], n: usize, k: usize) {
    let ln_k = m::ln(k as f32);
    for_each_elem(b, k, |j| {
        let mut mx = f32::NEG_INFINITY;
        for i in 0..n {
            mx = mx.max(q[i * k + j]);
        }
        let mut s = 0.0f32;
        for i in 0..n {
            s += m::exp(q[i * k + j] - mx);
        }
        let c = mx + m::ln(s) + ln_k;
        for i in 0..n {
            q[i * k + j] -= c;
        }
    });
}

/// One row round in place, one block of [`WIDE_BLOCK`](super::WIDE_BLOCK) per row: subtracts
/// `LSE_j q[i, j] + ln n` (`last == 0`), or (`last != 0`, the final round times `n`) writes the
/// row's softmax `exp(q - LSE)`.
pub fn sinkhorn_rows<B: Block>(b: &mut B, q: &mut [f32], n: usize, k: usize, last: bool) {
    let row = b.dims().bid[0] as usize;
    let bdim = b.dims().bdim as usize;
    let ln_n = m::ln(n as f32);
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
