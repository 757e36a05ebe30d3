//! Row-parallel elementwise passes and the deterministic column reductions of the CPU backend.
//!
//! Every reduction over rows (bias and LayerNorm parameter gradients, position-embedding
//! gradients) runs over a FIXED partition of the rows into chunks of [`CHUNK_ROWS`]: each chunk
//! sums its rows in order into its own partial buffer (in parallel), then the partials are added
//! in chunk order. The result therefore depends only on the data, never on how rayon scheduled
//! the chunks or how many threads there are.
use rayon::prelude::*;

use dinovmf_core::ops::{layernorm_backward, layernorm_forward};

use super::fastmath;

/// Rows per chunk of every parallel row loop and every fixed-partition reduction.
pub const CHUNK_ROWS: usize = 32;

/// Number of chunks of `n` rows.
pub const fn n_chunks(n: usize) -> usize {
    n.div_ceil(CHUNK_ROWS)
}

/// LayerNorm forward, core's reference row loop run on chunks of rows in parallel.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    n: usize,
    d: usize,
    eps: f32,
) {
    let c = CHUNK_ROWS;
    y[..n * d]
        .par_chunks_mut(c * d)
        .zip(mean[..n].par_chunks_mut(c))
        .zip(rstd[..n].par_chunks_mut(c))
        .zip(x[..n * d].par_chunks(c * d))
        .for_each(|(((y, m), r), x)| {
            layernorm_forward(y, m, r, x, gamma, beta, m.len(), d, eps);
        });
}

/// LayerNorm backward that ADDS the input gradient into `dx` (`dx += LN'(dy)`: the residual
/// stream's gradient) and accumulates `dgamma`, `dbeta` over a fixed partition.
/// `tmp` is `[n, d]` scratch, `partials` `[n_chunks(n), 2 d]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_add(
    dx: &mut [f32],
    tmp: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    partials: &mut [f32],
    n: usize,
    d: usize,
) {
    let c = CHUNK_ROWS;
    let nc = n_chunks(n);
    dx[..n * d]
        .par_chunks_mut(c * d)
        .zip(tmp[..n * d].par_chunks_mut(c * d))
        .zip(partials[..nc * 2 * d].par_chunks_mut(2 * d))
        .zip(dy[..n * d].par_chunks(c * d))
        .zip(x[..n * d].par_chunks(c * d))
        .zip(mean[..n].par_chunks(c))
        .zip(rstd[..n].par_chunks(c))
        .for_each(|((((((dx, t), part), dy), x), m), r)| {
            let rows = m.len();
            part.fill(0.0);
            let (pg, pb) = part.split_at_mut(d);
            layernorm_backward(t, pg, pb, dy, x, m, r, gamma, rows, d);
            for (a, &b) in dx.iter_mut().zip(t.iter()) {
                *a += b;
            }
        });
    sum_partials_into(dgamma, &partials[..nc * 2 * d], 2 * d, 0, d);
    sum_partials_into(dbeta, &partials[..nc * 2 * d], 2 * d, d, d);
}

/// `out[j] += Σ_c partials[c * stride + at + j]` in chunk order.
fn sum_partials_into(out: &mut [f32], partials: &[f32], stride: usize, at: usize, len: usize) {
    for p in partials.chunks_exact(stride) {
        for (o, &v) in out[..len].iter_mut().zip(&p[at..at + len]) {
            *o += v;
        }
    }
}

/// `out[cols] += Σ_rows x[n, cols]` over a fixed partition; `partials` is
/// `[n_chunks(n), cols]`.
pub fn colsum_add(out: &mut [f32], x: &[f32], n: usize, cols: usize, partials: &mut [f32]) {
    let c = CHUNK_ROWS;
    let nc = n_chunks(n);
    partials[..nc * cols]
        .par_chunks_mut(cols)
        .zip(x[..n * cols].par_chunks(c * cols))
        .for_each(|(p, x)| {
            p.copy_from_slice(&x[..cols]);
            for row in x.chunks_exact(cols).skip(1) {
                for (a, &b) in p.iter_mut().zip(row) {
                    *a += b;
                }
            }
        });
    sum_partials_into(out, &partials[..nc * cols], cols, 0, cols);
}

