//! Row-parallel elementwise passes and the deterministic column reductions of the CPU backend.
//!
//! Every reduction over rows (bias and LayerNorm parameter gradients, position-embedding
//! gradients) runs over a FIXED partition of the rows into chunks of [`CHUNK_ROWS`]: each chunk
//! sums its rows in order into its own partial buffer (in parallel), then the partials are added
//! in chunk order. The result therefore depends only on the data, never on how rayon scheduled
//! the chunks or how many threads there are.
use rayon::prelude::*;

#[cfg(test)]
use dinovmf_core::ops::{layernorm_backward, layernorm_forward};

use super::fastmath;

/// Rows per chunk of every parallel row loop and every fixed-partition reduction.
pub const CHUNK_ROWS: usize = 32;

/// Number of chunks of `n` rows.
pub const fn n_chunks(n: usize) -> usize {
    n.div_ceil(CHUNK_ROWS)
}

/// LayerNorm forward, [`fastmath::layernorm_rows`] on chunks of rows in parallel (tested against
/// core's f64 reference below).
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
            fastmath::layernorm_rows(y, m, r, x, &gamma[..d], &beta[..d], eps);
        });
}

/// LayerNorm backward that ADDS the input gradient into `dx` (`dx += LN'(dy)`: the residual
/// stream's gradient) and accumulates `dgamma`, `dbeta` over a fixed partition
/// ([`fastmath::layernorm_backward_add_rows`] on chunks of rows in parallel; tested against
/// core's f64 reference below). `partials` is `[n_chunks(n), 2 d]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_add(
    dx: &mut [f32],
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
        .zip(partials[..nc * 2 * d].par_chunks_mut(2 * d))
        .zip(dy[..n * d].par_chunks(c * d))
        .zip(x[..n * d].par_chunks(c * d))
        .zip(mean[..n].par_chunks(c))
        .zip(rstd[..n].par_chunks(c))
        .for_each(|(((((dx, part), dy), x), m), r)| {
            part.fill(0.0);
            let (pg, pb) = part.split_at_mut(d);
            fastmath::layernorm_backward_add_rows(dx, pg, pb, dy, x, m, r, &gamma[..d]);
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

/// `pre += bias; act = gelu(pre)` on `[n, cols]`, and `dgelu = gelu'(pre)` when given.
pub fn bias_gelu(
    pre: &mut [f32],
    act: &mut [f32],
    dgelu: Option<&mut [f32]>,
    bias: &[f32],
    n: usize,
) {
    let cols = bias.len();
    let c = CHUNK_ROWS * cols;
    let pre = pre[..n * cols].par_chunks_mut(c);
    let act = act[..n * cols].par_chunks_mut(c);
    match dgelu {
        Some(dg) => pre
            .zip(act)
            .zip(dg[..n * cols].par_chunks_mut(c))
            .for_each(|((p, a), g)| fastmath::bias_gelu_rows(p, a, Some(g), bias)),
        None => pre
            .zip(act)
            .for_each(|(p, a)| fastmath::bias_gelu_rows(p, a, None, bias)),
    }
}

/// `d[i] *= dgelu[i]` on `n` elements (turns d act into d pre with the saved derivative).
pub fn mul_inplace(d: &mut [f32], dgelu: &[f32], n: usize) {
    const C: usize = 8192;
    d[..n]
        .par_chunks_mut(C)
        .zip(dgelu[..n].par_chunks(C))
        .for_each(|(d, g)| {
            for (a, &b) in d.iter_mut().zip(g) {
                *a *= b;
            }
        });
}

/// `out[img] = x[img] + scale[img] * (branch[img] + bias)` with `per` = `t * d` elements per
/// image and `bias` of length `d` (residual + drop path + the branch's bias, in one pass).
/// `scale = None` means 1 for every image (no drop path). The step runs it fused with the
/// LayerNorm that reads its output ([`residual_drop_layernorm`]); this one stays as what the
/// fused pass is tested against.
#[cfg(test)]
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

/// The LayerNorm that reads a residual's result, fused into [`residual_drop_layernorm`]: its
/// outputs `y[rows, d]`, `mean[rows]`, `rstd[rows]` and its parameters.
pub struct NormOut<'a> {
    pub y: &'a mut [f32],
    pub mean: &'a mut [f32],
    pub rstd: &'a mut [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// [`residual_drop`] and then [`layernorm_fwd`] of its output, in one pass over each row
/// ([`fastmath::residual_layernorm_rows`], parallel over images): `out` gets the residual
/// stream, `ln` its LayerNorm and statistics, to the bit what the two calls give.
#[allow(clippy::too_many_arguments)]
pub fn residual_drop_layernorm(
    out: &mut [f32],
    ln: NormOut<'_>,
    x: &[f32],
    branch: &[f32],
    bias: &[f32],
    scale: Option<&[f32]>,
    n_img: usize,
    per: usize,
) {
    let d = bias.len();
    let rows_per = per / d.max(1);
    let (gamma, beta, eps) = (&ln.gamma[..d], &ln.beta[..d], ln.eps);
    out[..n_img * per]
        .par_chunks_mut(per)
        .zip(ln.y[..n_img * per].par_chunks_mut(per))
        .zip(ln.mean[..n_img * rows_per].par_chunks_mut(rows_per))
        .zip(ln.rstd[..n_img * rows_per].par_chunks_mut(rows_per))
        .zip(x[..n_img * per].par_chunks(per))
        .zip(branch[..n_img * per].par_chunks(per))
        .enumerate()
        .for_each(|(i, (((((o, y), m), r), x), br))| {
            let s = scale.map_or(1.0, |s| s[i]);
            fastmath::residual_layernorm_rows(o, y, m, r, x, br, bias, s, gamma, beta, eps);
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

/// `y.fill(0)` in parallel.
pub fn zero(y: &mut [f32]) {
    y.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn layernorm_and_column_sums_match_core_f64_rel_1e5() {
        // 100 rows: several chunks and a ragged last one.
        let (n, d) = (100, 24);
        let x: Vec<f32> = rnd(n * d, 1).iter().map(|v| 3.0 * v + 0.5).collect();
        let gamma: Vec<f32> = rnd(d, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
        let beta = rnd(d, 3);
        let dy = rnd(n * d, 4);
        let resid = rnd(n * d, 5);
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (x64, g64, b64, dy64) = (f(&x), f(&gamma), f(&beta), f(&dy));
        let mut y64 = vec![0.0; n * d];
        let (mut m64, mut r64) = (vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut y64, &mut m64, &mut r64, &x64, &g64, &b64, n, d, 1e-6);
        let mut dx64 = vec![0.0; n * d];
        let (mut dg64, mut db64) = (vec![0.0; d], vec![0.0; d]);
        layernorm_backward(
            &mut dx64, &mut dg64, &mut db64, &dy64, &x64, &m64, &r64, &g64, n, d,
        );

        let mut y = vec![0.0; n * d];
        let (mut m, mut r) = (vec![0.0; n], vec![0.0; n]);
        layernorm_fwd(&mut y, &mut m, &mut r, &x, &gamma, &beta, n, d, 1e-6);
        let mut dx = resid.clone();
        let (mut dg, mut db) = (vec![0.5f32; d], vec![-0.5f32; d]);
        let mut part = vec![0.0; n_chunks(n) * 2 * d];
        layernorm_bwd_add(
            &mut dx, &mut dg, &mut db, &dy, &x, &m, &r, &gamma, &mut part, n, d,
        );
        let close = |a: f32, b: f64, scale: f64| (a as f64 - b).abs() <= 1e-5 * scale;
        for i in 0..n * d {
            assert!(close(y[i], y64[i], 3.0), "y[{i}]");
            assert!(close(dx[i], dx64[i] + resid[i] as f64, 3.0), "dx[{i}]");
        }
        for j in 0..d {
            assert!(close(dg[j], dg64[j] + 0.5, 10.0), "dgamma[{j}]");
            assert!(close(db[j], db64[j] - 0.5, 10.0), "dbeta[{j}]");
        }

        let mut cs = vec![1.0f32; d];
        colsum_add(&mut cs, &dy, n, d, &mut part);
        for j in 0..d {
            let want: f64 = 1.0 + (0..n).map(|i| dy64[i * d + j]).sum::<f64>();
            assert!(close(cs[j], want, 10.0), "colsum[{j}]");
        }
    }

    /// `[out, y, mean, rstd]` of the residual and the LayerNorm of its result: fused
    /// ([`residual_drop_layernorm`]) or as the two passes it replaces.
    #[allow(clippy::too_many_arguments)]
    fn residual_then_norm(
        fuse: bool,
        x: &[f32],
        br: &[f32],
        bias: &[f32],
        scale: Option<&[f32]>,
        gamma: &[f32],
        beta: &[f32],
        n_img: usize,
        per: usize,
    ) -> [Vec<f32>; 4] {
        let (d, rows) = (bias.len(), n_img * per / bias.len());
        let mut out = vec![f32::NAN; n_img * per];
        let (mut y, mut m, mut r) = (vec![f32::NAN; rows * d], vec![0.0; rows], vec![0.0; rows]);
        if fuse {
            let ln = NormOut {
                y: &mut y,
                mean: &mut m,
                rstd: &mut r,
                gamma,
                beta,
                eps: 1e-6,
            };
            residual_drop_layernorm(&mut out, ln, x, br, bias, scale, n_img, per);
        } else {
            residual_drop(&mut out, x, br, bias, scale, n_img, per);
            layernorm_fwd(&mut y, &mut m, &mut r, &out, gamma, beta, rows, d, 1e-6);
        }
        [out, y, m, r]
    }

    #[test]
    fn fused_residual_layernorm_is_bit_identical_to_the_two_passes() {
        // Ragged sizes: widths that are not multiples of the eight lanes (or of 16), one row
        // per image (the last block's [CLS] rows) and many, drop path on and off.
        let mut seed = 7;
        for &(n_img, t, d) in &[
            (1, 1, 1),
            (3, 1, 24),
            (5, 17, 7),
            (2, 65, 96),
            (7, 5, 33),
            (4, 10, 129),
        ] {
            seed += 10;
            let per = t * d;
            let x: Vec<f32> = rnd(n_img * per, seed).iter().map(|v| 4.0 * v).collect();
            let br = rnd(n_img * per, seed + 1);
            let bias = rnd(d, seed + 2);
            let gamma: Vec<f32> = rnd(d, seed + 3).iter().map(|v| 1.0 + 0.5 * v).collect();
            let beta = rnd(d, seed + 4);
            let scale: Vec<f32> = (0..n_img).map(|i| [0.0, 1.25, 1.0][i % 3]).collect();
            for sc in [None, Some(&scale[..])] {
                let a = residual_then_norm(false, &x, &br, &bias, sc, &gamma, &beta, n_img, per);
                let b = residual_then_norm(true, &x, &br, &bias, sc, &gamma, &beta, n_img, per);
                for (k, (u, f)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        u.iter().all(|v| v.is_finite()),
                        "{n_img}x{t}x{d} output {k}"
                    );
                    let (ub, fb): (Vec<u32>, Vec<u32>) = (
                        u.iter().map(|v| v.to_bits()).collect(),
                        f.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert!(ub == fb, "{n_img}x{t}x{d} scale {sc:?}: output {k} differs");
                }
            }
        }
    }

    #[test]
    fn fused_residual_layernorm_matches_f64_rel_1e5() {
        let (n_img, t, d) = (6, 9, 40);
        let per = t * d;
        let x: Vec<f32> = rnd(n_img * per, 41).iter().map(|v| 3.0 * v + 0.5).collect();
        let br = rnd(n_img * per, 42);
        let bias = rnd(d, 43);
        let gamma: Vec<f32> = rnd(d, 44).iter().map(|v| 1.0 + 0.3 * v).collect();
        let beta = rnd(d, 45);
        let scale = [1.0f32, 0.0, 1.5, 1.5, 0.0, 1.0];
        let [out, y, m, r] = residual_then_norm(
            true,
            &x,
            &br,
            &bias,
            Some(&scale),
            &gamma,
            &beta,
            n_img,
            per,
        );
        let rows = n_img * t;
        let mut out64 = vec![0.0f64; rows * d];
        for i in 0..rows * d {
            let s = scale[i / per] as f64;
            out64[i] = x[i] as f64 + s * (br[i] as f64 + bias[i % d] as f64);
        }
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let mut y64 = vec![0.0; rows * d];
        let (mut m64, mut r64) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(
            &mut y64,
            &mut m64,
            &mut r64,
            &out64,
            &f(&gamma),
            &f(&beta),
            rows,
            d,
            1e-6,
        );
        let close = |a: f32, b: f64, scale: f64| (a as f64 - b).abs() <= 1e-5 * scale;
        for i in 0..rows * d {
            assert!(close(out[i], out64[i], 1.0 + out64[i].abs()), "out[{i}]");
            assert!(close(y[i], y64[i], 3.0), "y[{i}]");
        }
        for i in 0..rows {
            assert!(close(m[i], m64[i], 1.0), "mean[{i}]");
            assert!(close(r[i], r64[i], r64[i]), "rstd[{i}]");
        }
    }

    #[test]
    fn residual_drop_and_scale_match_definition() {
        let (n, t, d) = (3, 5, 4);
        let x = rnd(n * t * d, 1);
        let br = rnd(n * t * d, 2);
        let bias = rnd(d, 3);
        let s = [0.0f32, 1.25, 1.0];
        let mut out = vec![0.0; n * t * d];
        residual_drop(&mut out, &x, &br, &bias, Some(&s), n, t * d);
        let mut sc = vec![0.0; n * t * d];
        scale_images(&mut sc, &x, Some(&s), n, t * d);
        for i in 0..n * t * d {
            let img = i / (t * d);
            assert_eq!(out[i], x[i] + s[img] * (br[i] + bias[i % d]));
            assert_eq!(sc[i], s[img] * x[i]);
        }
    }
}
