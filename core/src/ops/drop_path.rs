//! Stochastic depth ("drop path"), per sample, as timm's `DropPath` with `scale_by_keep`.
//!
//! The caller draws the per-sample 0/1 mask (the reference stays deterministic and the same
//! mask can be replayed on every backend).
use crate::Real;

/// Per-sample scale `mask_b / keep_prob` (timm leaves the mask unscaled when `keep_prob` is 0;
/// the mask is then all zeros anyway).
#[inline]
fn scale<T: Real>(mask: T, keep_prob: T) -> T {
    if keep_prob > T::ZERO {
        mask / keep_prob
    } else {
        mask
    }
}

/// `y[b, :] = x[b, :] * mask[b] / keep_prob` for `b` samples of `per_sample` elements each.
/// `y` overwritten.
pub fn drop_path_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    mask: &[T],
    keep_prob: T,
    b: usize,
    per_sample: usize,
) {
    debug_assert!(y.len() >= b * per_sample && x.len() >= b * per_sample && mask.len() >= b);
    for (bi, &mb) in mask[..b].iter().enumerate() {
        let s = scale(mb, keep_prob);
        let r = bi * per_sample..(bi + 1) * per_sample;
        for (yi, &xi) in y[r.clone()].iter_mut().zip(&x[r]) {
            *yi = xi * s;
        }
    }
}

/// `dx[b, :] = dy[b, :] * mask[b] / keep_prob`; `dx` OVERWRITTEN.
pub fn drop_path_backward<T: Real>(
    dx: &mut [T],
    dy: &[T],
    mask: &[T],
    keep_prob: T,
    b: usize,
    per_sample: usize,
) {
    drop_path_forward(dx, dy, mask, keep_prob, b, per_sample);
}

/// A 0/1 keep mask from uniforms in [0, 1): `mask[b] = 1` iff `u[b] < keep_prob`
/// (a Bernoulli(keep_prob) draw, as `bernoulli_(keep_prob)`).
pub fn drop_path_mask_from_uniform<T: Real>(mask: &mut [T], u: &[f64], keep_prob: f64) {
    for (m, &ui) in mask.iter_mut().zip(u) {
        *m = if ui < keep_prob { T::ONE } else { T::ZERO };
    }
}

/// Drop-path rate of each of `rates.len()` blocks: `linspace(0, max_rate, depth)` as DINO and
/// timm build it (block 0 never drops; the last block drops with `max_rate`).
pub fn drop_path_rates(rates: &mut [f32], max_rate: f32) {
    let depth = rates.len();
    for (i, r) in rates.iter_mut().enumerate() {
        *r = if depth > 1 {
            (max_rate as f64 * i as f64 / (depth - 1) as f64) as f32
        } else {
            0.0
        };
    }
}
