//! Exact GELU, `x Φ(x)` in the erf form (what `nn.GELU()` computes by default; not the tanh
//! approximation).
use crate::Real;

const FRAC_1_SQRT_2: f64 = core::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `y = 0.5 x (1 + erf(x / sqrt 2))`, elementwise; `y` overwritten (may not alias `x`).
pub fn gelu_forward<T: Real>(y: &mut [T], x: &[T]) {
    debug_assert!(y.len() >= x.len());
    let c = T::from_f64(FRAC_1_SQRT_2);
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = T::HALF * xi * (T::ONE + (xi * c).erf());
    }
}

/// `dx = dy * (Φ(x) + x φ(x))` from the forward's input `x`; `dx` OVERWRITTEN.
pub fn gelu_backward<T: Real>(dx: &mut [T], x: &[T], dy: &[T]) {
    debug_assert!(dx.len() >= x.len() && dy.len() >= x.len());
    let c = T::from_f64(FRAC_1_SQRT_2);
    let k = T::from_f64(FRAC_1_SQRT_2PI);
    for i in 0..x.len() {
        let xi = x[i];
        let cdf = T::HALF * (T::ONE + (xi * c).erf());
        let pdf = k * (-T::HALF * xi * xi).exp();
        dx[i] = dy[i] * (cdf + xi * pdf);
    }
}
