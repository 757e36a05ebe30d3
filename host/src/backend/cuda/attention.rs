//! Multi-head self-attention on the device (the CPU backend's `cpu/attention.rs`): batched
//! GEMMs over `n * heads` (image, head) pairs and the row-softmax kernels. Layouts as in
//! `vit.rs`: `qkv[n, t, 3d]` with head `h` at columns `h hd ..` of each of q | k | v,
//! probabilities `[n, heads, t, t]`.
use anyhow::Result;

use super::device::{Buf, Device, Gpu};
use super::ops::Gemm;
use super::vit::Cx;

/// The per-(image, head) GEMM views of attention.
fn head_gemm(ta: bool, tb: bool, m: usize, n: usize, k: usize, imgs: usize, heads: usize) -> Gemm {
    Gemm {
        outer: imgs,
        inner: heads,
        ..Gemm::plain(ta, tb, m, n, k)
    }
}

/// Multi-head self-attention forward: `out[n, t, d]`, probabilities `att[n, heads, t, t]`.
pub fn attention_forward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    out: Buf<f32>,
    att: Buf<f32>,
    qkv: Buf<f32>,
    n: usize,
    t: usize,
) -> Result<()> {
    let (d, h) = (cx.d, cx.heads);
    let hd = d / h;
    let scale = 1.0 / (hd as f32).sqrt();
    let qkv_s = [t * 3 * d, hd];
    let att_s = [h * t * t, t * t];
    // S = scale Q K^T
    let g = Gemm {
        lda: 3 * d,
        ldb: 3 * d,
        ldc: t,
        sa: qkv_s,
        sb: qkv_s,
        sc: att_s,
        alpha: scale,
        ..head_gemm(false, true, t, t, hd, n, h)
    };
    gpu.gemm(&g, att, qkv, qkv.from(d), None)?;
    gpu.softmax_rows(att, n * h * t, t, 1.0)?;
    // O_h = P V
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: d,
        sa: att_s,
        sb: qkv_s,
        sc: [t * d, hd],
        ..head_gemm(false, false, t, hd, t, n, h)
    };
    gpu.gemm(&g, out, att, qkv.from(2 * d), None)
}

/// Backward of [`attention_forward`]: `dqkv` overwritten, `dp` scratch `[n, heads, t, t]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    dqkv: Buf<f32>,
    dp: Buf<f32>,
    dout: Buf<f32>,
    qkv: Buf<f32>,
    att: Buf<f32>,
    n: usize,
    t: usize,
) -> Result<()> {
    let (d, h) = (cx.d, cx.heads);
    let hd = d / h;
    let scale = 1.0 / (hd as f32).sqrt();
    let qkv_s = [t * 3 * d, hd];
    let att_s = [h * t * t, t * t];
    let out_s = [t * d, hd];
    // dP = dO V^T
    let g = Gemm {
        lda: d,
        ldb: 3 * d,
        ldc: t,
        sa: out_s,
        sb: qkv_s,
        sc: att_s,
        ..head_gemm(false, true, t, t, hd, n, h)
    };
    gpu.gemm(&g, dp, dout, qkv.from(2 * d), None)?;
    // dV = P^T dO
    let g = Gemm {
        lda: t,
        ldb: d,
        ldc: 3 * d,
        sa: att_s,
        sb: out_s,
        sc: qkv_s,
        ..head_gemm(true, false, t, hd, t, n, h)
    };
    gpu.gemm(&g, dqkv.from(2 * d), att, dout, None)?;
    // dS = P (dP - <dP, P>); the 1/sqrt(hd) goes into the two products below.
    gpu.softmax_backward_rows(dp, att, n * h * t, t, 1.0)?;
    // dQ = scale dS K
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: 3 * d,
        sa: att_s,
        sb: qkv_s,
        sc: qkv_s,
        alpha: scale,
        ..head_gemm(false, false, t, hd, t, n, h)
    };
    gpu.gemm(&g, dqkv, dp, qkv.from(d), None)?;
    // dK = scale dS^T Q
    let g = Gemm {
        lda: t,
        ldb: 3 * d,
        ldc: 3 * d,
        sa: att_s,
        sb: qkv_s,
        sc: qkv_s,
        alpha: scale,
        ..head_gemm(true, false, t, hd, t, n, h)
    };
    gpu.gemm(&g, dqkv.from(d), dp, qkv, None)
}
