//! Multi-head self-attention on the device (the CPU backend's `cpu/attention.rs`): batched
//! GEMMs over `n * heads` (image, head) pairs and the row-softmax kernels. Layouts as in
//! `vit.rs`: `qkv[n, t, 3d]` with head `h` at columns `h hd ..` of each of q | k | v,
//! probabilities `[n, heads, t, t]`.
//!
//! With bf16 matrix products ([`MatmulPrecision::Bf16`]) and a head size the tensor-core
//! fragments cover (a multiple of 16 up to 64), the fused kernels run instead
//! (`attention_tc_forward_bf16` and its backward): the T x T matrix never reaches global
//! memory, and the `att` buffer holds the forward's row log-sum-exp `[n, heads, t]` (what the
//! backward rebuilds the probabilities from) in place of the probabilities.
use anyhow::Result;

use super::device::{Buf, Device, Gpu};
use super::launch::attention_tc::{
    attention_tc_backward_bf16, attention_tc_forward_bf16, AttBackwardBufs, AttShape,
};
use super::ops::{Gemm, MatmulPrecision};
use super::vit::Cx;

/// The fused kernels' shape when they run for this call: bf16 products and a head size they
/// cover.
fn fused<D: Device>(gpu: &Gpu<D>, cx: &Cx, n: usize, t: usize) -> Option<AttShape> {
    let s = AttShape {
        b: n,
        t,
        d: cx.d,
        heads: cx.heads,
    };
    (gpu.precision == MatmulPrecision::Bf16 && s.check().is_ok()).then_some(s)
}

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
    if let Some(s) = fused(gpu, cx, n, t) {
        let q16 = gpu.bf16_copy(0, qkv)?;
        return attention_tc_forward_bf16(gpu, out, att.sub(0, n * cx.heads * t), q16, s);
    }
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

/// Backward of [`attention_forward`]: `dqkv` overwritten, `dp` scratch `[n, heads, t, t]`;
/// `out` is the forward's output (the fused backward's `delta` needs it).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    dqkv: Buf<f32>,
    dp: Buf<f32>,
    dout: Buf<f32>,
    qkv: Buf<f32>,
    att: Buf<f32>,
    out: Buf<f32>,
    n: usize,
    t: usize,
) -> Result<()> {
    if let Some(s) = fused(gpu, cx, n, t) {
        let rows = n * cx.heads * t;
        let q16 = gpu.bf16_copy(0, qkv)?;
        let bufs = AttBackwardBufs {
            dqkv,
            qkv: q16,
            out,
            lse: att.sub(0, rows),
            dout,
            delta: dp.sub(0, rows),
        };
        return attention_tc_backward_bf16(gpu, bufs, s);
    }
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
