//! Row L2 normalisation as `F.normalize(x, dim = -1)`: `y = x / max(||x||, eps)`.
//!
//! The one implementation in core: the loss stages, the CPU backend and the reference model all
//! call these, and the GPU kernels are checked against them.
use super::dot::dot;
use crate::Real;

/// `F.normalize`'s default eps.
pub const L2NORM_EPS: f64 = 1e-12;

/// Normalises one row in place; returns its norm before normalisation (what backward needs).
#[inline]
pub fn l2norm_row_inplace<T: Real>(x: &mut [T], eps: T) -> T {
    let norm = dot(x, x).sqrt();
    let inv = T::ONE / norm.max(eps);
    for xi in x.iter_mut() {
        *xi *= inv;
    }
    norm
}

/// Backward of one normalised row: `dx = (dy - y <y, dy>) / ||x||` when `||x|| > eps`, else
/// `dx = dy / eps` (the clamp is constant there). `dx` OVERWRITTEN.
#[inline]
pub fn l2norm_row_backward<T: Real>(dx: &mut [T], dy: &[T], y: &[T], norm: T, eps: T) {
    if norm > eps {
        let inv = T::ONE / norm;
        let yd = dot(y, dy);
        for ((o, &d), &yy) in dx.iter_mut().zip(dy).zip(y) {
            *o = (d - yy * yd) * inv;
        }
    } else {
        let inv = T::ONE / eps;
        for (o, &d) in dx.iter_mut().zip(dy) {
            *o = d * inv;
        }
    }
}

/// `y[r] = x[r] / max(||x[r]||, eps)` for `n` rows of length `d`; saves `norm[r] = ||x[r]||`.
/// `y` and `norm` overwritten.
pub fn l2norm_forward<T: Real>(y: &mut [T], norm: &mut [T], x: &[T], n: usize, d: usize, eps: T) {
    debug_assert!(y.len() >= n * d && x.len() >= n * d && norm.len() >= n);
    y[..n * d].copy_from_slice(&x[..n * d]);
    for (row, nr) in y.chunks_exact_mut(d).take(n).zip(norm.iter_mut()) {
        *nr = l2norm_row_inplace(row, eps);
    }
}

/// Backward of [`l2norm_forward`] from its output `y` and saved `norm`. `dx` OVERWRITTEN.
#[allow(clippy::too_many_arguments)]
pub fn l2norm_backward<T: Real>(
    dx: &mut [T],
    dy: &[T],
    y: &[T],
    norm: &[T],
    n: usize,
    d: usize,
    eps: T,
) {
    debug_assert!(dx.len() >= n * d && dy.len() >= n * d && y.len() >= n * d && norm.len() >= n);
    for (((dxr, dyr), yr), &nr) in dx
        .chunks_exact_mut(d)
        .zip(dy.chunks_exact(d))
        .zip(y.chunks_exact(d))
        .zip(norm)
        .take(n)
    {
        l2norm_row_backward(dxr, dyr, yr, nr, eps);
    }
}
