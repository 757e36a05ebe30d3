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
                fastmath::softmax_rows(s, t);
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

/// Attention of the `[CLS]` query only (the last block, whose other outputs nobody reads):
/// `out[n, d]` and `att[n, heads, t]` from `qkv[n, t, 3d]`.
pub fn forward_cls(
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
    out[..n * d]
        .par_chunks_mut(d)
        .zip(att[..n * heads * t].par_chunks_mut(heads * t))
        .zip(qkv[..n * t * row].par_chunks(t * row))
        .for_each(|((o, a), x)| {
            for h in 0..heads {
                let q = &x[h * hd..(h + 1) * hd];
                let s = &mut a[h * t..(h + 1) * t];
                for (j, sj) in s.iter_mut().enumerate() {
                    let k = &x[j * row + d + h * hd..][..hd];
                    *sj = scale * dot(q, k);
                }
                fastmath::softmax_rows(s, t);
                let o = &mut o[h * hd..(h + 1) * hd];
                o.fill(0.0);
                for (j, &pj) in s.iter().enumerate() {
                    let v = &x[j * row + 2 * d + h * hd..][..hd];
                    for (oc, &vc) in o.iter_mut().zip(v) {
                        *oc += pj * vc;
                    }
                }
            }
        });
}

/// Backward of [`forward_cls`]: `dqkv[n, t, 3d]` overwritten (q rows other than `[CLS]` get 0)
/// from `dout[n, d]`; `dp` is `[n, t]` scratch.
#[allow(clippy::too_many_arguments)]
pub fn backward_cls(
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
        .zip(dp[..n * t].par_chunks_mut(t))
        .zip(dout[..n * d].par_chunks(d))
        .zip(qkv[..n * t * row].par_chunks(t * row))
        .zip(att[..n * heads * t].par_chunks(heads * t))
        .for_each(|((((dx, dpv), go), x), a)| {
            dx.fill(0.0);
            for h in 0..heads {
                let p = &a[h * t..(h + 1) * t];
                let go = &go[h * hd..(h + 1) * hd];
                let mut pdp = 0.0f32;
                for (j, (dpj, &pj)) in dpv.iter_mut().zip(p).enumerate() {
                    let v = &x[j * row + 2 * d + h * hd..][..hd];
                    *dpj = dot(go, v);
                    pdp += pj * *dpj;
                    let dv = &mut dx[j * row + 2 * d + h * hd..][..hd];
                    for (o, &g) in dv.iter_mut().zip(go) {
                        *o = pj * g;
                    }
                }
                let q = &x[h * hd..(h + 1) * hd];
                for (j, (&dpj, &pj)) in dpv.iter().zip(p).enumerate() {
                    let ds = scale * pj * (dpj - pdp);
                    let k = &x[j * row + d + h * hd..][..hd];
                    let (dq, rest) = dx.split_at_mut(j * row + d + h * hd);
                    for (o, &kc) in dq[h * hd..(h + 1) * hd].iter_mut().zip(k) {
                        *o += ds * kc;
                    }
                    for (o, &qc) in rest[..hd].iter_mut().zip(q) {
                        *o = ds * qc;
                    }
                }
            }
        });
}

/// Dot product in eight fixed lanes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinovmf_core::ops::{attention_backward, attention_forward};

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

    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
            / scale
    }

    #[test]
    fn attention_and_cls_attention_match_core_f64_rel_1e5() {
        let (n, t, d, heads) = (3, 17, 24, 3);
        let qkv = rnd(n * t * 3 * d, 1);
        let dout = rnd(n * t * d, 2);
        let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        let g64: Vec<f64> = dout.iter().map(|&x| x as f64).collect();
        let mut o64 = vec![0.0; n * t * d];
        let mut a64 = vec![0.0; n * heads * t * t];
        attention_forward(&mut o64, &mut a64, &q64, None, n, t, d, heads);
        let mut dq64 = vec![0.0; n * t * 3 * d];
        attention_backward(&mut dq64, &g64, &q64, &a64, n, t, d, heads);

        let mut o = vec![f32::NAN; n * t * d];
        let mut a = vec![f32::NAN; n * heads * t * t];
        forward(&mut o, &mut a, &qkv, n, t, d, heads);
        assert!(max_rel(&o, &o64) < 1e-5, "out");
        assert!(max_rel(&a, &a64) < 1e-5, "att");
        let mut dq = vec![f32::NAN; n * t * 3 * d];
        let mut dp = vec![0.0; n * t * t];
        backward(&mut dq, &mut dp, &dout, &qkv, &a, n, t, d, heads);
        assert!(max_rel(&dq, &dq64) < 1e-5, "dqkv");

        // [CLS] query only: core's full attention with the output gradient on query 0 only.
        let mut oc = vec![f32::NAN; n * d];
        let mut ac = vec![f32::NAN; n * heads * t];
        forward_cls(&mut oc, &mut ac, &qkv, n, t, d, heads);
        let o0: Vec<f64> = (0..n)
            .flat_map(|b| o64[b * t * d..b * t * d + d].to_vec())
            .collect();
        assert!(max_rel(&oc, &o0) < 1e-5, "cls out");
        let mut g0 = vec![0.0f64; n * t * d];
        let gc: Vec<f32> = rnd(n * d, 3);
        for b in 0..n {
            for c in 0..d {
                g0[b * t * d + c] = gc[b * d + c] as f64;
            }
        }
        attention_backward(&mut dq64, &g0, &q64, &a64, n, t, d, heads);
        let mut dqc = vec![f32::NAN; n * t * 3 * d];
        let mut dpc = vec![0.0; n * t];
        backward_cls(&mut dqc, &mut dpc, &gc, &qkv, &ac, n, t, d, heads);
        assert!(max_rel(&dqc, &dq64) < 1e-5, "cls dqkv");
    }
}
