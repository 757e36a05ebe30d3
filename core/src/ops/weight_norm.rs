//! Weight normalisation of the prototype layer, `w_k = g_k v_k / ||v_k||` per row (as
//! `nn.utils.weight_norm(Linear, dim = 0)`; like PyTorch, no eps: a zero row of `v` is invalid).
use crate::Real;

/// `w[k, :] = g[k] v[k, :] / ||v[k, :]||` for `v [K, p]`, `g [K]`; saves `vnorm[k]`.
/// `w` and `vnorm` overwritten.
pub fn weight_norm_forward<T: Real>(
    w: &mut [T],
    vnorm: &mut [T],
    v: &[T],
    g: &[T],
    k: usize,
    p: usize,
) {
    debug_assert!(w.len() >= k * p && v.len() >= k * p && g.len() >= k && vnorm.len() >= k);
    for r in 0..k {
        let vr = &v[r * p..(r + 1) * p];
        let mut s = T::ZERO;
        for &x in vr {
            s += x * x;
        }
        let nr = s.sqrt();
        vnorm[r] = nr;
        let c = g[r] / nr;
        for i in 0..p {
            w[r * p + i] = vr[i] * c;
        }
    }
}

/// Backward of [`weight_norm_forward`] from `dw [K, p]`. With `u = v / ||v||`:
/// `dg[k] += <dw_k, u_k>` (skipped when `dg` is `None`: `g` fixed, `norm_last_layer`),
/// `dv_k += (g_k / ||v_k||) (dw_k - u_k <u_k, dw_k>)` (both ACCUMULATE).
#[allow(clippy::too_many_arguments)]
pub fn weight_norm_backward<T: Real>(
    dv: &mut [T],
    mut dg: Option<&mut [T]>,
    dw: &[T],
    v: &[T],
    g: &[T],
    vnorm: &[T],
    k: usize,
    p: usize,
) {
    debug_assert!(dv.len() >= k * p && dw.len() >= k * p && v.len() >= k * p);
    for r in 0..k {
        let vr = &v[r * p..(r + 1) * p];
        let dwr = &dw[r * p..(r + 1) * p];
        let inv = T::ONE / vnorm[r];
        let mut dot = T::ZERO; // <dw_k, u_k>
        for i in 0..p {
            dot += dwr[i] * vr[i] * inv;
        }
        if let Some(dg) = dg.as_deref_mut() {
            dg[r] += dot;
        }
        let c = g[r] * inv;
        for i in 0..p {
            dv[r * p + i] += c * (dwr[i] - vr[i] * inv * dot);
        }
    }
}
