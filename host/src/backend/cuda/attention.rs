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

/// The six per-(image, head) GEMMs of attention for `n` images of `t` tokens, width `d` in `h`
/// heads, as views of `qkv[n, t, 3d]` (Q, K, V at column offsets 0, d, 2d),
/// `att[n, h, t, t]` and `out[n, t, d]`; each (image, head) is one batch. The forward and the
/// backward below launch them, the production-shape check (`verify/gemm.rs`) checks them.
#[derive(Clone, Copy, Debug)]
pub struct AttentionGemms {
    /// `S = scale Q K^T`.
    pub scores: Gemm,
    /// `O = P V`.
    pub out: Gemm,
    /// `dP = dO V^T`.
    pub d_probs: Gemm,
    /// `dV = P^T dO`.
    pub d_v: Gemm,
    /// `dQ = scale dS K`.
    pub d_q: Gemm,
    /// `dK = scale dS^T Q`.
    pub d_k: Gemm,
}

impl AttentionGemms {
    pub fn new(n: usize, t: usize, d: usize, h: usize) -> Self {
        let hd = d / h;
        let scale = 1.0 / (hd as f32).sqrt();
        let (qkv_s, att_s, out_s) = ([t * 3 * d, hd], [h * t * t, t * t], [t * d, hd]);
        let head = |ta, tb, m, nn, k| Gemm {
            outer: n,
            inner: h,
            ..Gemm::plain(ta, tb, m, nn, k)
        };
        // dQ = dS K and dK = dS^T Q (both scaled): the same view but for the transpose of dS.
        let d_qk = |trans_ds| Gemm {
            lda: t,
            ldb: 3 * d,
            ldc: 3 * d,
            sa: att_s,
            sb: qkv_s,
            sc: qkv_s,
            alpha: scale,
            ..head(trans_ds, false, t, hd, t)
        };
        Self {
            scores: Gemm {
                lda: 3 * d,
                ldb: 3 * d,
                ldc: t,
                sa: qkv_s,
                sb: qkv_s,
                sc: att_s,
                alpha: scale,
                ..head(false, true, t, t, hd)
            },
            out: Gemm {
                lda: t,
                ldb: 3 * d,
                ldc: d,
                sa: att_s,
                sb: qkv_s,
                sc: out_s,
                ..head(false, false, t, hd, t)
            },
            d_probs: Gemm {
                lda: d,
                ldb: 3 * d,
                ldc: t,
                sa: out_s,
                sb: qkv_s,
                sc: att_s,
                ..head(false, true, t, t, hd)
            },
            d_v: Gemm {
                lda: t,
                ldb: d,
                ldc: 3 * d,
                sa: att_s,
                sb: out_s,
                sc: qkv_s,
                ..head(true, false, t, hd, t)
            },
            d_q: d_qk(false),
            d_k: d_qk(true),
        }
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
    let g = AttentionGemms::new(n, t, d, h);
    gpu.gemm(&g.scores, att, qkv, qkv.from(d), None)?;
    gpu.softmax_rows(att, n * h * t, t, 1.0)?;
    gpu.gemm(&g.out, out, att, qkv.from(2 * d), None)
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
    let g = AttentionGemms::new(n, t, d, h);
    gpu.gemm(&g.d_probs, dp, dout, qkv.from(2 * d), None)?;
    gpu.gemm(&g.d_v, dqkv.from(2 * d), att, dout, None)?;
    // dS = P (dP - <dP, P>); the 1/sqrt(hd) goes into the two products below.
    gpu.softmax_backward_rows(dp, att, n * h * t, t, 1.0)?;
    gpu.gemm(&g.d_q, dqkv, dp, qkv.from(d), None)?;
    gpu.gemm(&g.d_k, dqkv.from(d), dp, qkv, None)
}
