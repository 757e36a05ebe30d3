//! Multi-head self-attention core (between the `qkv` and `proj` linears).
//!
//! Layout as timm's `qkv(x).reshape(B, T, 3, H, hd)`: each token's `qkv` row of length `3 D`
//! holds `q | k | v`, each of `D = H hd`, and head `h` occupies columns `h hd .. (h + 1) hd`
//! inside each block. The output `[B, T, D]` puts head `h` at the same columns (what
//! `transpose(1, 2).reshape(B, T, D)` gives), ready for `proj`.
use super::softmax::softmax_in_place;
use crate::Real;

/// `out[b, t, h] = Σ_s P[b, h, t, s] v[b, s, h]`, `P = softmax(q k^T / sqrt(hd) + mask)`.
///
/// `att` (`[B, H, T, T]`) receives the probabilities, saved for the backward and for
/// attention maps. `key_mask`, when given, is `[B, T]` and is ADDED to every query's scores
/// for that key (0 to keep, `-inf` or a large negative number to hide a key; a query whose
/// keys are all `-inf` gets zero probabilities). `out` and `att` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Real>(
    out: &mut [T],
    att: &mut [T],
    qkv: &[T],
    key_mask: Option<&[T]>,
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    debug_assert!(d / heads * heads == d);
    debug_assert!(out.len() >= b * t * d && att.len() >= b * heads * t * t);
    debug_assert!(qkv.len() >= b * t * 3 * d);
    let hd = d / heads;
    let scale = T::ONE / T::from_usize(hd).sqrt();
    let row = 3 * d;
    for bi in 0..b {
        let base = bi * t * row;
        for h in 0..heads {
            for i in 0..t {
                let q = &qkv[base + i * row + h * hd..][..hd];
                let a = &mut att[((bi * heads + h) * t + i) * t..][..t];
                for (j, aj) in a.iter_mut().enumerate() {
                    let k = &qkv[base + j * row + d + h * hd..][..hd];
                    let mut s = T::ZERO;
                    for c in 0..hd {
                        s += q[c] * k[c];
                    }
                    s *= scale;
                    if let Some(m) = key_mask {
                        s += m[bi * t + j];
                    }
                    *aj = s;
                }
                softmax_in_place(a);
                let o = &mut out[(bi * t + i) * d + h * hd..][..hd];
                o.fill(T::ZERO);
                for (j, &p) in a.iter().enumerate() {
                    let v = &qkv[base + j * row + 2 * d + h * hd..][..hd];
                    for c in 0..hd {
                        o[c] += p * v[c];
                    }
                }
            }
        }
    }
}

/// Backward of [`attention_forward`] to `dqkv` (`[B, T, 3 D]`, OVERWRITTEN), from `dout`
/// (`[B, T, D]`), the forward's `qkv` and the saved probabilities `att`. The mask is a constant
/// and needs no gradient. No scratch: the per-row `<dP, P>` is found in a first pass and the
/// score gradients `dS = P (dP - <dP, P>)` are recomputed in a second.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    att: &[T],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
) {
    debug_assert!(d / heads * heads == d);
    debug_assert!(dqkv.len() >= b * t * 3 * d && dout.len() >= b * t * d);
    let hd = d / heads;
    let scale = T::ONE / T::from_usize(hd).sqrt();
    let row = 3 * d;
    dqkv[..b * t * row].fill(T::ZERO);
    for bi in 0..b {
        let base = bi * t * row;
        for h in 0..heads {
            for i in 0..t {
                let a = &att[((bi * heads + h) * t + i) * t..][..t];
                let go = &dout[(bi * t + i) * d + h * hd..][..hd];
                // dP[i, j] = <dout_i, v_j>; dv_j += P[i, j] dout_i.
                let mut dot = T::ZERO;
                for (j, &p) in a.iter().enumerate() {
                    let voff = base + j * row + 2 * d + h * hd;
                    let mut dp = T::ZERO;
                    for c in 0..hd {
                        dp += go[c] * qkv[voff + c];
                        dqkv[voff + c] += p * go[c];
                    }
                    dot += p * dp;
                }
                let qoff = base + i * row + h * hd;
                for (j, &p) in a.iter().enumerate() {
                    let voff = base + j * row + 2 * d + h * hd;
                    let koff = base + j * row + d + h * hd;
                    let mut dp = T::ZERO;
                    for c in 0..hd {
                        dp += go[c] * qkv[voff + c];
                    }
                    let ds = p * (dp - dot) * scale;
                    for c in 0..hd {
                        dqkv[qoff + c] += ds * qkv[koff + c];
                        dqkv[koff + c] += ds * qkv[qoff + c];
                    }
                }
            }
        }
    }
}
