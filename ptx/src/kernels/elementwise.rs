//! Elementwise ops: GELU, residual, accumulation, drop path, fill.
use super::for_each_elem;
use crate::block::Block;
use dinovmf_core::ops::gelu::{gelu, gelu_grad};

/// `y = gelu(x)`.
pub fn gelu_forward<B: Block>(b: &mut B, y: &mut [f32], x: &[f32], n: usize) {
    for_each_elem(b, n, |i| y[i] = gelu(x[i]));
}

/// `dx = dy gelu'(x)` (overwrites `dx`).
pub fn gelu_backward<B: Block>(b: &mut B, dx: &mut [f32], x: &[f32], dy: &[f32], n: usize) {
    for_each_elem(b, n, |i| dx[i] = dy[i] * gelu_grad(x[i]));
}

/// `y = x + f`.
pub fn residual_forward<B: Block>(b: &mut B, y: &mut [f32], x: &[f32], f: &[f32], n: usize) {
    for_each_elem(b, n, |i| y[i] = x[i] + f[i]);
}

/// `y += alpha x`: gradient accumulation into a residual stream or a parameter gradient.
pub fn axpy<B: Block>(b: &mut B, y: &mut [f32], x: &[f32], alpha: f32, n: usize) {
    for_each_elem(b, n, |i| y[i] += alpha * x[i]);
}

/// `x = value`.
pub fn fill<B: Block>(b: &mut B, x: &mut [f32], value: f32, n: usize) {
    for_each_elem(b, n, |i| x[i] = value);
}

/// `out = bf16(x)` (round to nearest even; the bits), the operand copies of the bf16 matrix
/// products.
pub fn to_bf16<B: Block>(b: &mut B, out: &mut [crate::elem::Bf16], x: &[f32], n: usize) {
    for_each_elem(b, n, |i| out[i] = crate::elem::Bf16::from_f32(x[i]));
}

/// Per-sample scale of drop path (timm's `scale_by_keep`; unscaled when `keep_prob` is 0).
#[inline(always)]
fn drop_scale(mask: f32, keep_prob: f32) -> f32 {
    if keep_prob > 0.0 {
        mask / keep_prob
    } else {
        mask
    }
}

/// `y[b, :] = x[b, :] mask[b] / keep_prob`; the backward is the same call on `dy`.
pub fn drop_path<B: Block>(
    b: &mut B,
    y: &mut [f32],
    x: &[f32],
    mask: &[f32],
    keep_prob: f32,
    batch: usize,
    per_sample: usize,
) {
    for_each_elem(b, batch * per_sample, |i| {
        y[i] = x[i] * drop_scale(mask[i / per_sample], keep_prob)
    });
}
