//! Exact GELU, `x Φ(x)` in the erf form (what `nn.GELU()` computes by default; not the tanh
//! approximation).
use crate::Real;

const FRAC_1_SQRT_2: f64 = core::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// GELU of one value, `0.5 x (1 + erf(x / sqrt 2))` (the GPU kernels call this per element).
#[inline(always)]
pub fn gelu<T: Real>(x: T) -> T {
    let c = T::from_f64(FRAC_1_SQRT_2);
    T::HALF * x * (T::ONE + (x * c).erf())
}

/// `d gelu / dx = Φ(x) + x φ(x)` of one value (the GPU kernels call this per element).
#[inline(always)]
pub fn gelu_grad<T: Real>(x: T) -> T {
    let c = T::from_f64(FRAC_1_SQRT_2);
    let k = T::from_f64(FRAC_1_SQRT_2PI);
    let cdf = T::HALF * (T::ONE + (x * c).erf());
    let pdf = k * (-T::HALF * x * x).exp();
    cdf + x * pdf
}

/// `y = gelu(x)`, elementwise; `y` overwritten (may not alias `x`).
pub fn gelu_forward<T: Real>(y: &mut [T], x: &[T]) {
    debug_assert!(y.len() >= x.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = gelu(xi);
    }
}

/// `dx = dy * gelu'(x)` from the forward's input `x`; `dx` OVERWRITTEN.
pub fn gelu_backward<T: Real>(dx: &mut [T], x: &[T], dy: &[T]) {
    debug_assert!(dx.len() >= x.len() && dy.len() >= x.len());
    for i in 0..x.len() {
        dx[i] = dy[i] * gelu_grad(x[i]);
    }
}
