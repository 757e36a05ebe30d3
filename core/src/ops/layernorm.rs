//! LayerNorm over the last dimension (biased variance, like `nn.LayerNorm`).
use crate::Real;

/// `y = (x - mean) * rstd * gamma + beta` per row of `x[n, d]`; saves `mean[n]` and
/// `rstd[n] = 1 / sqrt(var + eps)` for the backward. All outputs are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Real>(
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    n: usize,
    d: usize,
    eps: T,
) {
    debug_assert!(y.len() >= n * d && x.len() >= n * d && mean.len() >= n && rstd.len() >= n);
    let inv_d = T::ONE / T::from_usize(d);
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let mut m = T::ZERO;
        for &v in xr {
            m += v;
        }
        m *= inv_d;
        // Two-pass variance: the reference must not lose digits to E[x^2] - E[x]^2.
        let mut var = T::ZERO;
        for &v in xr {
            let c = v - m;
            var += c * c;
        }
        var *= inv_d;
        let s = T::ONE / (var + eps).sqrt();
        mean[r] = m;
        rstd[r] = s;
        let yr = &mut y[r * d..(r + 1) * d];
        for i in 0..d {
            yr[i] = (xr[i] - m) * s * gamma[i] + beta[i];
        }
    }
}

/// Backward of [`layernorm_forward`]. With `xh = (x - mean) * rstd` and `g = dy * gamma`:
/// `dx = rstd * (g - mean(g) - xh * mean(g * xh))` (OVERWRITES `dx`);
/// `dgamma += Σ_rows dy * xh`, `dbeta += Σ_rows dy` (ACCUMULATE).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dy: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    gamma: &[T],
    n: usize,
    d: usize,
) {
    debug_assert!(dx.len() >= n * d && dy.len() >= n * d && x.len() >= n * d);
    let inv_d = T::ONE / T::from_usize(d);
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let (m, s) = (mean[r], rstd[r]);
        let mut mean_g = T::ZERO;
        let mut mean_gx = T::ZERO;
        for i in 0..d {
            let xh = (xr[i] - m) * s;
            let g = dyr[i] * gamma[i];
            mean_g += g;
            mean_gx += g * xh;
            dgamma[i] += dyr[i] * xh;
            dbeta[i] += dyr[i];
        }
        mean_g *= inv_d;
        mean_gx *= inv_d;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            let xh = (xr[i] - m) * s;
            dxr[i] = s * (dyr[i] * gamma[i] - mean_g - xh * mean_gx);
        }
    }
}
