//! Row kernels, one warp per row ([`ROW_BLOCK`](super::ROW_BLOCK) threads = 4 rows per block,
//! `ceil(rows / 4)` blocks): LayerNorm, softmax (attention rows), L2 normalisation.
//! Lane `l` of a row's warp handles columns `l, l + 32, ...`; row sums are warp butterflies.
use super::for_each_elem;
use crate::block::{Block, Op};
use crate::math as m;

#[derive(Clone, Copy, Default)]
struct Acc {
    a: f32,
    b: f32,
}

/// Row of thread `t` (its warp) and its lane.
#[inline(always)]
fn row_lane(r0: usize, t: u32) -> (usize, usize) {
    (r0 + t as usize / 32, t as usize % 32)
}

#[inline(always)]
fn first_row<B: Block>(b: &B) -> usize {
    let dm = b.dims();
    dm.bid[0] as usize * dm.warps() as usize
}

/// Sum over the lane's columns of `f(col)`.
#[inline(always)]
fn lane_sum(lane: usize, d: usize, mut f: impl FnMut(usize) -> f32) -> f32 {
    let mut acc = 0.0;
    let mut i = lane;
    while i < d {
        acc += f(i);
        i += 32;
    }
    acc
}

/// LayerNorm forward (`core::ops::layernorm_forward`): `y`, `mean[n]`, `rstd[n]` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<B: Block>(
    b: &mut B,
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
    let r0 = first_row(b);
    let inv_d = 1.0 / d as f32;
    let mut l = b.local(Acc::default());
    b.each(&mut l, |t, s, _| {
        let (r, lane) = row_lane(r0, t);
        if r < n {
            s.a = lane_sum(lane, d, |i| x[r * d + i]);
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |s| &mut s.a);
    b.each(&mut l, |t, s, _| {
        let (r, lane) = row_lane(r0, t);
        if r < n {
            let m = s.a * inv_d;
            s.a = m;
            // Two-pass variance, as the reference.
            s.b = lane_sum(lane, d, |i| {
                let c = x[r * d + i] - m;
                c * c
            });
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |s| &mut s.b);
    b.each(&mut l, |t, s, _| {
        let (r, lane) = row_lane(r0, t);
        if r < n {
            let m = s.a;
            let rs = 1.0 / m::sqrt(s.b * inv_d + eps);
            let mut i = lane;
            while i < d {
                y[r * d + i] = (x[r * d + i] - m) * rs * gamma[i] + beta[i];
                i += 32;
            }
            if lane == 0 {
                mean[r] = m;
                rstd[r] = rs;
            }
        }
    });
}

/// LayerNorm backward to the input: `dx = rstd (g - mean(g) - xh mean(g xh))`, `g = dy gamma`
/// (overwrites `dx`). The parameter gradients are [`layernorm_backward_params`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_dx<B: Block>(
    b: &mut B,
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    n: usize,
    d: usize,
) {
    let r0 = first_row(b);
    let inv_d = 1.0 / d as f32;
    let mut l = b.local(Acc::default());
    b.each(&mut l, |t, s, _| {
        let (r, lane) = row_lane(r0, t);
        if r < n {
            let (m, rs) = (mean[r], rstd[r]);
            let (mut sg, mut sgx) = (0.0, 0.0);
            let mut i = lane;
            while i < d {
                let xh = (x[r * d + i] - m) * rs;
                let g = dy[r * d + i] * gamma[i];
                sg += g;
                sgx += g * xh;
                i += 32;
            }
            s.a = sg;
            s.b = sgx;
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |s| &mut s.a);
    b.warp_reduce(&mut l, Op::Sum, |s| &mut s.b);
    b.each(&mut l, |t, s, _| {
        let (r, lane) = row_lane(r0, t);
        if r < n {
            let (m, rs) = (mean[r], rstd[r]);
            let (mg, mgx) = (s.a * inv_d, s.b * inv_d);
            let mut i = lane;
            while i < d {
                let xh = (x[r * d + i] - m) * rs;
                dx[r * d + i] = rs * (dy[r * d + i] * gamma[i] - mg - xh * mgx);
                i += 32;
            }
        }
    });
}

/// `dgamma += Σ_rows dy xh`, `dbeta += Σ_rows dy` (accumulate, rows in order as the reference);
/// one thread per column, `ceil(d / 256)` blocks of [`EW_BLOCK`](super::EW_BLOCK).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_params<B: Block>(
    b: &mut B,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    d: usize,
) {
    for_each_elem(b, d, |i| {
        let (mut ag, mut ab) = (dgamma[i], dbeta[i]);
        for r in 0..n {
            let xh = (x[r * d + i] - mean[r]) * rstd[r];
            ag += dy[r * d + i] * xh;
            ab += dy[r * d + i];
        }
        dgamma[i] = ag;
        dbeta[i] = ab;
    });
}

/// Row softmax in place of `s[n_rows, t]` with the scores `scale s + mask`: `mask`, when given,
/// is `[n_rows / rows_per_mask, t]` and row `r` adds mask row `r / rows_per_mask` (attention:
/// scores `[B, H, T, T]`, mask `[B, T]`, `rows_per_mask = H T`). A row that is all `-inf` becomes
/// zeros (as `core::ops::softmax_in_place`).
#[allow(clippy::too_many_arguments)]
pub fn softmax_rows<B: Block>(
    b: &mut B,
    s: &mut [f32],
    mask: Option<&[f32]>,
    n_rows: usize,
    t: usize,
    rows_per_mask: usize,
    scale: f32,
) {
    let r0 = first_row(b);
    let score = |s: &[f32], r: usize, j: usize| -> f32 {
        let v = s[r * t + j] * scale;
        match mask {
            Some(m) => v + m[(r / rows_per_mask) * t + j],
            None => v,
        }
    };
    let mut l = b.local(Acc {
        a: f32::NEG_INFINITY,
        b: 0.0,
    });
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n_rows {
            let mut j = lane;
            while j < t {
                st.a = Op::Max.apply(st.a, score(s, r, j));
                j += 32;
            }
        }
    });
    b.warp_reduce(&mut l, Op::Max, |st| &mut st.a);
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n_rows && st.a != f32::NEG_INFINITY {
            let mut j = lane;
            let mut sum = 0.0;
            while j < t {
                let e = m::exp(score(s, r, j) - st.a);
                s[r * t + j] = e;
                sum += e;
                j += 32;
            }
            st.b = sum;
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |st| &mut st.b);
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n_rows {
            let inv = if st.a == f32::NEG_INFINITY {
                0.0
            } else {
                1.0 / st.b
            };
            let mut j = lane;
            while j < t {
                s[r * t + j] = if inv == 0.0 { 0.0 } else { s[r * t + j] * inv };
                j += 32;
            }
        }
    });
}

