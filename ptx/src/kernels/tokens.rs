//! Patchify, token assembly (`[CLS]` + position embedding) and the bilinear position resize.
use super::for_each_elem;
use crate::block::Block;

/// `patches[b, py gw + px, (c P + i) P + j] = img[b, c, py P + i, px P + j]`; one thread per
/// patch element.
#[allow(clippy::too_many_arguments)]
pub fn patchify<B: Block>(
    b: &mut B,
    patches: &mut [f32],
    img: &[f32],
    batch: usize,
    c: usize,
    height: usize,
    width: usize,
    p: usize,
) {
    let (gh, gw) = (height / p, width / p);
    let k = c * p * p;
    for_each_elem(b, batch * gh * gw * k, |e| {
        let (tok, kk) = (e / k, e % k);
        let (bi, pi) = (tok / (gh * gw), tok % (gh * gw));
        let (py, px) = (pi / gw, pi % gw);
        let (ci, ij) = (kk / (p * p), kk % (p * p));
        let (i, j) = (ij / p, ij % p);
        patches[e] = img[((bi * c + ci) * height + py * p + i) * width + px * p + j];
    });
}

/// `x[b, 0] = cls + pos[0]`, `x[b, 1 + i] = patch[b, i] + pos[1 + i]`.
#[allow(clippy::too_many_arguments)]
pub fn tokens_forward<B: Block>(
    b: &mut B,
    x: &mut [f32],
    patch: &[f32],
    cls: &[f32],
    pos: &[f32],
    batch: usize,
    n: usize,
    d: usize,
) {
    let t = n + 1;
    for_each_elem(b, batch * t * d, |e| {
        let (bi, r) = (e / (t * d), e % (t * d));
        let (ti, k) = (r / d, r % d);
        x[e] = if ti == 0 {
            cls[k] + pos[k]
        } else {
            patch[(bi * n + ti - 1) * d + k] + pos[r]
        };
    });
}

/// `dpatch[b, i] = dx[b, 1 + i]` (overwrites).
pub fn tokens_backward_patch<B: Block>(
    b: &mut B,
    dpatch: &mut [f32],
    dx: &[f32],
    batch: usize,
    n: usize,
    d: usize,
) {
    for_each_elem(b, batch * n * d, |e| {
        let (bi, r) = (e / (n * d), e % (n * d));
        dpatch[e] = dx[(bi * (n + 1) + 1) * d + r];
    });
}

/// `dpos += Σ_b dx[b]`, `dcls += Σ_b dx[b, 0]` (accumulate, in core's order); one thread per
/// element of `dpos` (`[1 + N, D]`).
pub fn tokens_backward_params<B: Block>(
    b: &mut B,
    dcls: &mut [f32],
    dpos: &mut [f32],
    dx: &[f32],
    batch: usize,
    n: usize,
    d: usize,
) {
    let td = (n + 1) * d;
    for_each_elem(b, td, |e| {
        let mut acc = dpos[e];
        let mut acc_c = if e < d { dcls[e] } else { 0.0 };
        for bi in 0..batch {
            let g = dx[bi * td + e];
            acc += g;
            acc_c += g;
        }
        dpos[e] = acc;
        if e < d {
            dcls[e] = acc_c;
        }
    });
}

/// Source neighbours and weight of one output coordinate (`align_corners = false`), the rule of
/// `core::ops::tokens` (in f64, like core).
#[inline(always)]
fn source_index(dst: usize, n_in: usize, n_out: usize) -> (usize, usize, f64) {
    let scale = n_in as f64 / n_out as f64;
    let mut src = (dst as f64 + 0.5) * scale - 0.5;
    if src < 0.0 {
        src = 0.0;
    }
    let i0 = (src as usize).min(n_in - 1);
    let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f64)
}

/// Bilinear resize `[sh, sw, d]` -> `[gh, gw, d]`; one thread per output element.
#[allow(clippy::too_many_arguments)]
pub fn pos_resize_forward<B: Block>(
    b: &mut B,
    dst: &mut [f32],
    src: &[f32],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    for_each_elem(b, gh * gw * d, |e| {
        let (yx, k) = (e / d, e % d);
        let (y, x) = (yx / gw, yx % gw);
        let (y0, y1, ly) = source_index(y, sh, gh);
        let (x0, x1, lx) = source_index(x, sw, gw);
        let w00 = ((1.0 - ly) * (1.0 - lx)) as f32;
        let w01 = ((1.0 - ly) * lx) as f32;
        let w10 = (ly * (1.0 - lx)) as f32;
        let w11 = (ly * lx) as f32;
        dst[e] = w00 * src[(y0 * sw + x0) * d + k]
            + w01 * src[(y0 * sw + x1) * d + k]
            + w10 * src[(y1 * sw + x0) * d + k]
            + w11 * src[(y1 * sw + x1) * d + k];
    });
}

/// Transpose of [`pos_resize_forward`], `dsrc += R^T ddst` (accumulates), as a gather: one
/// thread per source element visits every output cell (grids are small) and adds the weights
/// that point at it. Deterministic, no atomics.
#[allow(clippy::too_many_arguments)]
pub fn pos_resize_backward<B: Block>(
    b: &mut B,
    dsrc: &mut [f32],
    ddst: &[f32],
    sh: usize,
    sw: usize,
    gh: usize,
    gw: usize,
    d: usize,
) {
    for_each_elem(b, sh * sw * d, |e| {
        let (s, k) = (e / d, e % d);
        let mut acc = dsrc[e];
        for y in 0..gh {
            let (y0, y1, ly) = source_index(y, sh, gh);
            for x in 0..gw {
                let (x0, x1, lx) = source_index(x, sw, gw);
                let g = ddst[(y * gw + x) * d + k];
                for (idx, wt) in [
                    (y0 * sw + x0, (1.0 - ly) * (1.0 - lx)),
                    (y0 * sw + x1, (1.0 - ly) * lx),
                    (y1 * sw + x0, ly * (1.0 - lx)),
                    (y1 * sw + x1, ly * lx),
                ] {
                    if idx == s {
                        acc += wt as f32 * g;
                    }
                }
            }
        }
        dsrc[e] = acc;
    });
}
