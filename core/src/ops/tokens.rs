//! Token assembly: prepend `[CLS]`, add the position embedding, resized to the crop's grid.
//!
//! The position embedding is stored for the base grid (`img_size / patch` squared) plus one
//! `[CLS]` row. A crop on another grid (a 16 px local crop against 32 px globals) gets the patch
//! part resized by BILINEAR interpolation with `align_corners = false` semantics and the scale
//! `in / out` (what `F.interpolate(size = ...)` does). DINO resizes bicubically; bilinear is this
//! project's documented choice because it is linear with non-negative weights, so its backward
//! is the exact transpose and the resize of a grid onto itself is the identity.
use crate::Real;

/// Source index and weights of one output coordinate, PyTorch's `align_corners = false` rule:
/// `src = (dst + 0.5) * in / out - 0.5`, clamped below at 0; neighbours `i0`, `min(i0 + 1,
/// in - 1)` with weights `1 - l`, `l`.
#[inline]
fn source_index(dst: usize, n_in: usize, n_out: usize) -> (usize, usize, f64) {
    let scale = n_in as f64 / n_out as f64;
    let src = ((dst as f64 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src as usize).min(n_in - 1);
    let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
    let l = src - i0 as f64;
    (i0, i1, l)
}

/// Bilinear resize of a `[sh, sw, d]` grid of embeddings (row-major grid, channel last) to
/// `[gh, gw, d]`; `dst` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn pos_resize_forward<T: Real>(
    dst: &mut [T],
    src: &[T],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    debug_assert!(dst.len() >= gh * gw * d && src.len() >= sh * sw * d);
    for y in 0..gh {
        let (y0, y1, ly) = source_index(y, sh, gh);
        for x in 0..gw {
            let (x0, x1, lx) = source_index(x, sw, gw);
            let w00 = T::from_f64((1.0 - ly) * (1.0 - lx));
            let w01 = T::from_f64((1.0 - ly) * lx);
            let w10 = T::from_f64(ly * (1.0 - lx));
            let w11 = T::from_f64(ly * lx);
            let (a, b2, c, e) = (
                (y0 * sw + x0) * d,
                (y0 * sw + x1) * d,
                (y1 * sw + x0) * d,
                (y1 * sw + x1) * d,
            );
            let o = &mut dst[(y * gw + x) * d..][..d];
            for k in 0..d {
                o[k] = w00 * src[a + k] + w01 * src[b2 + k] + w10 * src[c + k] + w11 * src[e + k];
            }
        }
    }
}

/// Transpose of [`pos_resize_forward`]: `dsrc += R^T ddst` (ACCUMULATES).
#[allow(clippy::too_many_arguments)]
pub fn pos_resize_backward<T: Real>(
    dsrc: &mut [T],
    ddst: &[T],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    debug_assert!(ddst.len() >= gh * gw * d && dsrc.len() >= sh * sw * d);
    for y in 0..gh {
        let (y0, y1, ly) = source_index(y, sh, gh);
        for x in 0..gw {
            let (x0, x1, lx) = source_index(x, sw, gw);
            let g = &ddst[(y * gw + x) * d..][..d];
            for (idx, wt) in [
                (y0 * sw + x0, (1.0 - ly) * (1.0 - lx)),
                (y0 * sw + x1, (1.0 - ly) * lx),
                (y1 * sw + x0, ly * (1.0 - lx)),
                (y1 * sw + x1, ly * lx),
            ] {
                let wt = T::from_f64(wt);
                let o = &mut dsrc[idx * d..][..d];
                for k in 0..d {
                    o[k] += wt * g[k];
                }
            }
        }
    }
}

/// The position embedding `[1 + gh gw, d]` for a crop grid from the stored one
/// `[1 + sh sw, d]`: the `[CLS]` row is copied, the patch rows resized (a plain copy when the
/// grids agree). `dst` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn pos_embed_for_grid_forward<T: Real>(
    dst: &mut [T],
    pos: &[T],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    dst[..d].copy_from_slice(&pos[..d]);
    if (sh, sw) == (gh, gw) {
        dst[d..(1 + gh * gw) * d].copy_from_slice(&pos[d..(1 + sh * sw) * d]);
    } else {
        pos_resize_forward(&mut dst[d..], &pos[d..], sh, sw, gh, gw, d);
    }
}