/// Softmax backward in place: `dp <- scale p (dp - <dp, p>)` per row of `[n_rows, t]` (with
/// `scale = 1` this is `core::ops::softmax_backward`; attention passes `1 / sqrt(hd)`).
pub fn softmax_backward_rows<B: Block>(
    b: &mut B,
    dp: &mut [f32],
    p: &[f32],
    n_rows: usize,
    t: usize,
    scale: f32,
) {
    let r0 = first_row(b);
    let mut l = b.local(Acc::default());
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n_rows {
            st.a = lane_sum(lane, t, |j| p[r * t + j] * dp[r * t + j]);
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |st| &mut st.a);
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n_rows {
            let mut j = lane;
            while j < t {
                let i = r * t + j;
                dp[i] = p[i] * (dp[i] - st.a) * scale;
                j += 32;
            }
        }
    });
}

/// `y[r] = x[r] / max(||x[r]||, eps)`, `norm[r] = ||x[r]||` (`core::ops::l2norm_forward`; with
/// `eps = 1e-12` also the head output y and the prototype directions of the weight-normalised
/// last layer).
pub fn l2norm_forward<B: Block>(
    b: &mut B,
    y: &mut [f32],
    norm: &mut [f32],
    x: &[f32],
    n: usize,
    d: usize,
    eps: f32,
) {
    let r0 = first_row(b);
    let mut l = b.local(Acc::default());
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n {
            st.a = lane_sum(lane, d, |i| x[r * d + i] * x[r * d + i]);
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |st| &mut st.a);
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n {
            let nr = m::sqrt(st.a);
            let inv = 1.0 / nr.max(eps);
            let mut i = lane;
            while i < d {
                y[r * d + i] = x[r * d + i] * inv;
                i += 32;
            }
            if lane == 0 {
                norm[r] = nr;
            }
        }
    });
}

/// Backward of [`l2norm_forward`]: `dx = (dy - y <y, dy>) / ||x||`, or `dy / eps` where the norm
/// was clamped (overwrites `dx`).
#[allow(clippy::too_many_arguments)]
pub fn l2norm_backward<B: Block>(
    b: &mut B,
    dx: &mut [f32],
    dy: &[f32],
    y: &[f32],
    norm: &[f32],
    n: usize,
    d: usize,
    eps: f32,
) {
    let r0 = first_row(b);
    let mut l = b.local(Acc::default());
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n {
            st.a = lane_sum(lane, d, |i| y[r * d + i] * dy[r * d + i]);
        }
    });
    b.warp_reduce(&mut l, Op::Sum, |st| &mut st.a);
    b.each(&mut l, |th, st, _| {
        let (r, lane) = row_lane(r0, th);
        if r < n {
            let clamped = norm[r] <= eps;
            let inv = if clamped { 1.0 / eps } else { 1.0 / norm[r] };
            let mut i = lane;
            while i < d {
                let k = r * d + i;
                dx[k] = if clamped {
                    dy[k] * inv
                } else {
                    (dy[k] - y[k] * st.a) * inv
                };
                i += 32;
            }
        }
    });
}
