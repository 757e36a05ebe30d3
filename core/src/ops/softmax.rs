//! Row softmax, max-subtracted, and the row log-sum-exp: the one softmax of the codebase (the
//! loss, the centering and the attention all call these).
use crate::Real;

/// `y[r] = softmax(x[r])` for each of `n` rows of length `d`; `y` overwritten.
///
/// Entries at `-inf` (masked) get probability 0. A row that is entirely `-inf` has no
/// distribution; it is written as all zeros rather than NaN.
pub fn softmax_forward<T: Real>(y: &mut [T], x: &[T], n: usize, d: usize) {
    debug_assert!(y.len() >= n * d && x.len() >= n * d);
    y[..n * d].copy_from_slice(&x[..n * d]);
    for r in 0..n {
        softmax_in_place(&mut y[r * d..(r + 1) * d]);
    }
}

/// Softmax of one row, in place (also used by the attention on its score rows).
pub fn softmax_in_place<T: Real>(row: &mut [T]) {
    let mut mx = T::NEG_INFINITY;
    for &v in row.iter() {
        mx = mx.max(v);
    }
    if mx == T::NEG_INFINITY {
        row.fill(T::ZERO);
        return;
    }
    let mut sum = T::ZERO;
    for v in row.iter_mut() {
        *v = (*v - mx).exp();
        sum += *v;
    }
    let inv = T::ONE / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `dx = y ⊙ (dy - <dy, y>)` per row, from the forward's OUTPUT `y`; `dx` OVERWRITTEN.
pub fn softmax_backward<T: Real>(dx: &mut [T], y: &[T], dy: &[T], n: usize, d: usize) {
    debug_assert!(dx.len() >= n * d && y.len() >= n * d && dy.len() >= n * d);
    for r in 0..n {
        let yr = &y[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let mut dot = T::ZERO;
        for i in 0..d {
            dot += yr[i] * dyr[i];
        }
        for i in 0..d {
            dx[r * d + i] = yr[i] * (dyr[i] - dot);
        }
    }
}

/// Log-sum-exp of a row, shifted by its maximum.
#[inline]
pub fn log_sum_exp<T: Real>(l: &[T]) -> T {
    let mut m = T::NEG_INFINITY;
    for &x in l {
        m = m.max(x);
    }
    let mut s = T::ZERO;
    for &x in l {
        s += (x - m).exp();
    }
    m + s.ln()
}

/// `out = softmax(l)`; returns the row's log-sum-exp.
pub fn softmax_row<T: Real>(out: &mut [T], l: &[T]) -> T {
    let lse = log_sum_exp(l);
    for (o, &x) in out.iter_mut().zip(l) {
        *o = (x - lse).exp();
    }
    lse
}

/// `out = softmax(l - shift)` without a temporary: two passes over the row.
pub fn softmax_shifted_row<T: Real>(out: &mut [T], l: &[T], shift: impl Fn(usize) -> T) {
    let mut m = T::NEG_INFINITY;
    for (i, &x) in l.iter().enumerate() {
        m = m.max(x - shift(i));
    }
    let mut s = T::ZERO;
    for (i, (o, &x)) in out.iter_mut().zip(l).enumerate() {
        let e = (x - shift(i) - m).exp();
        *o = e;
        s += e;
    }
    let inv = T::ONE / s;
    for o in out.iter_mut() {
        *o *= inv;
    }
}
