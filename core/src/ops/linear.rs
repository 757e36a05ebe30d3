//! Fully connected layer in PyTorch's layout: `y = x w^T + b`, `w` is `[out, in]`.
use crate::Real;

/// `y[n, d_out] = x[n, d_in] · w[d_out, d_in]^T (+ bias[d_out])`. `y` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    debug_assert!(y.len() >= n * d_out && x.len() >= n * d_in && w.len() >= d_out * d_in);
    for r in 0..n {
        let xr = &x[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let wo = &w[o * d_in..(o + 1) * d_in];
            let mut acc = match bias {
                Some(b) => b[o],
                None => T::ZERO,
            };
            for i in 0..d_in {
                acc += xr[i] * wo[i];
            }
            y[r * d_out + o] = acc;
        }
    }
}

/// Backward of [`linear_forward`]: `dx = dy · w` (OVERWRITES, skipped when `None`),
/// `dw += dy^T · x`, `dbias += Σ_rows dy` (ACCUMULATE).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dx: Option<&mut [T]>,
    dw: &mut [T],
    dbias: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    debug_assert!(dy.len() >= n * d_out && x.len() >= n * d_in && dw.len() >= d_out * d_in);
    if let Some(dx) = dx {
        debug_assert!(dx.len() >= n * d_in);
        for r in 0..n {
            let dxr = &mut dx[r * d_in..(r + 1) * d_in];
            dxr.fill(T::ZERO);
            for o in 0..d_out {
                let g = dy[r * d_out + o];
                let wo = &w[o * d_in..(o + 1) * d_in];
                for i in 0..d_in {
                    dxr[i] += g * wo[i];
                }
            }
        }
    }
    for o in 0..d_out {
        let dwo = &mut dw[o * d_in..(o + 1) * d_in];
        for r in 0..n {
            let g = dy[r * d_out + o];
            let xr = &x[r * d_in..(r + 1) * d_in];
            for i in 0..d_in {
                dwo[i] += g * xr[i];
            }
        }
    }
    if let Some(db) = dbias {
        for r in 0..n {
            for o in 0..d_out {
                db[o] += dy[r * d_out + o];
            }
        }
    }
}
