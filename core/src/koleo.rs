//! KoLeo on features (method.md, "Anti-collapse tools"; DINOv2): on the L2-normalised rows
//! `x_i = f_i / ||f_i||` of one view's `[CLS]` backbone features `f[n, d]`,
//! `L = -(1/n) sum_i ln(d_i + 1e-8)`, `d_i = min_{j != i} ||x_i - x_j||`.
//! It spreads the batch over the sphere and so forbids the constant solution. The trainer adds
//! `lambda * L` per global view.
//!
//! The gradient treats each row's nearest neighbour as fixed (the minimum is piecewise smooth):
//! with `u = (x_i - x_j) / d_i`, `dL/dx_i += -u / (n (d_i + 1e-8))` and `dL/dx_j += u / (...)`,
//! then back through the normalisation. A pair at distance 0 (duplicate rows) has no direction
//! and contributes no gradient.
use crate::ops::{l2norm_row_backward, l2norm_row_inplace};
use crate::real::Real;

/// The `1e-8` inside the logarithm.
pub const KOLEO_EPS: f64 = 1e-8;
/// The normalisation's eps (`F.normalize`).
const NORM_EPS: f64 = 1e-12;

/// The nearest other row of unit row `i` of `x[n, d]` (smallest squared distance, first index
/// on ties) and that distance; `None` when `n < 2`.
pub fn nearest_row<T: Real>(x: &[T], i: usize, n: usize, d: usize) -> Option<(usize, T)> {
    let xi = &x[i * d..(i + 1) * d];
    let mut best: Option<(usize, T)> = None;
    for j in (0..n).filter(|&j| j != i) {
        let mut s = T::ZERO;
        for (&a, &b) in xi.iter().zip(&x[j * d..(j + 1) * d]) {
            let t = a - b;
            s += t * t;
        }
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((j, s));
        }
    }
    best.map(|(j, s)| (j, s.sqrt()))
}

/// Scratch of [`koleo_forward_backward`] for `n` rows of `d`: `2 n d + n + d`.
pub const fn koleo_scratch_len(n: usize, d: usize) -> usize {
    2 * n * d + n + d
}

/// KoLeo of the features `f[n, d]` (one view): returns `L` (unweighted; 0 when `n < 2`) and,
/// with `grad = Some((df, weight))`, ADDS `weight * dL/df` into `df[n, d]`. `scratch` has
/// [`koleo_scratch_len`] elements.
pub fn koleo_forward_backward<T: Real>(
    f: &[T],
    n: usize,
    d: usize,
    scratch: &mut [T],
    grad: Option<(&mut [T], T)>,
) -> T {
    if n < 2 || d == 0 {
        return T::ZERO;
    }
    let (x, rest) = scratch.split_at_mut(n * d);
    let (dx, rest) = rest.split_at_mut(n * d);
    let (norms, rest) = rest.split_at_mut(n);
    let row = &mut rest[..d];
    let norm_eps = T::from_f64(NORM_EPS);
    x.copy_from_slice(&f[..n * d]);
    for (xr, nr) in x.chunks_exact_mut(d).zip(norms.iter_mut()) {
        *nr = l2norm_row_inplace(xr, norm_eps);
    }
    dx.fill(T::ZERO);
    let eps = T::from_f64(KOLEO_EPS);
    let inv_n = T::ONE / T::from_usize(n);
    let mut loss = T::ZERO;
    for i in 0..n {
        let Some((j, dist)) = nearest_row(x, i, n, d) else {
            continue;
        };
        loss -= (dist + eps).ln();
        if dist > T::ZERO {
            let c = inv_n / ((dist + eps) * dist);
            for t in 0..d {
                let u = (x[i * d + t] - x[j * d + t]) * c;
                dx[i * d + t] -= u;
                dx[j * d + t] += u;
            }
        }
    }
    if let Some((df, weight)) = grad {
        for (i, &norm) in norms.iter().enumerate() {
            let r = i * d..(i + 1) * d;
            l2norm_row_backward(row, &dx[r.clone()], &x[r.clone()], norm, norm_eps);
            for (o, &g) in df[r].iter_mut().zip(row.iter()) {
                *o += weight * g;
            }
        }
    }
    loss * inv_n
}