/// `y[r, :] = bias` for `n` rows.
pub fn fill_rows(y: &mut [f32], bias: &[f32], n: usize) {
    let cols = bias.len();
    y[..n * cols]
        .par_chunks_mut(CHUNK_ROWS * cols)
        .for_each(|y| {
            for row in y.chunks_exact_mut(cols) {
                row.copy_from_slice(bias);
            }
        });
}

/// `pre += bias; act = gelu(pre)` on `[n, cols]`.
pub fn bias_gelu(pre: &mut [f32], act: &mut [f32], bias: &[f32], n: usize) {
    let cols = bias.len();
    pre[..n * cols]
        .par_chunks_mut(CHUNK_ROWS * cols)
        .zip(act[..n * cols].par_chunks_mut(CHUNK_ROWS * cols))
        .for_each(|(p, a)| {
            for (pr, ar) in p.chunks_exact_mut(cols).zip(a.chunks_exact_mut(cols)) {
                for ((x, y), &b) in pr.iter_mut().zip(ar.iter_mut()).zip(bias) {
                    *x += b;
                    *y = fastmath::gelu(*x);
                }
            }
        });
}

/// `d[i] *= gelu'(pre[i])` on `n` elements (turns d act into d pre).
pub fn gelu_bwd_inplace(d: &mut [f32], pre: &[f32], n: usize) {
    const C: usize = 8192;
    d[..n]
        .par_chunks_mut(C)
        .zip(pre[..n].par_chunks(C))
        .for_each(|(d, p)| {
            for (g, &x) in d.iter_mut().zip(p) {
                *g *= fastmath::gelu_grad(x);
            }
        });
}

/// `out[img] = x[img] + scale[img] * (branch[img] + bias)` with `per` = `t * d` elements per
/// image and `bias` of length `d` (residual + drop path + the branch's bias, in one pass).
/// `scale = None` means 1 for every image (no drop path).
pub fn residual_drop(
    out: &mut [f32],
    x: &[f32],
    branch: &[f32],
    bias: &[f32],
    scale: Option<&[f32]>,
    n_img: usize,
    per: usize,
) {
    let d = bias.len();
    out[..n_img * per]
        .par_chunks_mut(per)
        .zip(x[..n_img * per].par_chunks(per))
        .zip(branch[..n_img * per].par_chunks(per))
        .enumerate()
        .for_each(|(i, ((o, x), br))| {
            let s = scale.map_or(1.0, |s| s[i]);
            for ((or, xr), brr) in o
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(br.chunks_exact(d))
            {
                for (((o, &x), &b), &bb) in or.iter_mut().zip(xr).zip(brr).zip(bias) {
                    *o = x + s * (b + bb);
                }
            }
        });
}

/// `out[img] = scale[img] * dx[img]` (drop-path backward; `None` = copy).
pub fn scale_images(out: &mut [f32], dx: &[f32], scale: Option<&[f32]>, n_img: usize, per: usize) {
    out[..n_img * per]
        .par_chunks_mut(per)
        .zip(dx[..n_img * per].par_chunks(per))
        .enumerate()
        .for_each(|(i, (o, x))| {
            let s = scale.map_or(1.0, |s| s[i]);
            for (o, &x) in o.iter_mut().zip(x) {
                *o = s * x;
            }
        });
}

/// `y[i] += x[i]` on `n` elements.
pub fn add_inplace(y: &mut [f32], x: &[f32], n: usize) {
    const C: usize = 16384;
    y[..n]
        .par_chunks_mut(C)
        .zip(x[..n].par_chunks(C))
        .for_each(|(y, x)| {
            for (a, &b) in y.iter_mut().zip(x) {
                *a += b;
            }
        });
}

/// `y.fill(0)` in parallel.
pub fn zero(y: &mut [f32]) {
    y.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
}
