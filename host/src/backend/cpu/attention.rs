//! Multi-head self-attention on the `qkv` rows, one image per rayon task, one small GEMM per
//! (image, head) product (single-threaded inside the task). Layout as core's
//! `ops::attention`: token row `q | k | v`, head `h` at columns `h hd .. (h + 1) hd` of each.
use rayon::prelude::*;

use super::fastmath;
use super::gemm::{matmul_strided, View};

/// `out[n, t, d]` and the probabilities `att[n, heads, t, t]` from `qkv[n, t, 3d]`.
pub fn forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    n: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = 3 * d;
    out[..n * t * d]
        .par_chunks_mut(t * d)
        .zip(att[..n * heads * t * t].par_chunks_mut(heads * t * t))
        .zip(qkv[..n * t * row].par_chunks(t * row))
        .for_each(|((o, a), x)| {
            for h in 0..heads {
                let s = &mut a[h * t * t..(h + 1) * t * t];
                // S = scale Q K^T
                matmul_strided(
                    t,
                    t,
                    hd,
                    x,
                    View::rows(h * hd, row),
                    x,
                    View::t(d + h * hd, row),
                    s,
                    View::rows(0, t),
                    scale,
                    false,
                    false,
                );
                for r in s.chunks_exact_mut(t) {
                    fastmath::softmax_in_place(r);
                }
                // O_h = P V
                matmul_strided(
                    t,
                    hd,
                    t,
                    s,
                    View::rows(0, t),
                    x,
                    View::rows(2 * d + h * hd, row),
                    o,
                    View::rows(h * hd, d),
                    1.0,
                    false,
                    false,
                );
            }
        });
}

/// `dqkv[n, t, 3d]` (overwritten) from `dout[n, t, d]`; `dp` is `[n, t, t]` scratch.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dqkv: &mut [f32],
    dp: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    n: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = 3 * d;
    dqkv[..n * t * row]
        .par_chunks_mut(t * row)
        .zip(dp[..n * t * t].par_chunks_mut(t * t))
        .zip(dout[..n * t * d].par_chunks(t * d))
        .zip(qkv[..n * t * row].par_chunks(t * row))
        .zip(att[..n * heads * t * t].par_chunks(heads * t * t))
        .for_each(|((((dx, ds), go), x), a)| {
            for h in 0..heads {
                let p = &a[h * t * t..(h + 1) * t * t];
                // dP = dO V^T
                matmul_strided(
                    t,
                    t,
                    hd,
                    go,
                    View::rows(h * hd, d),
                    x,
                    View::t(2 * d + h * hd, row),
                    ds,
                    View::rows(0, t),
                    1.0,
                    false,
                    false,
                );
                // dV = P^T dO
                matmul_strided(
                    t,
                    hd,
                    t,
                    p,
                    View::t(0, t),
                    go,
                    View::rows(h * hd, d),
                    dx,
                    View::rows(2 * d + h * hd, row),
                    1.0,
                    false,
                    false,
                );
                // dS = P (dP - <dP, P>) (the 1/sqrt(hd) goes into the two products below)
                for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let mut dot = 0.0f32;
                    for (&g, &q) in dr.iter().zip(pr) {
                        dot += g * q;
                    }
                    for (g, &q) in dr.iter_mut().zip(pr) {
                        *g = q * (*g - dot);
                    }
                }
                // dQ = scale dS K
                matmul_strided(
                    t,
                    hd,
                    t,
                    ds,
                    View::rows(0, t),
                    x,
                    View::rows(d + h * hd, row),
                    dx,
                    View::rows(h * hd, row),
                    scale,
                    false,
                    false,
                );
                // dK = scale dS^T Q
                matmul_strided(
                    t,
                    hd,
                    t,
                    ds,
                    View::t(0, t),
                    x,
                    View::rows(h * hd, row),
                    dx,
                    View::rows(d + h * hd, row),
                    scale,
                    false,
                    false,
                );
            }
        });
}
