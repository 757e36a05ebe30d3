//! Residual connection `y = x + f`.
use crate::Real;

/// `y = x + f`, elementwise; `y` overwritten.
pub fn residual_forward<T: Real>(y: &mut [T], x: &[T], f: &[T]) {
    debug_assert!(y.len() >= x.len() && f.len() >= x.len());
    for i in 0..x.len() {
        y[i] = x[i] + f[i];
    }
}

/// Both inputs receive `dy`: `dx = dy`, `df = dy` (OVERWRITTEN). Usually the caller folds this
/// into the surrounding code; it is here so every op has its pair.
pub fn residual_backward<T: Real>(dx: &mut [T], df: &mut [T], dy: &[T]) {
    dx[..dy.len()].copy_from_slice(dy);
    df[..dy.len()].copy_from_slice(dy);
}
