//! Patch embedding: a stride-`P` `P x P` convolution, written as patchify + linear.
//!
//! Patches are numbered row-major over the `(H/P) x (W/P)` grid (what `conv(x).flatten(2)
//! .transpose(1, 2)` yields) and each patch row is laid out `[c][i][j]`, the order of a Conv2d
//! weight `[D, C, P, P]` flattened: a PyTorch `patch_embed.proj.weight` maps 1:1 onto the
//! linear weight `[D, C P P]` used here.
use super::linear::{linear_backward, linear_forward};
use crate::Real;

/// `patches[b, py gw + px, (c P + i) P + j] = img[b, c, py P + i, px P + j]` for images
/// `[B, C, H, W]` (CHW); `H` and `W` must be multiples of `P`. Overwrites `patches`
/// (`[B, N, C P P]`, `N = (H/P)(W/P)`).
#[allow(clippy::too_many_arguments)]
pub fn patchify<T: Real>(
    patches: &mut [T],
    img: &[T],
    b: usize,
    c: usize,
    height: usize,
    width: usize,
    p: usize,
) {
    debug_assert!(height / p * p == height && width / p * p == width);
    let (gh, gw) = (height / p, width / p);
    let k = c * p * p;
    debug_assert!(patches.len() >= b * gh * gw * k && img.len() >= b * c * height * width);
    for bi in 0..b {
        for py in 0..gh {
            for px in 0..gw {
                let dst = &mut patches[((bi * gh + py) * gw + px) * k..][..k];
                for ci in 0..c {
                    for i in 0..p {
                        let src = ((bi * c + ci) * height + py * p + i) * width + px * p;
                        dst[(ci * p + i) * p..][..p].copy_from_slice(&img[src..src + p]);
                    }
                }
            }
        }
    }
}

/// Patch tokens `y[B, N, D]` of images `[B, C, H, W]`: [`patchify`] into `patches`
/// (`[B, N, C P P]`, kept for the backward) then `y = patches w^T + bias` with
/// `w = [D, C P P]`. `y` and `patches` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn patch_embed_forward<T: Real>(
    y: &mut [T],
    patches: &mut [T],
    img: &[T],
    w: &[T],
    bias: Option<&[T]>,
    b: usize,
    c: usize,
    height: usize,
    width: usize,
    p: usize,
    d: usize,
) {
    patchify(patches, img, b, c, height, width, p);
    let n = b * (height / p) * (width / p);
    linear_forward(y, patches, w, bias, n, c * p * p, d);
}

/// Backward of [`patch_embed_forward`] to the weights only (the image takes no gradient):
/// `dw += dy^T patches`, `dbias += Σ dy` (ACCUMULATE). `n_tokens = B N`, `k = C P P`.
pub fn patch_embed_backward<T: Real>(
    dw: &mut [T],
    dbias: Option<&mut [T]>,
    dy: &[T],
    patches: &[T],
    n_tokens: usize,
    k: usize,
    d: usize,
) {
    // `w` is only read for dx, which is not requested.
    linear_backward(None, dw, dbias, dy, patches, &[], n_tokens, k, d);
}
