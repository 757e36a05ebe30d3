//! Row L2 normalisation as `F.normalize(x, dim = -1)`: `y = x / max(||x||, eps)`.
use crate::Real;

/// `F.normalize`'s default eps.
pub const L2NORM_EPS: f64 = 1e-12;

/// `y[r] = x[r] / max(||x[r]||, eps)` for `n` rows of length `d`; saves `norm[r] = ||x[r]||`.
/// `y` and `norm` overwritten.
pub fn l2norm_forward<T: Real>(y: &mut [T], norm: &mut [T], x: &[T], n: usize, d: usize, eps: T) {
    debug_assert!(y.len() >= n * d && x.len() >= n * d && norm.len() >= n);
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let mut s = T::ZERO;
        for &v in xr {
            s += v * v;
        }
        let nr = s.sqrt();
        norm[r] = nr;
        let inv = T::ONE / nr.max(eps);
        for i in 0..d {
            y[r * d + i] = xr[i] * inv;
        }
    }
}

/// Backward of [`l2norm_forward`] from its output `y` and saved `norm`:
/// `dx = (dy - y <y, dy>) / ||x||` when `||x|| > eps`, else `dx = dy / eps` (the clamp is
/// constant there). `dx` OVERWRITTEN.
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
    debug_assert!(dx.len() >= n * d && dy.len() >= n * d && y.len() >= n * d);
    for r in 0..n {
        let yr = &y[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let dxr = &mut dx[r * d..(r + 1) * d];
        if norm[r] > eps {
            let mut dot = T::ZERO;
            for i in 0..d {
                dot += yr[i] * dyr[i];
            }
            let inv = T::ONE / norm[r];
            for i in 0..d {
                dxr[i] = (dyr[i] - yr[i] * dot) * inv;
            }
        } else {
            let inv = T::ONE / eps;
            for i in 0..d {
                dxr[i] = dyr[i] * inv;
            }
        }
    }
}