/// Backward of [`pos_embed_for_grid_forward`]: `dpos += ...` (ACCUMULATES).
#[allow(clippy::too_many_arguments)]
pub fn pos_embed_for_grid_backward<T: Real>(
    dpos: &mut [T],
    ddst: &[T],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    for k in 0..d {
        dpos[k] += ddst[k];
    }
    if (sh, sw) == (gh, gw) {
        for (o, &g) in dpos[d..(1 + sh * sw) * d].iter_mut().zip(&ddst[d..]) {
            *o += g;
        }
    } else {
        pos_resize_backward(&mut dpos[d..], &ddst[d..], sh, sw, gh, gw, d);
    }
}

/// `x[b, 0] = cls + pos[0]`, `x[b, 1 + i] = patch[b, i] + pos[1 + i]`: tokens `[B, 1 + N, D]`
/// from patch tokens `[B, N, D]`, the `[CLS]` vector `[D]` and a position embedding already on
/// this grid (`[1 + N, D]`). `x` overwritten.
pub fn tokens_forward<T: Real>(
    x: &mut [T],
    patch: &[T],
    cls: &[T],
    pos: &[T],
    b: usize,
    n: usize,
    d: usize,
) {
    let t = n + 1;
    debug_assert!(x.len() >= b * t * d && patch.len() >= b * n * d && pos.len() >= t * d);
    for bi in 0..b {
        let xb = &mut x[bi * t * d..(bi + 1) * t * d];
        for k in 0..d {
            xb[k] = cls[k] + pos[k];
        }
        let pb = &patch[bi * n * d..(bi + 1) * n * d];
        for i in 0..n * d {
            xb[d + i] = pb[i] + pos[d + i];
        }
    }
}

/// Backward of [`tokens_forward`]: `dpatch` OVERWRITTEN (`[B, N, D]`), `dcls += Σ_b dx[b, 0]`,
/// `dpos += Σ_b dx[b]` (ACCUMULATE; `dpos` is on the crop's grid, see
/// [`pos_embed_for_grid_backward`]).
pub fn tokens_backward<T: Real>(
    dpatch: &mut [T],
    dcls: &mut [T],
    dpos: &mut [T],
    dx: &[T],
    b: usize,
    n: usize,
    d: usize,
) {
    let t = n + 1;
    debug_assert!(dx.len() >= b * t * d && dpatch.len() >= b * n * d && dpos.len() >= t * d);
    for bi in 0..b {
        let g = &dx[bi * t * d..(bi + 1) * t * d];
        for k in 0..d {
            dcls[k] += g[k];
        }
        for i in 0..t * d {
            dpos[i] += g[i];
        }
        dpatch[bi * n * d..(bi + 1) * n * d].copy_from_slice(&g[d..]);
    }
}

/// iBOT's mask-token substitution on patch embeddings `x[n, d]` (in place, before `[CLS]` and
/// the position embedding are added): `x_i <- (1 - m_i) x_i + m_i token` with `m_i` the 0/1
/// weight of row `i` (written as a blend, as iBOT does, so the backward is exact for any
/// weight).
pub fn mask_tokens_forward<T: Real>(x: &mut [T], mask: &[T], token: &[T], n: usize, d: usize) {
    debug_assert!(x.len() >= n * d && mask.len() >= n && token.len() >= d);
    for (row, &m) in x[..n * d].chunks_exact_mut(d).zip(&mask[..n]) {
        if m != T::ZERO {
            let keep = T::ONE - m;
            for (o, &t) in row.iter_mut().zip(&token[..d]) {
                *o = keep * *o + m * t;
            }
        }
    }
}

/// Backward of [`mask_tokens_forward`]: `dx_i <- (1 - m_i) dx_i` in place (the gradient that
/// reaches the patch embedding), `dtoken += sum_i m_i dx_i` (ACCUMULATES).
pub fn mask_tokens_backward<T: Real>(
    dx: &mut [T],
    dtoken: &mut [T],
    mask: &[T],
    n: usize,
    d: usize,
) {
    debug_assert!(dx.len() >= n * d && mask.len() >= n && dtoken.len() >= d);
    for (row, &m) in dx[..n * d].chunks_exact_mut(d).zip(&mask[..n]) {
        if m != T::ZERO {
            let keep = T::ONE - m;
            for (g, o) in dtoken[..d].iter_mut().zip(row.iter_mut()) {
                *g += m * *o;
                *o *= keep;
            }
        }
    }
}
